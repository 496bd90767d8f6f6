"""Constrained decoding in the engine: outputs match their grammar (jsonschema / re as oracles), batched
unconstrained rows are untouched, bad constraints fail before queueing, resumed streams keep the grammar."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
import xgrammar as xgr

from moray.model.engine import AsyncEngine, EngineConfig, GenerateRequest, RequestError, TokenEvent
from moray.model.mixtral import load_local
from moray.model.sampling import SamplingParams
from moray.model.structured import Constraint, Grammars, TokenMasks
from moray.model.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
REGEX = r"\d{3}-[a-z]{2,4}"
CHOICES = ["yes", "no", "maybe"]
GRAMMAR = 'root ::= "(" [0-9] ("+" [0-9])* ")"'


def make_engine(ckpt: Path) -> AsyncEngine:
    model, experts = load_local(ckpt)
    cfg = EngineConfig(block_size=4, max_batch_tokens=64, max_model_len=256)
    return AsyncEngine(model, experts, Tokenizer.from_model_dir(ckpt), cfg)


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> AsyncEngine:
    return make_engine(tiny_dir)


def run(engine: AsyncEngine, *reqs: GenerateRequest) -> list[list[TokenEvent]]:
    async def one(r: GenerateRequest) -> list[TokenEvent]:
        return [e async for e in engine.generate(r)]

    async def together() -> list[list[TokenEvent]]:
        return await asyncio.gather(*(one(r) for r in reqs))

    return asyncio.run(together())


def text(events: list[TokenEvent]) -> str:
    return "".join(e.text for e in events)


def check(constraint: Constraint, out: str) -> None:
    """The outside oracle for each kind of constraint."""
    if constraint.kind == "json":
        jsonschema.validate(json.loads(out), json.loads(constraint.spec))
    elif constraint.kind == "regex":
        assert re.fullmatch(constraint.spec, out), out
    elif constraint.kind == "choice":
        assert out in json.loads(constraint.spec)
    else:
        assert re.fullmatch(r"\(\d(\+\d)*\)", out), out


CONSTRAINTS = [Constraint.json_schema(SCHEMA), Constraint("regex", REGEX), Constraint.choice(CHOICES),
               Constraint("grammar", GRAMMAR)]


def test_outputs_match_and_free_rows_are_untouched(engine: AsyncEngine) -> None:
    """Greedy and sampled requests under each kind of constraint share the batch with a free one, whose
    tokens equal its tokens alone; every constrained output completes its grammar (finish "stop" at EOS)."""
    tok = engine.tokenizer
    free = GenerateRequest(tok.encode("Once upon a time"), SamplingParams(max_tokens=12, temperature=0))
    alone = run(engine, free)[0]
    reqs = [GenerateRequest(tok.encode(f"prompt {i}"), SamplingParams(
        max_tokens=64, temperature=t, seed=i, top_p=p, constraint=c, logprobs=1))
        for i, c in enumerate(CONSTRAINTS) for t, p in [(0.0, 1.0), (0.8, 0.9)]]
    *constrained, batched = run(engine, *reqs, GenerateRequest(free.prompt_ids, free.params))
    assert [e.token_id for e in batched] == [e.token_id for e in alone]
    for req, events in zip(reqs, constrained, strict=True):
        assert events[-1].finish_reason == "stop"
        assert events[-1].token_id == tok.eos_id
        assert all(e.logprob is not None and e.logprob > float("-inf") for e in events)
        assert req.params.constraint is not None
        check(req.params.constraint, text(events))


def test_length_cut_is_reported(engine: AsyncEngine) -> None:
    params = SamplingParams(max_tokens=3, temperature=0, constraint=Constraint.json_schema(SCHEMA))
    (events,) = run(engine, GenerateRequest(engine.tokenizer.encode("x"), params))
    assert events[-1].finish_reason == "length" and len(events) == 3
    with pytest.raises(json.JSONDecodeError):
        json.loads(text(events))


@pytest.mark.parametrize("constraint", [
    Constraint("regex", "(ab"), Constraint("json", '{"type": "foo"}'), Constraint("json", "{not json"),
    Constraint("grammar", "root ::= undefined_rule")], ids=["regex", "schema", "json", "grammar"])
def test_bad_constraint_fails_before_queueing(engine: AsyncEngine, constraint: Constraint) -> None:
    request = GenerateRequest([1, 2, 3], SamplingParams(max_tokens=4, constraint=constraint))
    with pytest.raises(RequestError, match=f"invalid {constraint.kind} constraint: .+"):
        run(engine, request)
    assert engine.stats()["waiting"] == engine.stats()["running"] == 0


def test_resumed_stream_continues_the_grammar(engine: AsyncEngine) -> None:
    """A continuation carrying the delivered tokens re-advances its matcher: the rest equals the
    uninterrupted run's rest, and a delivered token the grammar refuses is a RequestError."""
    params = SamplingParams(max_tokens=64, temperature=0.7, seed=5, constraint=Constraint.json_schema(SCHEMA))
    prompt = engine.tokenizer.encode("resume me")
    (whole,) = run(engine, GenerateRequest(prompt, params))
    ids = [e.token_id for e in whole]
    (rest,) = run(engine, GenerateRequest(prompt, params, generated=ids[:4]))
    assert [e.token_id for e in rest] == ids[4:]
    assert text(whole).startswith(engine.tokenizer.decode(ids[:4]))
    with pytest.raises(RequestError):
        run(engine, GenerateRequest(prompt, params, generated=engine.tokenizer.encode("no", bos=False)))


def test_the_vocabulary_is_prepared_before_any_request(tiny_dir: Path) -> None:
    """A new engine builds xgrammar's view of the vocabulary in the background: the first constrained
    request only compiles its own grammar."""
    fresh = make_engine(tiny_dir)
    fresh._grammars_thread.join(timeout=120)
    assert fresh._grammars is not None and fresh._grammars.compiled == 0


def test_grammars_compile_once_and_mask_only_their_rows(tiny_dir: Path) -> None:
    tok = Tokenizer.from_model_dir(tiny_dir)
    grammars = Grammars(tok, vocab_size=tok.vocab_size + 64, cache_size=2)  # a padded model vocabulary
    choice = Constraint.choice(CHOICES)
    assert grammars.compile(choice) is grammars.compile(choice)
    assert grammars.compiled == 1
    for spec in ("a+", "b+", "c+"):
        grammars.compile(Constraint("regex", spec))
    assert len(grammars.cache) == 2 and choice not in grammars.cache  # least recently used dropped
    logits = torch.randn(3, grammars.vocab_size)
    before = logits.clone()
    TokenMasks(grammars.vocab_size).apply(logits, [1], [grammars.matcher(choice)])
    assert torch.equal(logits[[0, 2]], before[[0, 2]])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(i < tok.vocab_size for i in allowed)  # padding ids never allowed
    assert not any(tok.sp.is_control(i) or tok.sp.is_unknown(i) for i in allowed)
    firsts = {tok.decode([i]) for i in allowed}
    assert all(any(c.startswith(f) for c in CHOICES) for f in firsts)
    assert {"y", "n", "m"} <= {f[:1] for f in firsts}


@pytest.mark.parametrize("threads", [1, 2], ids=["this-thread", "batched"])
def test_masks_equal_xgrammars_own_kernel(tiny_dir: Path, threads: int) -> None:
    """The engine's masks (a reused, growing bitmask; the CPU apply by unpacked bits) against xgrammar's own
    fill and kernel on a fresh bitmask: all rows in order, some rows out of order, a padded vocabulary,
    matchers mid-string (most tokens allowed) and mid-structure (few allowed)."""
    tok = Tokenizer.from_model_dir(tiny_dir)
    grammars = Grammars(tok, vocab_size=tok.vocab_size + 64)
    prefixes = ['{"age": 4, "name": "ab', "12", "ye", "(1+", ""]  # the last at its start

    def matcher(i: int) -> xgr.GrammarMatcher:  # a row's own matcher, as each sequence has
        m = grammars.matcher(CONSTRAINTS[i % len(CONSTRAINTS)])
        if prefixes[i]:
            assert m.accept_string(prefixes[i])
        return m

    masks = TokenMasks(grammars.vocab_size, threads=threads)
    generator = torch.Generator().manual_seed(7)
    for batch, rows in [(2, [1, 0]), (5, [0, 1, 2, 3, 4]), (8, [6, 0, 3]), (8, [2, 7, 5, 1])]:
        chosen = [matcher(r % len(prefixes)) for r in rows]
        logits = torch.randn(batch, grammars.vocab_size, generator=generator)
        expected = logits.clone()
        bitmask = xgr.allocate_token_bitmask(batch, grammars.vocab_size)
        for row, m in zip(rows, chosen, strict=True):
            m.fill_next_token_bitmask(bitmask, row)
        xgr.apply_token_bitmask_inplace(expected, bitmask, indices=rows)
        masks.apply(logits, rows, chosen)
        assert torch.equal(logits, expected), (batch, rows)
    assert masks.bitmask.shape[0] >= 8


def test_a_matcher_on_two_rows_is_filled_one_row_at_a_time(tiny_dir: Path) -> None:
    """xgrammar's threaded fill advances each matcher in its own thread: given one matcher for two rows it
    races (a segfault, seen once in a full run). `TokenMasks` fills such a step row by row, with the same
    masks."""
    tok = Tokenizer.from_model_dir(tiny_dir)
    grammars = Grammars(tok, vocab_size=tok.vocab_size)
    shared = grammars.matcher(CONSTRAINTS[0])
    assert shared.accept_string('{"age": 4, "name": "ab')
    rows = [0, 1, 2, 3]
    chosen = [shared, grammars.matcher(CONSTRAINTS[1]), shared, shared]
    logits = torch.randn(4, grammars.vocab_size, generator=torch.Generator().manual_seed(3))
    expected = logits.clone()
    TokenMasks(grammars.vocab_size, threads=1).apply(expected, rows, chosen)
    for _ in range(50):  # the race shows in some tries only
        got = logits.clone()
        TokenMasks(grammars.vocab_size, threads=2).apply(got, rows, chosen)
        assert torch.equal(got, expected)
