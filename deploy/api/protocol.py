"""OpenAI request/response models (the subset moray serves), shaped as OpenAI and vLLM send them.

Requests accept unknown fields (OpenAI clients send many) and the ingress logs them as ignored,
as vLLM does. Bounds that depend on the server config (`max_tokens`, `n`, the model name) are
checked by `admission.py`; everything else here. Error bodies are in `errors.py`.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moray.deploy.api.outputs import (
    DeltaToolCall,
    NamedToolChoice,
    ResponseFormat,
    StructuredOutputs,
    Tool,
    ToolCall,
)

if TYPE_CHECKING:
    from moray.model.engine import PromptLogprob, TokenEvent
    from moray.model.sampling import SamplingParams

MAX_STOP = 4
MAX_PROMPTS = 64  # prompts in one batched completion request (each is `n` engine requests)
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
MAX_PROMPT_LOGPROBS = 20  # vLLM's default max_logprobs
SEED_BOUND = 2**63  # seeds are in [-SEED_BOUND, SEED_BOUND); choice i samples with (seed + i) mod it
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (and moray's gRPC `Generate`)
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")  # a client's request id is kept when it fullmatches

TokenLogprobs = tuple[int, float | None, list[tuple[int, float]] | None]  # (token id, logprob, top-k)

class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    def ignored_fields(self) -> list[str]:
        """Fields the client sent that this server does not know (logged, never an error)."""
        return sorted(self.model_extra or {})


# ---- requests -------------------------------------------------------------------------------------
class StreamOptions(OpenAIBaseModel):
    include_usage: bool = Field(False, description="Send a last chunk with `usage` and no choices.")


class SamplingFields(OpenAIBaseModel):
    """Fields completions and chat share."""

    model: str | None = Field(None, description="Served model name; None = the one served.")
    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=-1, lt=2**31, description="Keep the k most likely tokens; 0 or -1 = off.")
    seed: int | None = Field(None, ge=-SEED_BOUND, lt=SEED_BOUND, description="Seed (choice i: seed+i).")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; generation stops before them.")
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=2**31)]] | None = Field(
        None, description="Token ids that end generation (vLLM extension).")
    ignore_eos: bool = Field(False, description="Keep generating past EOS (vLLM extension).")
    return_token_ids: bool = Field(False, description="Choices carry `token_ids`, `prompt_token_ids` (vLLM).")
    n: int = Field(1, ge=1, description="Choices per prompt.")
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_PROMPT_LOGPROBS,
        description="Each prompt token's logprob, rank and the k most likely tokens (vLLM; not streamed).")
    stream: bool = Field(False, description="Send Server-Sent Events.")
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = Field(None, description="`json_object` or `json_schema` output.")
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM's constraints (one kind).")
    guided_json: dict[str, Any] | str | bool | None = Field(None, description="vLLM: a JSON schema.")
    guided_regex: str | None = Field(None, description="vLLM: a regular expression.")
    guided_choice: list[str] | None = Field(None, description="vLLM: one of these strings.")
    guided_grammar: str | None = Field(None, description="vLLM: an EBNF (GBNF) or Lark grammar.")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(v)}")
        return v

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def scored_prompt(self) -> int | None:
        """How many alternatives the engine scores each prompt token with; None = no prompt scores."""
        return self.prompt_logprobs

    @property
    def score_only(self) -> bool:
        """The prompt is scored and nothing generated (completions' `echo` with `max_tokens` 0)."""
        return False


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: Prompt = Field(description="A string, a list of token ids, or a batch of either.")
    max_tokens: int | None = Field(DEFAULT_MAX_TOKENS, ge=0,
                                   description="Tokens to make per choice; 0 (with echo): score the prompt.")
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS,
                                 description="Log-probs of the chosen and the k most likely tokens.")
    echo: bool = Field(False, description="Prepend the prompt (and with logprobs, its tokens' logprobs).")

    def scored_prompt(self) -> int | None:
        asked = [k for k in (self.logprobs if self.echo else None, self.prompt_logprobs) if k is not None]
        return max(asked, default=None)

    @property
    def score_only(self) -> bool:
        return self.echo and self.max_tokens == 0

    @field_validator("prompt")
    @classmethod
    def _check_batch(cls, v: Prompt) -> Prompt:
        if isinstance(v, list) and v and not isinstance(v[0], int) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts are allowed in one request, got {len(v)}")
        return v

    def prompt_list(self) -> list[str | list[int]]:
        """The batch: one entry per prompt (a string or token ids)."""
        p = self.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant's earlier tool calls.")
    tool_call_id: str | None = Field(None, description="A tool message: the call it answers.")
    name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The message as mistral-common's `from_openai` reads it (text content; no unset fields)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
            out["content"] = self.text() or None
        out.update({k: v for k, v in (("tool_call_id", self.tool_call_id), ("name", self.name)) if v})
        return out

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to make; None = what the context holds.")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    logprobs: bool = Field(False, description="Return the chosen tokens' log-probs.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS,
                                     description="Alternatives per position (needs logprobs).")
    tools: list[Tool] | None = Field(None, description="Functions the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="`auto` (the default with tools), `none`, `required`, or one named function.")
    parallel_tool_calls: bool = Field(True, description="`required`: more than one call allowed.")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses ------------------------------------------------------------------------------------
def now() -> int:
    return int(time.time())


def random_id() -> str:
    return uuid.uuid4().hex


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class PromptTokenLogprob(BaseModel):
    """vLLM's `Logprob`: one entry of a prompt position's dict in `prompt_logprobs`."""

    logprob: float
    rank: int | None = None  # 1 = the most likely token there
    decoded_token: str | None = None


PromptLogprobs = list[dict[int, PromptTokenLogprob] | None]  # one per prompt token; None for the first


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    model_config = ConfigDict(extra="allow")  # vLLM's `token_ids` / `prompt_token_ids` when asked for

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM: the conversation's tokens, when asked for


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "moray"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- one request's choices ------------------------------------------------------------------------
@dataclass
class Job:
    """One engine request: choice `index` of the response."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    prompt_text: str = ""  # echoed before the completion
    score_only: bool = False  # the one token generated is not shown (echo with max_tokens 0)


@dataclass
class Choice:
    """What one choice has produced so far."""

    job: Job
    events: list[TokenEvent] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    last_t: float | None = None

    @property
    def token_ids(self) -> list[int]:
        return [] if self.job.score_only else [e.token_id for e in self.events]

    @property
    def prompt_scores(self) -> list[PromptLogprob]:
        """The engine's scores of prompt tokens 1.. (on the first event, when the params asked)."""
        return (self.events[0].prompt_logprobs or []) if self.events else []


def usage(choices: Sequence[Choice]) -> Usage:
    """Prompt tokens counted once per prompt (not per choice), as OpenAI and vLLM do."""
    prompt = sum({id(c.job.prompt_ids): len(c.job.prompt_ids) for c in choices}.values())
    completion = sum(len(c.token_ids) for c in choices)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def with_token_ids(req: SamplingFields, choice: Any, c: Choice) -> Any:
    if req.return_token_ids:  # vLLM extension: ids beside the text
        choice.token_ids, choice.prompt_token_ids = c.token_ids, c.job.prompt_ids
    return choice


def chunk_dict(chunk: BaseModel, include_usage: bool) -> dict[str, Any]:
    """A chunk as OpenAI sends it: `usage` only when asked for (null until the last), deltas without nulls."""
    d = chunk.model_dump()
    if not include_usage:
        d.pop("usage", None)
    for c in d["choices"]:
        if "delta" in c:
            c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
    return d
