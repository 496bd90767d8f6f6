"""The Mixtral tokenizer: sentencepiece, Mistral's chat formats, and streaming detokenization.

The embedded default is the real Mixtral tokenizer that mistral-common ships
(`mistral_common/data/tokenizer.model.v1`); a checkpoint's own tokenizer wins: a versioned
`tokenizer.model.v2`/`.v3`/`.v7` first (Mistral's name, which tells its chat format, as vLLM's
`--tokenizer-mode mistral` picks it), then `tokenizer.model`, then `tokenizer.model.v1`. The tiny
checkpoints carry mistral-common's v3 tokenizer (`TOOLS_TOKENIZER`: 32768 ids, with the control tokens
`[INST]`, `[TOOL_CALLS]`, `[AVAILABLE_TOOLS]`, `[TOOL_RESULTS]` that tool calling needs).

Conversations in a v2+ format, and any with tools, tool calls or tool results, are encoded by
mistral-common itself (`MistralTokenizer.encode_chat_completion` of `ChatCompletionRequest.from_openai`):
no hand-written format. A v1 tokenizer (Mixtral-8x7B-Instruct-v0.1's) has no tool tokens: mistral-common
leaves `tools` out of its prompt and refuses tool calls and tool results in the history (a 400 here).

v1 text conversations: mistral-common's `InstructTokenizerV1` behind its request normalizer and validator
(mistral_common/tokens/tokenizers/instruct.py, protocol/instruct/{normalize,validator}.py), for text
messages with roles system / user / assistant:

    <s>[INST] {system}\\n\\n{user 1} [/INST] {answer 1}</s>[INST] {user 2} [/INST]

- every system message's content is joined with "\\n\\n" and prepended to the FIRST user message;
- consecutive messages of one role merge (contents joined with "\\n\\n");
- a conversation that does not start with a user message gets an empty user message first;
- each `[INST] ... [/INST]` and each answer is encoded on its own (sentencepiece adds its leading
  space to each), an answer ends with `</s>`;
- a final assistant message is a prefix to continue (no `</s>`), as vLLM does with mistral-common.

Streaming detokenization follows vLLM's prefix_offset / read_offset scheme: each new token decodes
a short window of recent ids, and text is released only once it no longer ends in U+FFFD (an
incomplete UTF-8 character from byte-fallback tokens such as `<0xE2>`).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece as spm
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
TOOLS_TOKENIZER = "mistral_instruct_tokenizer_240323.model.v3"  # in mistral_common/data
VERSIONED = ("tokenizer.model.v7", "tokenizer.model.v3", "tokenizer.model.v2")  # preferred in a model dir
MESSAGE_JOIN = "\n\n"  # mistral-common's separator between merged messages and before the user turn
REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # window the detokenizer decodes before the new tokens (vLLM: 5)


def default_tokenizer_path(name: str = "tokenizer.model.v1") -> Path:
    """The Mixtral tokenizer (or another of `name`) shipped inside the installed mistral-common package."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"mistral-common is not installed: it ships the tokenizer {name}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}")
    return path


def tools_tokenizer_path() -> Path:
    """mistral-common's v3 sentencepiece tokenizer (Mixtral-8x22B-Instruct's format, with tool tokens)."""
    return default_tokenizer_path(TOOLS_TOKENIZER)


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


class Tokenizer:
    """Sentencepiece Mixtral tokenizer (32000 ids, `<s>` = 1, `</s>` = 2, byte fallback)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no tokenizer model at {self.path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self._pieces = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]
        # mistral-common's view of the same file: its version is the file name's (".model" = v1)
        self.mistral = MistralTokenizer.from_file(str(self.path))
        self.version = self.mistral.instruct_tokenizer.tokenizer.version.value  # "v1", "v3", ...
        pieces = {p: i for i, p in enumerate(self._pieces) if self.sp.is_control(i)}
        self.tool_calls_id: int | None = pieces.get("[TOOL_CALLS]")  # the token that opens a tool call

    @classmethod
    def load(cls, path: str | Path | None = None) -> Tokenizer:
        """The sentencepiece model at `path`; None: the default Mixtral tokenizer."""
        return cls(path if path is not None else default_tokenizer_path())

    @classmethod
    def from_model_dir(cls, model_dir: str | Path | None) -> Tokenizer:
        """The directory's versioned `tokenizer.model.v{7,3,2}`, else its `tokenizer.model`, else its
        `tokenizer.model.v1`, else the default."""
        for name in (*VERSIONED, "tokenizer.model", "tokenizer.model.v1"):
            if model_dir is not None and (Path(model_dir) / name).is_file():
                return cls(Path(model_dir) / name)
        log.info("no tokenizer.model in %s: using the default Mixtral tokenizer", model_dir)
        return cls.load()

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def bos_id(self) -> int:
        return int(self.sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids: list[int] = self.sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control tokens (`<s>`, `</s>`) decode to nothing."""
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range 0..{self.vocab_size - 1}: {bad[:5]}")
        text: str = self.sp.decode(list(ids))
        return text

    def id_to_piece(self, token_id: int) -> str:
        return self._pieces[token_id]

    def token_text(self, token_id: int) -> str:
        """One token's surface text for logprobs, as vLLM shows it: `decode([id])` with the leading
        spaces that decoding a lone token strips put back (`▁the` -> " the"); a lone byte-fallback
        token shows as U+FFFD; control tokens show as their piece (`</s>`)."""
        piece = self._pieces[token_id]
        if self.sp.is_control(token_id) or self.sp.is_unknown(token_id):
            return piece
        text = self.decode([token_id])
        markers = len(piece) - len(piece.lstrip("▁"))
        missing = markers - (len(text) - len(text.lstrip(" ")))
        return " " * missing + text if missing > 0 else text

    def token_bytes(self, token_id: int) -> bytes:
        """One token's UTF-8 bytes (OpenAI's logprobs `bytes`): a byte-fallback token is its byte."""
        if self.sp.is_byte(token_id):
            return bytes([int(self._pieces[token_id][3:5], 16)])  # "<0xE2>"
        return self.token_text(token_id).encode("utf-8")

    # ---- chat ------------------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[Mapping[str, Any] | Any],
                    tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Token ids of a conversation in the tokenizer's instruct format (see the module docstring).

        Messages are dicts or objects with `role` and `content` (OpenAI's shape: `tool_calls`,
        `tool_call_id` too); `tools` are OpenAI's tool dicts. Raises ValueError for a conversation
        mistral-common rejects: empty, an unknown role, a system message after an assistant message,
        an assistant message without content, a lone assistant message.
        """
        if self.version != "v1" or tools or any(_with_tools(m) for m in messages):
            return self._encode_with_mistral_common(messages, tools)
        turns = _validated([_as_message(m) for m in messages])
        system = MESSAGE_JOIN.join(m.content for m in turns if m.role == "system" and m.content)
        merged = _merge_runs(turns)
        if not merged or merged[0].role != "user":
            merged.insert(0, ChatMessage("user", ""))
        ids = [self.bos_id]
        for i, m in enumerate(merged):
            if m.role == "user":
                content = system + MESSAGE_JOIN + m.content if i == 0 and system else m.content
                ids += self.encode(f"[INST] {content} [/INST]", bos=False)
            else:
                final = i == len(merged) - 1
                ids += self.encode(m.content, bos=False) + ([] if final else [self.eos_id])
        return ids


    def _encode_with_mistral_common(self, messages: Sequence[Mapping[str, Any] | Any],
                                    tools: Sequence[Mapping[str, Any]] | None) -> list[int]:
        """mistral-common's own encoding; a final assistant message is a prefix to continue (as vLLM)."""
        dicts = [dict(m) if isinstance(m, Mapping) else vars(m) for m in messages]
        final = bool(dicts) and dicts[-1].get("role") == "assistant"
        try:
            tool_dicts = [dict(t) for t in tools] if tools else None
            request = ChatCompletionRequest.from_openai(dicts, tools=tool_dicts, continue_final_message=final)
            ids: list[int] = self.mistral.encode_chat_completion(request).tokens
        except (MistralCommonException, ValueError, TypeError, KeyError) as e:
            raise ValueError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
        return ids


def _with_tools(message: Mapping[str, Any] | Any) -> bool:
    get = message.get if isinstance(message, Mapping) else lambda k: getattr(message, k, None)
    return get("role") == "tool" or bool(get("tool_calls"))


def _as_message(message: Mapping[str, Any] | Any) -> ChatMessage:
    if isinstance(message, Mapping):
        role, content = message.get("role"), message.get("content")
    else:
        role, content = getattr(message, "role", None), getattr(message, "content", None)
    if role not in ROLES:
        raise ValueError(f"unsupported message role {role!r}: expected one of {', '.join(ROLES)}")
    if content is None and role == "system":
        raise ValueError("a system message must have content")
    if content is not None and not isinstance(content, str):
        raise ValueError(f"{role} message content must be a string, got {type(content).__name__}")
    return ChatMessage(role, content or "")


def _validated(messages: list[ChatMessage]) -> list[ChatMessage]:
    """mistral-common's structure checks (validator.py) that apply to text-only v1 conversations."""
    if not messages:
        raise ValueError("the conversation must have at least one message")
    if len(messages) == 1 and messages[0].role == "assistant":
        raise ValueError("the conversation must start with a user message or system message")
    for before, after in zip(messages, messages[1:], strict=False):
        if before.role == "assistant" and after.role == "system":
            raise ValueError("unexpected role 'system' after role 'assistant'")
    for m in messages:
        if m.role == "assistant" and not m.content:
            raise ValueError("an assistant message must have content")
    return messages


def _merge_runs(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Merge consecutive user (or assistant) messages; system messages drop out but split runs."""
    merged: list[ChatMessage] = []
    previous = ""
    for m in messages:
        if m.role != "system" and m.role == previous:
            parts = [p for p in (merged[-1].content, m.content) if p]
            merged[-1] = ChatMessage(m.role, MESSAGE_JOIN.join(parts))
        elif m.role != "system":
            merged.append(m)
        previous = m.role
    return merged


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas whose concatenation (after `flush`) equals
    `decode(prompt + generated)` minus `decode(prompt)`, and `decode(generated)` with no prompt.

    Each `add` decodes only the ids since the last released text plus a few before them
    (vLLM's prefix_offset / read_offset): O(1) per token, however long the sequence.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-(CONTEXT_TOKENS + 2) :])  # only the tail matters; never the caller's list
        self.read_offset = len(self.ids)  # ids before it are already released as text
        # A prompt that ends inside a character (ids sent by a client): its last bytes belong with
        # the generated ones that complete the character.
        while self.read_offset > len(self.ids) - 3 and self._ends_inside_a_character(self.read_offset):
            self.read_offset -= 1
        self.prefix_offset = max(self.read_offset - CONTEXT_TOKENS, 0)  # decoding starts here

    def _ends_inside_a_character(self, end: int) -> bool:
        return self.tokenizer.decode(self.ids[:end]).endswith(REPLACEMENT)

    def add(self, token_id: int) -> str:
        """The text that `token_id` completes; "" while a character is incomplete."""
        self.ids.append(token_id)
        prefix, text = self._decode_window()
        if len(text) <= len(prefix) or text.endswith(REPLACEMENT):
            return ""
        self._advance()
        return text[len(prefix) :]

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes as U+FFFD, as `decode` does)."""
        prefix, text = self._decode_window()
        self._advance()
        return text[len(prefix) :]

    def _decode_window(self) -> tuple[str, str]:
        window = self.ids[self.prefix_offset :]
        decode = self.tokenizer.decode
        return decode(window[: self.read_offset - self.prefix_offset]), decode(window)

    def _advance(self) -> None:
        """Release everything so far; keep a few ids of context, drop older ones."""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        drop = self.prefix_offset
        self.ids = self.ids[drop:]
        self.prefix_offset, self.read_offset = 0, self.read_offset - drop
