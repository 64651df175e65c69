#!/usr/bin/env python3
"""The SFT step of `ptk sft` in a plain PyTorch loop: the baseline the GPU benchmark prints beside ptk.

A self-contained Qwen2 decoder (no transformers: the GPU machines do not have it): nn.Linear
projections (biases on q/k/v as Qwen2 has them), RMSNorm and rotary embeddings computed as
transformers' Qwen2 computes them, attention through torch's scaled_dot_product_attention with
enable_gqa (no repeated K/V), SwiGLU MLP, tied or untied lm_head, token-mean cross-entropy. The
training step is the one ptk runs on CUDA: bf16 parameters, fp32 master weights and AdamW moments
(torch.optim.AdamW(fused=True) on the fp32 copies), micro-batches of packed rows, one optimizer step
per `--grad-accum` micro-batches. Each row is one document of `--seq` tokens (causal attention over
the row), so the FLOPs per token are those of ptk's benchmark data (one document per packed row).

    python3 bench/torch_sft_baseline.py --config bench/shapes/qwen2.5-0.5b.json --seq 4096 \\
        --grad-accum 4 --steps 5 --warmup 2 [--device cuda] [--dtype bf16] [--checkpointing]

prints one line per measured optimizer step and a result line:

    torch_sft_baseline: shape <config> seq 4096 ... | tokens/s 123456 | MFU 45.1% (...) | peak memory 30.20 GiB

MFU counts model FLOPs per token = 6 x (decoder matmul weights + the output layer V x H) +
6 x layers x heads x head_dim x seq (causal attention: QK^T and AV, forward and backward, half the
keys), over `--peak-tflops` (default: 989 on an H100 SXM / H200, bf16 dense; else the `--peak-tflops`
given; on a CPU no MFU). `mfu_mosaic` is the same throughput counted as MosaicML's llm-foundry
counts it (6 x every parameter + 12 x layers x hidden x seq, no causal halving), the count behind the
41.8%/46.4% figures issue 27 quotes. The model and the step are checked against transformers'
Qwen2ForCausalLM on a CPU by tests/reference/torch_baseline_reference_test.py.
"""
import argparse
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Qwen2Config:
    def __init__(self, d):
        self.vocab_size = d["vocab_size"]
        self.hidden_size = d["hidden_size"]
        self.intermediate_size = d["intermediate_size"]
        self.num_hidden_layers = d["num_hidden_layers"]
        self.num_attention_heads = d["num_attention_heads"]
        self.num_key_value_heads = d.get("num_key_value_heads", d["num_attention_heads"])
        self.head_dim = d.get("head_dim") or self.hidden_size // self.num_attention_heads
        self.rope_theta = float(d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
        self.rms_norm_eps = float(d.get("rms_norm_eps", 1e-6))
        self.tie_word_embeddings = bool(d.get("tie_word_embeddings", False))
        self.initializer_range = float(d.get("initializer_range", 0.02))


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):  # as transformers' Qwen2RMSNorm: the variance in fp32
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_cos_sin(cfg, positions, dtype):  # positions (B, T) int64 -> cos, sin (B, T, head_dim)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device=positions.device)
                                    .float() / cfg.head_dim))
    freqs = positions[..., None].float() * inv  # (B, T, head_dim / 2), fp32 as transformers computes it
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(H, cfg.num_attention_heads * d, bias=True)
        self.k_proj = nn.Linear(H, cfg.num_key_value_heads * d, bias=True)
        self.v_proj = nn.Linear(H, cfg.num_key_value_heads * d, bias=True)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, H, bias=False)

    def forward(self, x, cos, sin):  # x (B, T, H)
        B, T, _ = x.shape
        d = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, -1, d).transpose(1, 2)  # (B, heads, T, d)
        k = self.k_proj(x).view(B, T, -1, d).transpose(1, 2)  # (B, kv_heads, T, d)
        v = self.v_proj(x).view(B, T, -1, d).transpose(1, 2)
        c, s = cos[:, None], sin[:, None]
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, heads, T, d)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """Parameter names as transformers' Qwen2ForCausalLM (model.*, lm_head.weight), so state dicts load."""

    def __init__(self, cfg, checkpointing=False):
        super().__init__()
        self.cfg = cfg
        self.checkpointing = checkpointing
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, seed):
        """N(0, initializer_range) weights, zero biases, unit norms, drawn where the parameters are."""
        g = torch.Generator(device=next(self.parameters()).device).manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, self.cfg.initializer_range, generator=g)

    def forward(self, ids, positions=None):  # ids (B, T) -> logits (B, T, V)
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        x = self.model.embed_tokens(ids)
        cos, sin = rope_cos_sin(self.cfg, positions, x.dtype)
        for layer in self.model.layers:
            if self.checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))


def sft_loss(logits, labels):
    """Token-mean cross-entropy of next-token targets (labels -100 are ignored), logits in fp32."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1), ignore_index=-100)


def model_flops_per_token(cfg, seq):
    """(causal count, MosaicML count) of training FLOPs per token; see the module docstring."""
    H, d, L, I, V = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    matmul = L * (H * q + 2 * H * kv + q * H + 3 * H * I)  # the decoder's linear weights
    causal = 6.0 * (matmul + V * H) + 6.0 * L * q * seq
    params_all = matmul + L * (q + 2 * kv + 2 * H) + H + V * H * (1 if cfg.tie_word_embeddings else 2)
    mosaic = 6.0 * params_all + 12.0 * L * H * seq
    return causal, mosaic


def default_peak_tflops(device):
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    if "H100" in name or "H200" in name or "GH200" in name:
        return 989.0  # bf16 dense, SXM; an H100 PCIe is 756: pass --peak-tflops
    return 0.0


class Trainer:
    """bf16 (or fp32) parameters; fp32 master weights and moments; fused AdamW on the master copy.

    With bf16 parameters the bf16 gradients are cast to fp32 (and clipped) a chunk of ~`chunk` elements
    at a time, each chunk stepped by its own fused AdamW, so at most one chunk of fp32 gradients exists
    besides the bf16 ones (3B: 12 GiB less at the peak than casting all of them at once)."""

    def __init__(self, model, lr, weight_decay, betas, eps, fused, chunk=256 << 20):
        self.model = model
        self.params = list(model.parameters())
        self.low_precision = self.params[0].dtype != torch.float32
        named = {id(p): n for n, p in model.named_parameters()}
        self.master = [p.detach().float().clone() if self.low_precision else p for p in self.params]
        kw = {"fused": True} if fused else {"foreach": True}
        chunks, cur, size = [], [], 0
        for i, p in enumerate(self.params):
            cur.append(i)
            size += p.numel()
            if self.low_precision and size >= chunk:
                chunks.append(cur)
                cur, size = [], 0
        if cur:
            chunks.append(cur)
        self.chunks = []
        for idx in chunks:
            decay = [self.master[i] for i in idx if not self._no_decay(named[id(self.params[i])])]
            no_decay = [self.master[i] for i in idx if self._no_decay(named[id(self.params[i])])]
            groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
            self.chunks.append((idx, torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kw)))

    @staticmethod
    def _no_decay(name):
        return name.endswith(".bias") or name.endswith("norm.weight")

    def _grad_norm(self):
        grads = [p.grad for p in self.params]
        try:
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        except TypeError:  # a torch without dtype= on _foreach_norm
            norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
        return torch.linalg.vector_norm(torch.stack(norms))

    def step(self, batches, n_targets, clip):
        """One optimizer step over micro-batches [(ids, labels)] on the device, whose next-token
        targets number n_targets (counted on the host: no sync); loss = token mean over the step."""
        total = torch.zeros((), device=batches[0][0].device)
        for ids, labels in batches:
            logits = self.model(ids)
            V = logits.shape[-1]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum") / n_targets
            loss.backward()
            total += loss.detach()
        norm = self._grad_norm()
        coef = (clip / (norm + 1e-6)).clamp(max=1.0)  # a tensor: no host sync
        for idx, opt in self.chunks:
            if self.low_precision:
                for i in idx:
                    self.master[i].grad = self.params[i].grad.float().mul_(coef)
                    self.params[i].grad = None
            else:
                torch._foreach_mul_([self.params[i].grad for i in idx], coef)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if self.low_precision:
                with torch.no_grad():
                    torch._foreach_copy_([self.params[i] for i in idx], [self.master[i] for i in idx])
        return total, norm


def run_steps(a, tr, micro_batches, tokens_per_step, sync, rates):
    """Warm-up then measured optimizer steps; appends each measured step's tokens/s to rates."""
    for step in range(1, a.warmup + a.steps + 1):
        batches, n_targets = micro_batches()
        sync()
        t = time.perf_counter()
        loss, norm = tr.step(batches, n_targets, clip=1.0)
        loss_v, norm_v = float(loss), float(norm)  # one sync per step, as ptk's metrics
        dt = time.perf_counter() - t
        measured = step > a.warmup
        if measured:
            rates.append(tokens_per_step / dt)
        print(f"step {step}{'' if measured else ' (warm-up)'}: loss {loss_v:.4f} grad_norm {norm_v:.3f} "
              f"{dt * 1e3:.1f} ms {tokens_per_step / dt:.0f} tok/s", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="a Qwen2 config.json (random init from it)")
    ap.add_argument("--seq", type=int, default=4096, help="tokens per packed row (one document a row)")
    ap.add_argument("--micro-batch", type=int, default=1, help="rows per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=5, help="measured optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="optimizer steps before measuring")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--checkpointing", action="store_true", help="recompute each layer in backward")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak (MFU's denominator)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the result as JSON to this file")
    ap.add_argument("--sdpa-any", action="store_true",
                    help="let SDPA pick any backend (default on CUDA: flash attention only, so a silent fall-back "
                         "to the math kernel, which keeps T x T scores, fails instead)")
    a = ap.parse_args(argv)

    device = torch.device(a.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    with open(a.config) as f:
        cfg = Qwen2Config(json.load(f))
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    t0 = time.time()
    with torch.device(device):  # made and drawn on the device (a 3B model drawn on one CPU thread takes minutes)
        model = Qwen2Model(cfg, checkpointing=a.checkpointing)
    model.init_weights(a.seed)
    model.to(dtype=dtype).train()
    tr = Trainer(model, a.lr, 0.0, (0.9, 0.999), 1e-8, fused=device.type == "cuda")
    load_s = time.time() - t0

    g = torch.Generator().manual_seed(a.seed + 1)
    B, T = a.micro_batch, a.seq

    def micro_batches():
        out = []
        for _ in range(a.grad_accum):
            ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g).pin_memory() if device.type == "cuda" \
                else torch.randint(0, cfg.vocab_size, (B, T), generator=g)
            ids = ids.to(device, non_blocking=True)
            out.append((ids, ids))  # every token a target (SFT on {"text"} rows)
        return out, B * (T - 1) * a.grad_accum

    tokens_per_step = B * T * a.grad_accum
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    import contextlib
    if device.type == "cuda" and not a.sdpa_any:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        attention = sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    else:
        attention = contextlib.nullcontext()
    rates = []
    with attention:
        run_steps(a, tr, micro_batches, tokens_per_step, sync, rates)

    causal, mosaic = model_flops_per_token(cfg, T)
    peak = a.peak_tflops if a.peak_tflops is not None else default_peak_tflops(device)
    rates.sort()
    med = rates[len(rates) // 2] if rates else float("nan")
    res = {
        "program": "torch_sft_baseline", "config": a.config, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": a.dtype, "seq": T, "micro_batch": B, "grad_accum": a.grad_accum,
        "checkpointing": a.checkpointing, "steps": a.steps, "warmup": a.warmup, "load_s": round(load_s, 2),
        "tokens_per_s": med, "tokens_per_s_min": rates[0] if rates else None,
        "tokens_per_s_max": rates[-1] if rates else None,
        "flops_per_token": causal, "flops_per_token_mosaic": mosaic, "peak_tflops": peak,
        "mfu": med * causal / (peak * 1e12) if peak else None,
        "mfu_mosaic": med * mosaic / (peak * 1e12) if peak else None,
    }
    if device.type == "cuda":
        res["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    mfu = f"MFU {100 * res['mfu']:.1f}% (mosaic count {100 * res['mfu_mosaic']:.1f}%, peak {peak:g} TFLOP/s)" \
        if peak else "MFU n/a (no peak for this device)"
    mem = (f"peak memory {res['peak_memory_gib']:.2f} GiB allocated, {res['peak_reserved_gib']:.2f} GiB reserved"
           if device.type == "cuda" else "peak memory n/a (cpu)")
    print(f"torch_sft_baseline: shape {a.config} seq {T} x {B} rows x {a.grad_accum} accum, {a.dtype}, "
          f"{a.steps} steps after {a.warmup} warm-up | tokens/s {med:.0f} (min {res['tokens_per_s_min']:.0f}, "
          f"max {res['tokens_per_s_max']:.0f}) | {mfu} | {mem}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
