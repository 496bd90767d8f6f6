"""Logprobs shaped as the API returns them: completions' legacy lists (echoed prompt rows included),
chat's `content` entries and vLLM's `prompt_logprobs`, from the engine's token events and prompt scores."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from moray.deploy.api.protocol import (
    ChatLogprobs,
    ChatLogprobToken,
    CompletionLogprobs,
    PromptLogprobs,
    PromptTokenLogprob,
    TokenLogprobs,
    TopLogprob,
)

if TYPE_CHECKING:
    from moray.model.engine import PromptLogprob, TokenEvent


def logprob_rows(events: Sequence[TokenEvent]) -> list[TokenLogprobs]:
    return [(e.token_id, e.logprob, e.top_logprobs) for e in events]


def prompt_rows(prompt_ids: Sequence[int], scores: Sequence[PromptLogprob], k: int) -> list[TokenLogprobs]:
    """The prompt's tokens as logprob rows (echo): the first has no logprob, the others their top k."""
    first: TokenLogprobs = (prompt_ids[0], None, None)
    return [first, *((s.token_id, s.logprob, s.top_logprobs[:k]) for s in scores)]


def prompt_logprobs(scores: Sequence[PromptLogprob], token_text: Callable[[int], str],
                    k: int) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: None for the first token, then {token id: {logprob, rank, decoded_token}}
    holding the prompt token and the k most likely tokens at its position."""
    out: PromptLogprobs = [None]
    for s in scores:
        entry = {s.token_id: PromptTokenLogprob(logprob=finite(s.logprob), rank=s.rank,
                                                decoded_token=token_text(s.token_id))}
        for rank, (t, lp) in enumerate(s.top_logprobs[:k], start=1):
            entry.setdefault(t, PromptTokenLogprob(logprob=finite(lp), rank=rank,
                                                   decoded_token=token_text(t)))
        out.append(entry)
    return out


def finite(logprob: float) -> float:
    """JSON has no -inf: clamp as vLLM does."""
    return max(logprob, -9999.0) if logprob == logprob else -9999.0


def token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def completion_logprobs(tokens: Sequence[TokenLogprobs], token_text: Callable[[int], str],
                        offset: int) -> CompletionLogprobs:
    """Completions' logprobs: each position's chosen token and a dict of the top-k plus the chosen one
    (a position without a logprob, the echoed prompt's first token, has null for both)."""
    out = CompletionLogprobs()
    for token_id, logprob, top in tokens:
        text = token_text(token_id)
        logprob = None if logprob is None else finite(logprob)
        out.tokens.append(text)
        out.token_logprobs.append(logprob)
        alternatives = {token_text(t): finite(lp) for t, lp in (top or [])}
        out.top_logprobs.append({**alternatives, text: logprob} if logprob is not None else None)
        out.text_offset.append(offset)
        offset += len(text)
    return out


def chat_logprobs(tokens: Sequence[TokenLogprobs], token_text: Callable[[int], str], k: int) -> ChatLogprobs:
    """Chat's logprobs: `content[{token, logprob, bytes, top_logprobs: [k alternatives]}]`."""
    content = []
    for token_id, logprob, top in tokens:
        text = token_text(token_id)
        alternatives = [TopLogprob(token=(t := token_text(i)), logprob=finite(lp), bytes=token_bytes(t))
                        for i, lp in (top or [])[:k]]
        content.append(ChatLogprobToken(token=text, logprob=finite(logprob if logprob is not None else 0.0),
                                        bytes=token_bytes(text), top_logprobs=alternatives))
    return ChatLogprobs(content=content)
