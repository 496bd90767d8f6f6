"""The one translation from an API request to engine jobs, and the one admission check.

HTTP (`http.py`), gRPC (`grpc.py`) and the Python client (through the ingress's handle methods)
all come through here, so a request means the same on every API:

- `parse` validates a JSON payload (gRPC builds the same payload from its proto) into a
  `CompletionRequest` / `ChatCompletionRequest`: every problem is a 400 naming the first bad field;
- `Admission.completion_jobs` / `chat_jobs` check what depends on the server (the model name, `n`,
  `max_tokens`, the prompt fits the context, token ids in the vocabulary) and make one `Job` per
  choice, with `top_k` clamped to the vocabulary, seeds `(seed + i) mod 2**63`, `stop`,
  `stop_token_ids` and `ignore_eos` passed on, and the prompt scored (`prompt_logprobs`) when
  `prompt_logprobs` or `echo` with `logprobs` ask for it; `echo` with `max_tokens` 0 (scoring only,
  as vLLM) generates one token that the response leaves out;
- `Admission.request_id` keeps a client's request id when it is a safe token, else makes one;
- `Admission.authorized` compares an API key in constant time;
- `InFlight` answers 429 at once, without an engine call, past (max_num_seqs + max_waiting) x
  dispatcher replicas open engine requests per ingress replica.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from pydantic import BaseModel, ValidationError

from moray.deploy.api.errors import APIError
from moray.deploy.api.outputs import StructuredOutputs
from moray.deploy.api.protocol import (
    DEFAULT_MAX_TOKENS,
    REQUEST_ID_RE,
    SEED_BOUND,
    ChatCompletionRequest,
    CompletionRequest,
    Job,
    OpenAIBaseModel,
    SamplingFields,
    random_id,
)
from moray.deploy.api.tools import tool_constraint
from moray.deploy.serve.config import ServerConfig
from moray.model.errors import QueueFullError
from moray.model.sampling import SamplingParams
from moray.model.structured import Constraint, ConstraintError
from moray.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def lone_surrogate(payload: Any) -> bool:
    """True when any string (or key) in a JSON value holds an unpaired UTF-16 surrogate (`"\\ud800"`):
    valid JSON, but no UTF-8 text, so nothing downstream could encode it."""
    stack = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse(model: type[BaseModel], payload: Any) -> Any:
    """Validate a JSON payload; any problem is a 400 naming the first bad field."""
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object")
    if lone_surrogate(payload):
        raise APIError(400, "the request holds a string that is not valid Unicode (an unpaired surrogate)")
    try:
        req = model.model_validate(payload)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        raise APIError(400, f"{where}: {err['msg']}" if where else err["msg"],
                       param=str(err["loc"][0]) if err["loc"] else None) from None
    ignored: list[str] = req.ignored_fields() if isinstance(req, OpenAIBaseModel) else []
    if ignored:
        log.warning("ignoring unknown request fields: %s", ", ".join(repr(f)[:64] for f in ignored[:20]))
    return req


def requested_constraint(req: SamplingFields) -> Constraint | None:
    """The output constraint of `response_format`, `structured_outputs` or a `guided_*` field (vLLM's
    names); more than one is a 400, as an empty choice list is. Compiling (a bad schema, regex or
    grammar) is the engine's, before it queues the request."""
    found: list[tuple[str, Constraint]] = []
    try:
        fmt = req.response_format
        if fmt is not None and fmt.type == "json_object":
            found.append(("response_format", Constraint("json_object")))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.json_schema is None:
                raise APIError(400, "response_format: type 'json_schema' needs json_schema.schema",
                               param="response_format")
            found.append(("response_format", Constraint.json_schema(fmt.json_schema.json_schema)))
        so = req.structured_outputs or StructuredOutputs()
        given = [("guided_json", "json", req.guided_json), ("guided_regex", "regex", req.guided_regex),
                 ("guided_choice", "choice", req.guided_choice),
                 ("guided_grammar", "grammar", req.guided_grammar),
                 ("structured_outputs.json", "json", so.json_),
                 ("structured_outputs.regex", "regex", so.regex),
                 ("structured_outputs.choice", "choice", so.choice),
                 ("structured_outputs.grammar", "grammar", so.grammar)]
        for name, kind, value in given:
            if value is not None:
                found.append((name, _constraint(kind, value)))
        if so.json_object:
            found.append(("structured_outputs.json_object", Constraint("json_object")))
    except ConstraintError as e:
        raise APIError(400, str(e), param=found[-1][0] if found else None) from None
    if len(found) > 1:
        raise APIError(400, "only one kind of structured output can be requested at a time, got "
                            + ", ".join(name for name, _ in found), param=found[1][0])
    return found[0][1] if found else None


def chat_constraint(req: ChatCompletionRequest) -> Constraint | None:
    """A chat's constraint: `response_format` / vLLM's fields, or the one `tool_choice` implies."""
    requested, tools = requested_constraint(req), tool_constraint(req)
    if requested is not None and tools is not None:
        raise APIError(400, "tool_choice 'required' or a named function cannot be combined with "
                            "response_format or another structured output", param="tool_choice")
    return requested or tools


def _constraint(kind: str, value: Any) -> Constraint:
    if kind == "json":
        return Constraint.json_schema(value)
    if kind == "choice":
        return Constraint.choice(value)
    return Constraint(kind, value)  # type: ignore[arg-type]  # "regex" | "grammar"


def bearer(authorization: str) -> str | None:
    """The token of an `authorization: Bearer <token>` header or gRPC metadata value, else None."""
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class Admission:
    """Checks a parsed request against the server's limits and turns it into engine jobs."""

    def __init__(self, config: ServerConfig, tokenizer: Tokenizer, vocab_size: int,
                 max_model_len: int) -> None:
        self.config, self.tokenizer = config, tokenizer
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        self.served_model_name: str = config.served_model_name or "moray"

    def authorized(self, token: str | None) -> bool:
        """True when no key is configured or `token` equals it (constant-time compare)."""
        key = self.config.api_key
        return not key or (token is not None and hmac.compare_digest(token.encode(), key.encode()))

    def request_id(self, given: str | None) -> str:
        """The client's request id when it is a sane token (it reaches logs), else a fresh one."""
        if given and REQUEST_ID_RE.fullmatch(given):
            return given
        if given:
            log.warning("replacing malformed request id %r", given[:64])
        return random_id()

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model")

    # ---- completions and chat ---------------------------------------------------------------------
    def completion_jobs(self, req: CompletionRequest, rid: str) -> list[Job]:
        """One job per (prompt, choice); the prompt text rides along when `echo` asks for it."""
        self._check_limits(req, req.max_tokens)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 only with echo: the prompt is scored, "
                                "nothing is generated)", param="max_tokens")
        prompts = self._completion_prompts(req)
        max_tokens = 1 if req.score_only else req.max_tokens or DEFAULT_MAX_TOKENS
        self._check_prompts(prompts, max_tokens)
        texts = [self.tokenizer.decode(p) if req.echo else "" for p in prompts]
        return self._jobs(req, prompts, max_tokens, req.logprobs, rid, texts, requested_constraint(req))

    def chat_jobs(self, req: ChatCompletionRequest, rid: str) -> list[Job]:
        """One job per choice of the conversation in the Mixtral chat format; no `max_tokens`: what
        the context leaves (at most `max_tokens_limit`)."""
        self._check_limits(req, req.requested_max_tokens())
        prompt = self._chat_prompt(req)
        room = max(self.max_model_len - len(prompt), 1)
        max_tokens = req.requested_max_tokens() or min(room, self.config.max_tokens_limit)
        self._check_prompts([prompt], max_tokens)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return self._jobs(req, [prompt], max_tokens, logprobs, rid, [""], chat_constraint(req))

    # ---- the checks -------------------------------------------------------------------------------
    def _check_limits(self, req: SamplingFields, max_tokens: int | None) -> None:
        self.check_model(req.model)
        if req.n > self.config.max_n:
            raise APIError(400, f"n must be at most {self.config.max_n}, got {req.n}", param="n")
        if max_tokens is not None and max_tokens > self.config.max_tokens_limit:
            raise APIError(400, f"max_tokens must be at most {self.config.max_tokens_limit}, "
                                f"got {max_tokens}", param="max_tokens")
        if req.stream and req.prompt_logprobs is not None:  # as vLLM
            raise APIError(400, "prompt_logprobs are not available when stream=True", param="prompt_logprobs")

    def _completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        prompts = req.prompt_list()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        return [self.tokenizer.encode(p, bos=True) if isinstance(p, str) else list(p) for p in prompts]

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        messages = [m.as_dict() for m in req.messages]
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        try:
            ids: list[int] = self.tokenizer.encode_chat(messages, tools)
        except (ValueError, TypeError) as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        return ids

    def _check_prompts(self, prompts: list[list[int]], max_tokens: int) -> None:
        """Refuse, before any work, a prompt that cannot fit or names unknown tokens (as the engine would)."""
        for ids in prompts:
            if len(ids) + max_tokens > self.max_model_len:
                raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. "
                                    f"However, you requested {len(ids) + max_tokens} tokens ({len(ids)} in "
                                    f"the prompt, {max_tokens} for the completion).")
            if not all(0 <= t < self.vocab_size for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")

    # ---- jobs -------------------------------------------------------------------------------------
    def _params(self, req: SamplingFields, max_tokens: int, logprobs: int | None, i: int,
                constraint: Constraint | None) -> SamplingParams:
        seed = None if req.seed is None else (req.seed + i) % SEED_BOUND
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              top_k=min(max(req.top_k, 0), self.vocab_size), seed=seed,
                              stop=req.stop_strings(), stop_token_ids=tuple(req.stop_token_ids or ()),
                              logprobs=logprobs, ignore_eos=req.ignore_eos, constraint=constraint,
                              prompt_logprobs=req.scored_prompt())

    def _jobs(self, req: SamplingFields, prompts: list[list[int]], max_tokens: int, logprobs: int | None,
              rid: str, texts: list[str], constraint: Constraint | None = None) -> list[Job]:
        n, many = req.n, len(prompts) * req.n > 1
        return [Job(p * n + i, ids, self._params(req, max_tokens, logprobs, i, constraint),
                    f"{rid}-{p * n + i}" if many else rid, texts[p], req.score_only)
                for p, ids in enumerate(prompts) for i in range(n)]


class InFlight:
    """Engine requests one ingress replica has open; past `limit`, `QueueFullError` (429) at once."""

    def __init__(self, config: ServerConfig) -> None:
        replicas = config.dispatcher_max_replicas if config.autoscaling else config.dispatcher_replicas
        self.limit = (config.max_num_seqs + config.max_waiting) * replicas
        self.count = 0

    def enter(self) -> None:
        if self.count >= self.limit:  # every engine slot and waiting place is taken: no call
            raise QueueFullError(f"{self.count} requests are in flight")
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
