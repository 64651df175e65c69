#!/usr/bin/env python3
"""The generation baseline of the GPU benchmark: transformers' `generate` (multinomial sampling, a
dynamic KV cache) re-written in plain PyTorch, because the GPU machines have torch but no
transformers (nor numpy, which transformers needs, nor network to install them).

What it mirrors of transformers' GenerationMixin._sample on Qwen2ForCausalLM (5.x):
  - the prompts left-padded into one batch, expanded by num_return_sequences (repeat_interleave), with
    an attention mask and position ids = cumsum(mask) - 1 (padding at 1);
  - one prefill over the whole padded batch, then one decode step per token for every row;
  - DynamicCache: each layer's keys and values grow by torch.cat every step;
  - attention through SDPA with the padding mask (GQA through enable_gqa);
  - logits of the last position only (logits_to_keep=1), copied to float32, temperature 1 and no
    top-k/top-p (generate(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)), softmax, multinomial;
  - no eos: every row runs max_new_tokens (the benchmark's random weights never stop on their own).
Not mirrored: generate's per-call set-up (config validation, logits-processor lists) and its stop
checks, which cost host time only. The model is bench/torch_sft_baseline.py's Qwen2 (checked against
transformers by tests/reference/torch_baseline_reference_test.py); this loop's greedy ids are checked
against transformers' generate by tests/reference/hf_generate_baseline_reference_test.py.

    python3 bench/hf_generate_baseline.py --config bench/shapes/qwen2.5-1.5b.json --prompts PROMPTS.json \\
        [--device cuda] [--dtype bf16] [--json OUT.json]

PROMPTS.json is what `decode_bench --prompts-out` writes: {"samples": G, "new_tokens": N, "prompts": [[ids]...]}.
Prints one result line: generated tokens, seconds (a warm-up call first, then one timed call with a
device sync at its end) and tokens/s.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.dont_write_bytecode = True  # no __pycache__ beside the sources
sys.path.insert(0, str(ROOT / "bench"))
from gpu_sft_bench import baseline_module as model_module  # noqa: E402  (bench/torch_sft_baseline.py's Qwen2)


def layer_step(mod, layer, x, cos, sin, cache, mask):
    """One decoder layer over x (B, T, H) with `cache` = [k, v] (B, kv_heads, S, d) or [None, None]."""
    attn = layer.self_attn
    B, T, _ = x.shape
    d = attn.cfg.head_dim
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(B, T, -1, d).transpose(1, 2)
    k = attn.k_proj(h).view(B, T, -1, d).transpose(1, 2)
    v = attn.v_proj(h).view(B, T, -1, d).transpose(1, 2)
    c, s = cos[:, None], sin[:, None]
    q = q * c + mod.rotate_half(q) * s
    k = k * c + mod.rotate_half(k) * s
    if cache[0] is not None:  # DynamicLayer.update: torch.cat along the sequence
        k = torch.cat([cache[0], k], dim=-2)
        v = torch.cat([cache[1], v], dim=-2)
    cache[0], cache[1] = k, v
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    x = x + attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def forward_cached(mod, model, ids, positions, attention_mask, caches):
    """Logits (B, V) of the last position; `attention_mask` (B, S_total) over the cache + ids."""
    B, T = ids.shape
    S = attention_mask.shape[1]
    # (B, 1, T, S) boolean: key j visible to query i when it is not padding and j <= S - T + i.
    q_pos = torch.arange(S - T, S, device=ids.device)[:, None]
    k_pos = torch.arange(S, device=ids.device)[None, :]
    mask = (k_pos <= q_pos)[None, None] & attention_mask[:, None, None, :].bool()
    # A left-padding query sees no key at all: let it see itself, so its row stays finite (transformers
    # un-masks such rows for SDPA too); no real query ever sees a padding key.
    mask = mask | (k_pos == q_pos)[None, None]
    x = model.model.embed_tokens(ids)
    cos, sin = mod.rope_cos_sin(model.cfg, positions, x.dtype)
    for layer, cache in zip(model.model.layers, caches):
        x = layer_step(mod, layer, x, cos, sin, cache, mask)
    return model.lm_head(model.model.norm(x[:, -1:]))[:, -1]  # logits_to_keep=1


@torch.no_grad()
def generate(mod, model, prompts, samples, new_tokens, pad_id=0, greedy=False, generator=None):
    """Token ids (len(prompts) * samples, new_tokens), rows in repeat_interleave order."""
    dev = model.lm_head.weight.device
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    am = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding (padding_side="left", as generation needs)
        ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
        am[i, L - len(p):] = 1
    ids = ids.to(dev).repeat_interleave(samples, dim=0)
    am = am.to(dev).repeat_interleave(samples, dim=0)
    caches = [[None, None] for _ in model.model.layers]
    positions = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)
    out = []
    step_ids = ids
    for t in range(new_tokens):
        logits = forward_cached(mod, model, step_ids, positions, am, caches).to(torch.float32)
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = F.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        out.append(nxt)
        step_ids = nxt[:, None]
        positions = positions[:, -1:] + 1
        am = torch.cat([am, am.new_ones((am.shape[0], 1))], dim=-1)
    return torch.stack(out, dim=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bf16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    mod = model_module()
    cfg = mod.Qwen2Config(json.loads(Path(a.config).read_text()))
    work = json.loads(Path(a.prompts).read_text())
    prompts, G, N = work["prompts"], int(work["samples"]), int(work["new_tokens"])
    with torch.device(dev):
        model = mod.Qwen2Model(cfg)
    model.init_weights(a.seed)
    model = model.to(dtype).eval()
    gen = torch.Generator(device=dev).manual_seed(a.seed)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    generate(mod, model, prompts[:2], 2, 8, generator=gen)  # warm-up: kernels, the allocator
    sync()
    t0 = time.time()
    ids = generate(mod, model, prompts, G, N, generator=gen)
    sync()
    dt = time.time() - t0
    tokens = ids.numel()
    res = {"rows": len(prompts) * G, "prompts": len(prompts), "samples": G, "new_tokens": N, "tokens": tokens,
           "seconds": dt, "tokens_per_s": tokens / dt, "device": str(dev), "dtype": str(dtype).replace("torch.", "")}
    if dev.type == "cuda":
        res["peak_allocated_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    print(f"hf_generate_baseline: {len(prompts)} prompts x {G} samples x {N} new tokens ({res['dtype']}, {dev}): "
          f"{tokens} tokens in {dt:.2f} s = {tokens / dt:.0f} tokens/s")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
