"""Continuous-batching engine: admits requests between steps, chunks prefills, decodes together.

Each step runs the prefill chunks and decodes of all running sequences as one `StepBatch`
(optionally in two ping-pong halves, so one half's attention runs while the other's experts do),
samples every sequence at once, and streams `TokenEvent`s to each request's queue (requests
streamed together share one, so a step's tokens for all of them are read as one item). A finished
or cancelled sequence frees its KV blocks at once. No Ray here: the dispatcher wraps this engine
with an expert backend that calls the shards.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from moray.model.errors import QueueFullError, RequestError
from moray.model.kv_cache import BlockPool, KVCache
from moray.model.layers import StepBatch
from moray.model.mixtral import ExpertBackend, Mixtral
from moray.model.sampling import SamplingParams, SamplingTensors, sample, sample_rows, score, score_rows
from moray.model.structured import Constraint, ConstraintError, Grammars, TokenMasks
from moray.model.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from xgrammar import GrammarMatcher

log = logging.getLogger(__name__)

# The request ids in the step being computed, for expert backends that tag their calls (logs).
STEP_REQUESTS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "moray_step_requests", default=()
)


@dataclass
class GenerateRequest:
    """`generated`: a continuation (a stream resumed elsewhere) carries the tokens already delivered
    to the client. They are prefilled after the prompt and count as generated: sampling continues at
    index len(generated), `max_tokens` and usage count the whole request, stop strings see their
    text, and only the new tokens are streamed, with the text deltas the uninterrupted run sends."""

    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    generated: list[int] = field(default_factory=list)


@dataclass
class PromptLogprob:
    """A prompt token scored given the tokens before it: its log-probability, its rank in the vocabulary
    (1 = the most likely) and the k most likely tokens at its position (`prompt_logprobs` = k)."""

    token_id: int
    logprob: float
    rank: int
    top_logprobs: list[tuple[int, float]]


@dataclass
class TokenEvent:
    """`prompt_logprobs`: on a request's first event when its params ask for them, one per prompt token
    after the first (the first has nothing before it); None on every other event."""

    request_id: str
    token_id: int
    text: str
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    prompt_logprobs: list[PromptLogprob] | None = None


@dataclass
class EngineConfig:
    max_num_seqs: int = 32
    max_batch_tokens: int = 1024
    max_model_len: int | None = None  # None: the model's context
    block_size: int = 16
    num_blocks: int | None = None  # None: room for max_num_seqs sequences of up to 1024 tokens
    max_waiting: int = 256
    pingpong: bool = False
    prefix_caching: bool = True
    # Batch-invariant numerics and sampling: a request's tokens and logprobs do not depend on the other
    # requests of a step nor on prefill chunking (invariant.py). The model (and the experts) must be
    # built with the same flag. Slower; off = the fastest kernels.
    deterministic: bool = False


@dataclass
class StepTimes:
    """Seconds spent per phase, summed over steps (for `moray bench`)."""

    steps: int = 0
    tokens: int = 0
    attention: float = 0.0
    experts: float = 0.0
    sampling: float = 0.0
    total: float = 0.0


class Sequence:
    def __init__(self, request: GenerateRequest, tokenizer: Tokenizer, seed: int,
                 queue: asyncio.Queue[TokenEvent | BaseException],
                 matcher: GrammarMatcher | None = None) -> None:
        self.request = request
        self.matcher = matcher  # the grammar state of a constrained sequence (structured.py)
        self.params = request.params
        self.tokens = list(request.prompt_ids)
        self.prompt_len = len(self.tokens)
        self.seed = seed
        self.blocks: list[int] = []
        self.hashes: list[int] = []
        self.num_computed = 0
        self.queue = queue  # shared by the requests streamed together (`generate_steps`)
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids=self.tokens)
        self.text = ""
        self.emitted = 0  # chars of `text` already sent
        self.hold = max((len(s) for s in self.params.stop), default=1) - 1
        self.done = False
        # Scores of prompt tokens 1.. as prefill reaches them; a continuation already delivered them.
        wanted = self.params.prompt_logprobs is not None and not request.generated
        self.prompt_scores: list[PromptLogprob] | None = [] if wanted else None

    def prompt_rows(self, n: int) -> int:
        """How many of the next `n` positions to compute give the logits of a prompt token to score
        (position p scores token p + 1)."""
        if self.prompt_scores is None:
            return 0
        return max(0, min(self.num_computed + n, self.prompt_len - 1) - self.num_computed)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


class AsyncEngine:
    def __init__(
        self, model: Mixtral, experts: ExpertBackend, tokenizer: Tokenizer, config: EngineConfig
    ) -> None:
        if model.deterministic != config.deterministic:
            raise ValueError(
                f"EngineConfig.deterministic={config.deterministic} but the model was built with "
                f"deterministic={model.deterministic}"
            )
        self.model, self.experts, self.tokenizer, self.config = model, experts, tokenizer, config
        self.max_model_len = min(config.max_model_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        bs = config.block_size
        num_blocks = config.num_blocks or max(
            -(-self.max_model_len // bs), config.max_num_seqs * -(-min(self.max_model_len, 1024) // bs)
        )
        self.pool = BlockPool(num_blocks, bs, config.prefix_caching)
        self.kv = KVCache(model.cfg, num_blocks, bs, model.dtype, model.device)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.times = StepTimes()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._grammars: Grammars | None = None  # made in the background now (`_prepare_grammars`)
        self._grammars_lock = threading.Lock()
        self._grammars_thread = threading.Thread(target=self._prepare_grammars, name="moray-grammars",
                                                 daemon=True)
        self._grammars_thread.start()
        self._masks = TokenMasks(model.cfg.vocab_size)  # the constrained rows' bitmask, reused every step

    # ---- requests -------------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        steps = self.generate_steps([request])
        try:
            async for events in steps:
                for event in events:
                    yield event
        finally:
            await steps.aclose()  # type: ignore[attr-defined]  # an async generator

    async def generate_steps(self, requests: list[GenerateRequest]) -> AsyncIterator[list[TokenEvent]]:
        """Several requests as one stream: each item holds every event produced since the last one, so
        the tokens one step gives all of them (n > 1 choices, a batch of prompts) travel together."""
        queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        seqs: list[Sequence] = []
        matchers = [await self._matcher(r.params.constraint) for r in requests]  # before anything queues
        try:
            for request, matcher in zip(requests, matchers, strict=True):
                seqs.append(self._submit(request, queue, matcher))
            live = len(seqs)
            while live:
                items = [await queue.get()]
                while not queue.empty():  # the rest of the step (or steps) already done
                    items.append(queue.get_nowait())
                events: list[TokenEvent] = []
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    events.append(item)
                    live -= item.finish_reason is not None
                yield events
        finally:
            for seq in seqs:
                if not seq.done:
                    self._finish(seq)

    async def _matcher(self, constraint: Constraint | None) -> GrammarMatcher | None:
        """A constrained request's grammar matcher, compiled (or found in the cache) in a thread, before
        anything is queued: a bad schema or regex is a `RequestError`."""
        if constraint is None:
            return None
        try:
            return await asyncio.to_thread(lambda: self.grammars().matcher(constraint))
        except ConstraintError as e:
            raise RequestError(str(e)) from None

    def _prepare_grammars(self) -> None:
        """Build xgrammar's view of the vocabulary (~40 ms for 32768 tokens) before any request needs it:
        a first constrained request then pays only its own grammar's compile."""
        try:
            self.grammars()
        except Exception:  # noqa: BLE001 - the first constrained request builds it again and gets the error
            log.warning("could not prepare constrained decoding", exc_info=True)

    def grammars(self) -> Grammars:
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.model.cfg.vocab_size)
            return self._grammars

    def _submit(self, request: GenerateRequest, queue: asyncio.Queue[TokenEvent | BaseException],
                matcher: GrammarMatcher | None = None) -> Sequence:
        n, p = len(request.prompt_ids), request.params
        if n == 0:
            raise RequestError("the prompt is empty")
        if n + p.max_tokens > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n + p.max_tokens} tokens ({n} in the prompt, {p.max_tokens} for the completion)."
            )
        if self.pool.blocks_needed(n + p.max_tokens) > self.pool.num_blocks:
            raise RequestError(
                f"the request needs {n + p.max_tokens} tokens of KV cache; the pool holds "
                f"{self.pool.num_blocks * self.pool.block_size}"
            )
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests are already waiting")
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        seed = p.seed if p.seed is not None else secrets.randbits(62)
        seq = Sequence(request, self.tokenizer, seed, queue, matcher)
        self._replay(seq, request.generated)
        self.waiting.append(seq)
        self._ensure_loop()
        return seq

    def _replay(self, seq: Sequence, delivered: list[int]) -> None:
        """Take a continuation's delivered tokens as generated, silently: text, stop-string search and
        emitted text end where the uninterrupted run had them after its last delivered event."""
        vocab = self.model.cfg.vocab_size
        if len(delivered) >= seq.params.max_tokens:
            raise RequestError(
                f"{len(delivered)} tokens already generated: max_tokens is {seq.params.max_tokens}"
            )
        if any(not 0 <= t < vocab for t in delivered):
            raise RequestError(f"generated token ids must be in [0, {vocab})")
        for token in delivered:
            if self._extend(seq, token)[1] is not None:
                raise RequestError("the generated tokens already end the request (a stop token or string)")

    def _finish(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Free a finished or cancelled sequence's blocks at once."""
        seq.done = True
        log.info("request %s %s after %d tokens", seq.request.request_id, reason, seq.generated)
        if seq in self.running:
            self.running.remove(seq)
            self.pool.release(seq.blocks)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    # ---- the loop -------------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wake = asyncio.Event()  # bound to this loop (a new asyncio.run gets a new loop)
            self._task = loop.create_task(self._loop())
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            sched = self._schedule()
            if not sched:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._step(sched)
            except Exception as e:  # noqa: BLE001 - a failed step fails its sequences, not the engine
                log.exception("engine step failed")
                for seq, _ in sched:
                    if not seq.done:
                        self._finish(seq)
                        seq.queue.put_nowait(e)
            await asyncio.sleep(0)  # let new requests and cancellations in between steps

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """Decodes first, then prefill chunks, then new sequences, within `max_batch_tokens`."""
        budget = self.config.max_batch_tokens
        sched: list[tuple[Sequence, int]] = []
        for seq in sorted(self.running, key=lambda s: len(s.tokens) - s.num_computed):
            n = min(len(seq.tokens) - seq.num_computed, budget)
            if n > 0:
                sched.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            # A request scoring its prompt needs the logits of every position: no cached prefix.
            reuse = seq.prompt_scores is None
            alloc = self.pool.allocate(seq.tokens, seq.prompt_len + seq.params.max_tokens, reuse=reuse)
            if alloc is None:
                break
            self.waiting.popleft()
            seq.blocks, seq.hashes, seq.num_computed = alloc.blocks, alloc.hashes, alloc.cached_tokens
            log.info(
                "request %s admitted: %d prompt tokens (%d from the prefix cache), %d KV blocks",
                seq.request.request_id,
                seq.prompt_len,
                seq.num_computed,
                len(seq.blocks),
            )
            self.running.append(seq)
            n = min(len(seq.tokens) - seq.num_computed, budget)
            sched.append((seq, n))
            budget -= n
        return sched

    def _batch(self, sched: list[tuple[Sequence, int]]) -> StepBatch:
        bs = self.pool.block_size
        tokens: list[int] = []
        positions: list[int] = []
        seq_index: list[int] = []
        query_index: list[int] = []
        slots: list[int] = []
        logits_index: list[int] = []
        tables: list[list[int]] = []
        for row, (seq, n) in enumerate(sched):
            pos = list(range(seq.num_computed, seq.num_computed + n))
            start = len(tokens)
            tokens += seq.tokens[pos[0] : pos[-1] + 1]
            positions += pos
            seq_index += [row] * n
            query_index += list(range(n))
            slots += [seq.blocks[p // bs] * bs + p % bs for p in pos]
            tables.append(seq.blocks[: self.pool.blocks_needed(pos[-1] + 1)])
            logits_index += range(start, start + seq.prompt_rows(n))
            if pos[-1] + 1 == len(seq.tokens):
                logits_index.append(start + n - 1)
        width = max(len(t) for t in tables)

        def long(values: list[int] | list[list[int]]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long)

        return StepBatch(
            tokens=long(tokens),
            positions=long(positions),
            seq_index=long(seq_index),
            query_index=long(query_index),
            slot_mapping=long(slots),
            block_tables=long([t + [t[0]] * (width - len(t)) for t in tables]),
            logits_index=long(logits_index),
            max_query=max(n for _, n in sched),
        ).to(self.model.device)

    async def _step(self, sched: list[tuple[Sequence, int]]) -> None:
        t0 = time.perf_counter()
        expert_s = [0.0]

        async def timed_experts(
            layer: int, x: torch.Tensor, ids: torch.Tensor, g: torch.Tensor
        ) -> torch.Tensor:
            t = time.perf_counter()
            y = await self.experts(layer, x, ids, g)
            expert_s[0] += time.perf_counter() - t
            return y

        halves = [sched]
        if self.config.pingpong and len(sched) > 1:
            halves = [sched[: len(sched) // 2], sched[len(sched) // 2 :]]

        async def forward(half: list[tuple[Sequence, int]]) -> torch.Tensor:
            STEP_REQUESTS.set(tuple(seq.request.request_id for seq, _ in half))  # this task's context only
            return await self.model.forward_step(self._batch(half), self.kv, timed_experts)

        parts = await asyncio.gather(*(forward(h) for h in halves))
        # [N, V]: per sequence in sched order, its prompt rows to score (`_batch`), then its sampling row
        logits = torch.cat(list(parts))
        t1 = time.perf_counter()
        sampling, rows, row = [], [], 0
        for seq, n in sched:
            scored = seq.prompt_rows(n)
            if scored:
                self._score_prompt(seq, logits[row : row + scored])
                row += scored
            seq.num_computed += n
            self._register_prefix(seq)
            if seq.num_computed == len(seq.tokens):
                sampling.append(seq)
                rows.append(row)
                row += 1
        if sampling:
            self._sample(sampling, logits if len(rows) == len(logits) else logits[rows])
        t2 = time.perf_counter()
        tm = self.times
        tm.steps += 1
        tm.tokens += sum(n for _, n in sched)
        tm.experts += expert_s[0]
        tm.attention += (t1 - t0) - expert_s[0]
        tm.sampling += t2 - t1
        tm.total += t2 - t0

    def _register_prefix(self, seq: Sequence) -> None:
        for j in range(min(seq.num_computed // self.pool.block_size, len(seq.hashes))):
            self.pool.register(seq.blocks[j], seq.hashes[j])

    def _score_prompt(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Score the prompt tokens after positions num_computed.. from their logits [P, V]."""
        assert seq.prompt_scores is not None and seq.params.prompt_logprobs is not None
        start, k = seq.num_computed + 1, seq.params.prompt_logprobs
        targets = torch.tensor(seq.tokens[start : start + len(logits)], device=logits.device)
        out = (score_rows if self.config.deterministic else score)(logits, targets, k)
        top = zip(out.top_ids.tolist(), out.top_logprobs.tolist(), strict=True)
        rows = zip(targets.tolist(), out.logprobs.tolist(), out.ranks.tolist(), top, strict=True)
        seq.prompt_scores += [PromptLogprob(t, lp, rank, list(zip(ids, lps, strict=True)))
                              for t, lp, rank, (ids, lps) in rows]

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        constrained = [i for i, s in enumerate(seqs) if s.matcher is not None and not s.done]
        self._masks.apply(logits, constrained, [seqs[i].matcher for i in constrained])  # type: ignore[misc]
        params = [s.params for s in seqs]
        tensors = SamplingTensors.from_params(
            params, [s.seed for s in seqs], [s.generated for s in seqs], logits.device
        )
        num_logprobs = max((p.logprobs or 0 for p in params), default=0)
        wanted = any(p.logprobs is not None for p in params)  # else no log-softmax at all
        out = (sample_rows if self.config.deterministic else sample)(logits, tensors, num_logprobs, wanted)
        ids, lps = out.token_ids.tolist(), out.logprobs.tolist()
        top_ids, top_lps = out.top_ids.tolist(), out.top_logprobs.tolist()
        for i, seq in enumerate(seqs):
            if seq.done:  # cancelled while the step ran
                continue
            k = seq.params.logprobs
            top = list(zip(top_ids[i][:k], top_lps[i][:k], strict=False)) if k is not None else None
            self._append(seq, ids[i], lps[i] if k is not None else None, top)

    def _append(
        self, seq: Sequence, token: int, logprob: float | None, top: list[tuple[int, float]] | None
    ) -> None:
        delta, finish = self._extend(seq, token)
        prompt, seq.prompt_scores = seq.prompt_scores, None  # sent once, with the first token
        seq.queue.put_nowait(
            TokenEvent(
                seq.request.request_id, token, delta, logprob, top, finish, seq.prompt_len, seq.generated,
                prompt,
            )
        )
        if finish is not None:
            self._finish(seq, f"finished ({finish})")

    def _extend(self, seq: Sequence, token: int) -> tuple[str, str | None]:
        """Add a generated token: (the text to send with it, the finish reason or None)."""
        seq.tokens.append(token)
        p, finish = seq.params, None
        if (token == self.model.cfg.eos_id and not p.ignore_eos) or token in p.stop_token_ids:
            finish = "stop"
        elif seq.matcher is not None and self._grammar_ends(seq, token):
            finish = "stop"
        else:
            seq.text += seq.detok.add(token)
            cut = self._stop_index(seq)
            if cut is not None:
                seq.text, finish = seq.text[:cut], "stop"
        if finish is None and (seq.generated >= p.max_tokens or len(seq.tokens) >= self.max_model_len):
            finish = "length"
            seq.text += seq.detok.flush()
        end = len(seq.text) if finish else max(seq.emitted, len(seq.text) - seq.hold)
        delta, seq.emitted = seq.text[seq.emitted : end], end
        return delta, finish

    @staticmethod
    def _grammar_ends(seq: Sequence, token: int) -> bool:
        """Advance a constrained sequence's matcher: True once its grammar has ended (it took EOS), or
        if the token breaks the grammar (only tokens a resumed stream brings can: sampled ones are masked)."""
        assert seq.matcher is not None
        if not seq.matcher.accept_token(token):
            log.error("request %s: token %d does not match its constraint", seq.request.request_id, token)
            return True
        return bool(seq.matcher.is_terminated())

    @staticmethod
    def _stop_index(seq: Sequence) -> int | None:
        """Where the first stop string starts, searching only where a new match can begin."""
        start = max(0, seq.emitted - seq.hold)
        hits = [i for s in seq.params.stop if (i := seq.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    # ---- introspection --------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        return {
            "waiting": len(self.waiting),
            "running": len(self.running),
            "kv_blocks_used": self.pool.num_used,
            "kv_blocks_free": self.pool.num_free,
            "kv_blocks_total": self.pool.num_blocks,
            "prefix_cache_hits": self.pool.hits,
            **{f"time_{k}": v for k, v in vars(self.times).items()},
        }
