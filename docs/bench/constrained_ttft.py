"""CPU cost (thread time, one core) of what a new schema's first token waits for: the vocabulary view
(once per engine: before, on the first constrained request's path; now at engine start) and the compile.

    python docs/bench/constrained_ttft.py > docs/bench/constrained-ttft.json
"""
import copy
import json
import statistics
import time

import xgrammar as xgr

from moray.deploy.bench.workload import BENCH_SCHEMA
from moray.model import structured
from moray.model.tiny import PRESETS, default_model_dir
from moray.model.tokenizer import Tokenizer

tok = Tokenizer.from_model_dir(default_model_dir(PRESETS["tiny"]))  # `moray bench --preset tiny`'s
V = 32768


def per_id(tokenizer: Tokenizer, vocab_size: int) -> xgr.TokenizerInfo:
    """main's `tokenizer_info` before (a80572c): two sentencepiece calls per id."""
    sp = tokenizer.sp
    pieces = ["" if sp.is_control(i) or sp.is_unknown(i) else tokenizer.id_to_piece(i)
              for i in range(tokenizer.vocab_size)]
    return xgr.TokenizerInfo(pieces, xgr.VocabType.BYTE_FALLBACK, vocab_size=vocab_size,
                             stop_token_ids=[tokenizer.eos_id], add_prefix_space=True)


out: dict[str, list[float]] = {}
for name, fn in [("vocabulary_per_id_ms", per_id), ("vocabulary_batched_ms", structured.tokenizer_info)]:
    ts = []
    for _ in range(5):
        t = time.thread_time()
        fn(tok, V)
        ts.append((time.thread_time() - t) * 1e3)
    out[name] = ts
a, b = per_id(tok, V), structured.tokenizer_info(tok, V)
assert a.decoded_vocab == b.decoded_vocab and a.special_token_ids == b.special_token_ids
g = structured.Grammars(tok, V)
ts = []
for k in range(10):
    schema = copy.deepcopy(BENCH_SCHEMA)
    schema["properties"]["name"]["maxLength"] = 20 + k  # a new schema each time
    c = structured.Constraint.json_schema(schema)
    t = time.process_time()  # compile may use xgrammar's threads: all of the process's CPU
    g.compile(c)
    ts.append((time.process_time() - t) * 1e3)
out['compile_new_schema_ms'] = ts
t = time.thread_time()
g.matcher(c)
out["matcher_cached_ms"] = [(time.thread_time() - t) * 1e3]
print(json.dumps({k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in out.items()},
                 indent=1))
