"""The attention side of a decode step (every layer's attention half + the lm_head, no experts) on the small
preset, in process: the product's eager `Mixtral.attention` against the same glue (norms, RoPE, KV write,
paged attention, residual, router) compiled by inductor around the product's matmuls.

    python attention_compile.py BATCH [THREADS] [eager|static|dynamic] [--prof]

Prints the first step's time (the compile) and the p50 / min of 40 steps."""

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moray.model.kv_cache import KVCache
from moray.model.layers import StepBatch, apply_rope, linear, rms_norm
from moray.model.mixtral import load_local
from moray.model.tiny import SMALL, make_tiny

B = int(sys.argv[1]) if len(sys.argv) > 1 else 1
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
mode = sys.argv[3] if len(sys.argv) > 3 else "eager"
ckpt = Path("/tmp/attention_compile/small")
if not (ckpt / "config.json").exists():
    make_tiny(ckpt, SMALL)
model, _ = load_local(ckpt)
cfg = model.cfg
ctx, bs = 96, 16  # each sequence has 96 tokens cached and decodes its 97th
nb = -(-(ctx + 1) // bs)
kv = KVCache(cfg, num_blocks=B * nb, block_size=bs, dtype=torch.float32, device="cpu")
tables = [list(range(i * nb, (i + 1) * nb)) for i in range(B)]
batch = StepBatch(
    tokens=torch.randint(3, cfg.vocab_size, (B,)), positions=torch.full((B,), ctx),
    seq_index=torch.arange(B), query_index=torch.zeros(B, dtype=torch.long),
    slot_mapping=torch.tensor([t[ctx // bs] * bs + ctx % bs for t in tables]),
    block_tables=torch.tensor(tables), logits_index=torch.arange(B), max_query=1)


def mid(qkv, cos, sin, slots, k_cache, v_cache, tables, positions, H: int, K: int, d: int):
    T = qkv.shape[0]
    qk = apply_rope(qkv[:, : (H + K) * d].view(T, H + K, d), cos, sin)
    q, k = qk.split([H, K], dim=1)
    k_cache.view(-1, K, d)[slots] = k
    v_cache.view(-1, K, d)[slots] = qkv[:, (H + K) * d:].view(T, K, d)
    keys = k_cache[tables].flatten(1, 2).transpose(1, 2)
    values = v_cache[tables].flatten(1, 2).transpose(1, 2)
    mask = torch.arange(keys.shape[2]) <= positions[:, None]
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask[:, None, None],
                                         enable_gqa=True)
    return out.reshape(T, H * d)


def post(h, o, w, eps: float, gate, top_k: int):
    h = h + o
    x = rms_norm(h, w, eps)
    top, ids = torch.topk(F.linear(x, gate).float(), top_k, dim=-1)
    return h, x, ids, torch.softmax(top, dim=-1).to(x.dtype)


if mode != "eager":
    pre_c, mid_c, post_c = (torch.compile(f, dynamic=mode == "dynamic") for f in (rms_norm, mid, post))


def layer_compiled(layer: int, h: torch.Tensor) -> torch.Tensor:
    p = f"layers.{layer}."
    qkv = linear(pre_c(h, model.w(p + "attn_norm"), cfg.norm_eps), model.lin(p + "wqkv"))
    a = mid_c(qkv, model.cos[batch.positions], model.sin[batch.positions], batch.slot_mapping, kv.k[layer],
              kv.v[layer], batch.block_tables, batch.positions, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
    return post_c(h, linear(a, model.lin(p + "wo")), model.w(p + "ffn_norm"), cfg.norm_eps,
                  model.w(p + "gate"), cfg.top_k)[0]


def step() -> torch.Tensor:
    h = model.embed(batch.tokens)
    for layer in range(cfg.n_layers):
        h = model.attention(layer, h, batch, kv).h if mode == "eager" else layer_compiled(layer, h)
    return model.logits(h[batch.logits_index])


with torch.no_grad():
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    for _ in range(5):
        step()
    times = []
    for _ in range(40):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(f"{mode} B={B}: first step {first:.2f} s, p50 {statistics.median(times) * 1e3:.2f} ms, "
          f"min {min(times) * 1e3:.2f} ms")
    if "--prof" in sys.argv:
        with torch.profiler.profile() as prof:
            for _ in range(10):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
