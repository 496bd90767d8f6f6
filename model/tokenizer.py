"""Tokenizer: sentencepiece over Mixtral's tokenizer, streaming detokenization, the v1 chat format.

The embedded default is the `tokenizer.model.v1` that mistral-common ships; a checkpoint's own
`tokenizer.model` wins. The chat format is Mixtral-Instruct's (mistral-common's v1 instruct
encoder): `<s>[INST] user [/INST] answer</s>[INST] user [/INST]`, where "[INST]" is plain text,
the system prompt(s) are folded into the first user turn ("system\\n\\nuser"), and consecutive
messages of one role are joined with "\\n\\n".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cached_property
from importlib import resources
from pathlib import Path

import sentencepiece as spm

JOIN = "\n\n"


def default_tokenizer_path() -> Path:
    return Path(str(resources.files("mistral_common") / "data" / "tokenizer.model.v1"))


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))

    @classmethod
    def load(cls, path: str | Path | None = None) -> Tokenizer:
        return cls(path or default_tokenizer_path())

    @classmethod
    def from_model_dir(cls, model_dir: str | Path | None) -> Tokenizer:
        for name in ("tokenizer.model", "tokenizer.model.v1"):
            if model_dir is not None and (Path(model_dir) / name).is_file():
                return cls(Path(model_dir) / name)
        return cls.load()

    @property
    def vocab_size(self) -> int:
        return int(self.sp.vocab_size())

    @property
    def bos_id(self) -> int:
        return int(self.sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids: list[int] = self.sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        return str(self.sp.decode(list(ids)))

    def id_to_piece(self, token_id: int) -> str:
        return str(self.sp.id_to_piece(token_id))

    @cached_property
    def _byte_tokens(self) -> frozenset[int]:
        return frozenset(i for i in range(self.vocab_size) if self.sp.is_byte(i))

    def token_text(self, token_id: int) -> str:
        """The token's surface text for logprobs (▁ as a space; byte tokens as `<0xE2>`)."""
        piece = self.id_to_piece(token_id)
        return piece if token_id in self._byte_tokens else piece.replace("\u2581", " ")

    def encode_chat(self, messages: Iterable[Mapping[str, str] | object]) -> list[int]:
        """Token ids of a conversation in the Mixtral v1 instruct format, ready for the reply."""
        system, turns = _normalize(messages)
        ids = [self.bos_id]
        for i, (role, content) in enumerate(turns):
            if role == "user":
                text = f"{system}{JOIN}{content}" if i == 0 and system else content
                ids += self.encode(f"[INST] {text} [/INST]", bos=False)
            else:
                ids += self.encode(content, bos=False) + [self.eos_id]
        return ids


def _normalize(messages: Iterable[Mapping[str, str] | object]) -> tuple[str, list[tuple[str, str]]]:
    """(system prompt, alternating user/assistant turns starting with user), as mistral-common does."""
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for m in messages:
        role, content = _field(m, "role"), _field(m, "content")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unsupported message role {role!r}: use system, user or assistant")
        if not isinstance(content, str):
            raise ValueError(f"message content must be a string, got {type(content).__name__}")
        if role == "system":
            system.append(content)
        elif turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + JOIN + content)
        else:
            turns.append((role, content))
    if not turns and not system:
        raise ValueError("the conversation has no messages")
    if not turns or turns[0][0] != "user":
        turns.insert(0, ("user", ""))
    if turns[-1][0] != "user":
        raise ValueError("the last message must be from the user")
    return JOIN.join(system), turns


def _field(message: Mapping[str, str] | object, name: str) -> object:
    return message.get(name) if isinstance(message, Mapping) else getattr(message, name, None)


class IncrementalDetokenizer:
    """Streams text deltas that never split a UTF-8 character (vLLM's prefix/read offsets).

    Text is decoded over a small window of recent tokens; a delta is released only once it no
    longer ends in U+FFFD (an incomplete byte sequence), so concatenated deltas equal `decode(all)`.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list((prompt_ids or [])[-4:])  # context for sentencepiece's leading space
        self.prefix_offset = self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end) as it decodes."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""
