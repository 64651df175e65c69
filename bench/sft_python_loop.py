#!/usr/bin/env python3
"""The baseline for `ptk sft` (issue 11's benchmark): the training loop an HF-Trainer / TRL user runs,
written out in plain eager PyTorch, on the same packed rows ptk trains on.

  /usr/bin/python3 bench/sft_python_loop.py --config recipes/tiny/model.json \
      --data RUN/data/train --micro-batch 8 --steps 20 --threads 2 [--lr 3e-3 --weight-decay 0.01 ...]

What it is (transformers is not installed here, so the model is written from HF's modeling_qwen2.py,
eager attention path, op for op):
  - Qwen2ForCausalLM: embedding, per layer RMSNorm (variance in fp32) -> q/k/v Linear (bias) -> RoPE
    (rotate_half) -> repeat_kv -> q k^T * D^-0.5 + additive mask -> softmax in fp32 -> @ v -> o_proj,
    residual, RMSNorm -> down(silu(gate(x)) * up(x)), residual; final norm; tied lm_head.
  - Packed rows as transformers (>= 4.53) runs them from position_ids on eager attention: one
    block-diagonal causal (B, 1, T, T) additive mask (a new document wherever position_ids does not
    step by 1), full T x T scores per row.
  - Loss as ForCausalLMLoss: full (B, T, V) logits upcast to fp32, labels shifted, cross_entropy
    (ignore_index -100, sum) / number of target tokens = mean NLL over target tokens.
  - torch.nn.utils.clip_grad_norm_, torch.optim.AdamW (weight decay off for biases and norms, as the
    Trainer groups them), the Trainer's cosine-with-warmup LambdaLR, zero_grad(set_to_none=True).
Data: the prepared folder ptk wrote (datasets/shards.h layout) read with numpy, batches built as
make_sft_batch does (pad after each row's documents, positions restarting per document, the first
token of every document and padding not a target). Rows in a seeded random order, as ptk's loader.

Timing: per step, from batch construction to the optimizer step (what ptk's tokens_per_s covers);
the first --warmup steps are not counted. Prints human lines and one line starting with RESULT_JSON.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------
# Model: HF modeling_qwen2.py, eager path.

class Qwen2RMSNorm(nn.Module):
    def __init__(self, hidden, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(dtype)


class Qwen2RotaryEmbedding(nn.Module):
    def __init__(self, head_dim, theta):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x, position_ids):
        inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        pos = position_ids[:, None, :].float()
        freqs = (inv @ pos).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(h, n_rep):
    b, kv, t, d = h.shape
    if n_rep == 1:
        return h
    h = h[:, :, None, :, :].expand(b, kv, n_rep, t, d)
    return h.reshape(b, kv * n_rep, t, d)


class Qwen2Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        self.nh, self.nkv = c["num_attention_heads"], c["num_key_value_heads"]
        self.groups = self.nh // self.nkv
        self.scaling = self.head_dim ** -0.5
        h = c["hidden_size"]
        self.q_proj = nn.Linear(h, self.nh * self.head_dim, bias=True)
        self.k_proj = nn.Linear(h, self.nkv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(h, self.nkv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.nh * self.head_dim, h, bias=False)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        shape = (b, t, -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = repeat_kv(k, self.groups)
        v = repeat_kv(v, self.groups)
        w = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        w = w + mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        w = F.dropout(w, p=0.0, training=self.training)
        out = torch.matmul(w, v).transpose(1, 2).contiguous()
        return self.o_proj(out.reshape(b, t, -1))


class Qwen2MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, i = c["hidden_size"], c["intermediate_size"]
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn = Qwen2Attention(c)
        self.mlp = Qwen2MLP(c)
        self.input_layernorm = Qwen2RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.post_attention_layernorm = Qwen2RMSNorm(c["hidden_size"], c["rms_norm_eps"])

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Qwen2DecoderLayer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = Qwen2RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        self.rotary_emb = Qwen2RotaryEmbedding(head_dim, c.get("rope_theta", 10000.0))
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        if c.get("tie_word_embeddings", True):
            self.lm_head.weight = self.embed_tokens.weight
        std = c.get("initializer_range", 0.02)
        for m in self.modules():  # transformers' _init_weights
            if isinstance(m, nn.Linear):
                m.weight.data.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.data.normal_(0.0, std)

    def forward(self, input_ids, position_ids, mask):
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


def packed_causal_mask(position_ids, dtype):
    """transformers' packed-sequence mask from position_ids: a document starts wherever the position
    does not step by 1; a token sees earlier tokens of its own document. (B, 1, T, T) additive."""
    b, t = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = (position_ids[:, 1:] - position_ids[:, :-1]) != 1
    doc = starts.long().cumsum(-1)
    same = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    allowed = same & causal
    mask = torch.zeros(b, 1, t, t, dtype=dtype)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def causal_lm_loss(logits, labels, num_items):
    """transformers' ForCausalLMLoss: fp32 logits, shifted labels, sum over targets / num_items."""
    logits = logits.float()
    labels = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100, reduction="sum")
    return loss / num_items


# ---------------------------------------------------------------------------------------------
# Data: a prepared folder (datasets/shards.h).

DOC_ENTRY = np.dtype([("offset", "<u8"), ("meta_offset", "<u8"), ("shard", "<u4"), ("length", "<u4"),
                      ("seg_a", "<u4"), ("seg_b", "<u4"), ("meta_len", "<u4"), ("source", "<u4"),
                      ("line", "<u4"), ("reserved", "<u4")])


class Prepared:
    def __init__(self, d):
        with open(os.path.join(d, "manifest.json")) as f:
            man = json.load(f)
        if man.get("format") != "sft" or not man["key"].get("packing"):
            sys.exit(f"{d}: not a packed sft folder")
        self.max_seq_len = man["key"]["max_seq_len"]
        self.docs = np.fromfile(os.path.join(d, "docs.idx"), dtype=DOC_ENTRY)
        self.row_off = np.fromfile(os.path.join(d, "rows.idx"), dtype="<u8")
        self.row_docs = np.fromfile(os.path.join(d, "rows.docs"), dtype="<u4")
        n = len(man["shards"])
        self.tokens = [np.fromfile(os.path.join(d, f"tokens-{i:05d}.u32"), dtype="<u4") for i in range(n)]
        self.mask = [np.fromfile(os.path.join(d, f"mask-{i:05d}.u8"), dtype="u1") for i in range(n)]

    def num_rows(self):
        return len(self.row_off) - 1

    def batch(self, rows, pad_id):
        """make_sft_batch: ids, positions, labels (B, T) int64 and the real token count."""
        t_len = self.max_seq_len
        ids = np.full((len(rows), t_len), pad_id, dtype=np.int64)
        pos = np.zeros((len(rows), t_len), dtype=np.int64)
        tgt = np.zeros((len(rows), t_len), dtype=bool)
        tokens = 0
        for i, r in enumerate(rows):
            t = 0
            for d in self.row_docs[self.row_off[r]:self.row_off[r + 1]]:
                e = self.docs[d]
                o, n, s = int(e["offset"]), int(e["length"]), int(e["shard"])
                ids[i, t:t + n] = self.tokens[s][o:o + n]
                pos[i, t:t + n] = np.arange(n)
                tgt[i, t:t + n] = self.mask[s][o:o + n] != 0
                tgt[i, t] = False  # a document's first token is never scored
                t += n
            tokens += t
        ids_t = torch.from_numpy(ids)
        labels = torch.where(torch.from_numpy(tgt), ids_t, torch.full_like(ids_t, -100))
        return ids_t, torch.from_numpy(pos), labels, tokens


# ---------------------------------------------------------------------------------------------

def matmul_peak():
    """fp32 1024^3 matmul GFLOP/s, as ptk's trainer measures its MFU denominator."""
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.3 or iters < 2:
        torch.mm(a, b)
        iters += 1
    return 2.0 * n ** 3 * iters / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="config.json of the model (random init)")
    ap.add_argument("--data", required=True, help="prepared sft folder (ptk's RUN/data/train)")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--warmup-steps", type=int, default=20, help="LR warmup (cosine schedule after)")
    ap.add_argument("--pad-id", type=int, default=None, help="default: the config's pad_token_id, else eos")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    with open(a.config) as f:
        c = json.load(f)
    pad_id = a.pad_id if a.pad_id is not None else (c.get("pad_token_id") if c.get("pad_token_id") is not None
                                                     else c.get("eos_token_id", 0))
    if isinstance(pad_id, list):
        pad_id = pad_id[0]
    data = Prepared(a.data)
    model = Qwen2ForCausalLM(c)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())  # tied weight counted once
    decay = [p for n, p in model.named_parameters() if not (n.endswith(".bias") or "norm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith(".bias") or "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=tuple(a.betas), eps=a.eps)
    total = a.warmup + a.steps

    def lr_lambda(step):  # transformers' get_cosine_schedule_with_warmup
        if step < a.warmup_steps:
            return float(step) / float(max(1, a.warmup_steps))
        progress = float(step - a.warmup_steps) / float(max(1, total - a.warmup_steps))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    order = np.random.default_rng(a.seed).permutation(data.num_rows())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    T = data.max_seq_len
    # ptk sft's formula (sft/sft_stage.cpp): 6N + causal attention 6 L nh D T / 2.
    flops_per_token = 6.0 * n_params + 6.0 * c["num_hidden_layers"] * c["num_attention_heads"] * head_dim * T / 2.0
    peak = matmul_peak()
    print(f"python loop: torch {torch.__version__}, {torch.get_num_threads()} threads, {n_params / 1e6:.2f}M "
          f"parameters, {a.micro_batch} x {T} packed rows, peak {peak / 1e9:.1f} GFLOP/s", flush=True)

    timed_tokens, timed_s, cursor = 0, 0.0, 0
    for step in range(total):
        t0 = time.perf_counter()
        rows = [int(order[(cursor + i) % len(order)]) for i in range(a.micro_batch)]
        cursor += a.micro_batch
        ids, pos, labels, tokens = data.batch(rows, pad_id)
        num_items = int((labels[:, 1:] != -100).sum())
        mask = packed_causal_mask(pos, torch.float32)
        logits = model(ids, pos, mask)
        loss = causal_lm_loss(logits, labels, max(num_items, 1))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_v = loss.item()
        dt = time.perf_counter() - t0
        if step >= a.warmup:
            timed_tokens += tokens
            timed_s += dt
        print(f"  step {step + 1}/{total}{' (warm-up)' if step < a.warmup else ''}: loss {loss_v:.4f} "
              f"grad_norm {float(grad_norm):.3f} {dt:.3f} s {tokens / dt:.0f} tok/s", flush=True)
    tok_s = timed_tokens / timed_s
    res = {"tokens_per_s": tok_s, "mfu": flops_per_token * tok_s / peak, "peak_gflops": peak / 1e9,
           "flops_per_token": flops_per_token, "steps": a.steps, "step_s": timed_s / a.steps,
           "threads": torch.get_num_threads(), "params": n_params}
    print("RESULT_JSON " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
