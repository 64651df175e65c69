#!/usr/bin/env python3
"""`ptk sft` on a GPU at a real Qwen2.5 shape beside the same step in plain PyTorch
(bench/torch_sft_baseline.py), for scripts/gpu_check.sh; figures go to BENCHMARKS.md.

Both sides: random init from bench/shapes/qwen2.5-<shape>.json, bf16 parameters with fp32 master
weights and AdamW moments, packed rows of --seq tokens (one document per row: every record is longer
than a row, and every token is a target), --micro-batch rows per micro-batch, --grad-accum
micro-batches per optimizer step, --warmup steps not measured, then --steps measured. Printed per
side, in one format:

    <program>: shape <shape> seq 4096 x 1 rows x 4 accum | tokens/s N (min, max) | MFU x% (...) | peak memory ...

tokens/s is the median of the measured steps (ptk: metrics.jsonl's tokens_per_s; the baseline: its
own timing, one host sync a step as ptk's metrics); MFU counts FLOPs per token as the baseline's
model_flops_per_token (the output layer and causal attention included) over --peak-tflops (989 for an
H100 SXM / H200, bf16 dense); peak memory is the most `nvidia-smi` saw in use on the GPU while the
program ran (sampled every 100 ms; includes the CUDA context and the caching allocator's reserve),
plus what each side reports itself (the baseline: torch.cuda.max_memory_allocated; ptk: any metric
whose name holds "mem"). Each side runs as its own process under --timeout seconds; a side that fails
(out of memory, a timeout) is reported as such and the other still runs.

    python3 bench/gpu_sft_bench.py --ptk .gpu/bin/ptk --shape 0.5b --out OUT/bench-0.5b [--sides ptk,torch]

--lora R: ptk trains LoRA adapters of rank R on all linears (model.lora.enabled=true, alpha 2R, the bf16
base frozen); the torch loop has no LoRA, so use --sides ptk. MFU then counts 4 FLOPs per frozen base
parameter and token (forward and the input gradients, no weight gradients) + 6 per adapter parameter,
attention as before:
    python3 bench/gpu_sft_bench.py --shape 7b --lora 16 --checkpointing --sides ptk --out OUT/bench-7b-lora
"""
import argparse
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def baseline_module():
    spec = importlib.util.spec_from_file_location("torch_sft_baseline", ROOT / "bench" / "torch_sft_baseline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class GpuMemory:
    """The most memory nvidia-smi reports in use on GPU `index` while the block runs (MiB)."""

    def __init__(self, index=0):
        self.index, self.max_mib, self.proc = index, None, None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "-i", str(self.index), "--query-gpu=memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "100"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                v = float(line.strip())
            except ValueError:
                continue
            self.max_mib = v if self.max_mib is None else max(self.max_mib, v)

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return False


def run_logged(cmd, log, timeout, env=None):
    """Runs cmd with its output in `log`; returns (exit code or 'timeout', seconds)."""
    t = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        try:
            rc = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                env=env).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return rc, time.time() - t


def tail(path, n=5):
    try:
        return " | ".join(Path(path).read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


def fmt(prog, a, res):
    if res.get("error"):
        return f"{prog}: shape {a.shape} seq {a.seq}: did not finish ({res['error']})"
    mfu = (f"MFU {100 * res['mfu']:.1f}% (mosaic count {100 * res['mfu_mosaic']:.1f}%, peak {res['peak_tflops']:g} TFLOP/s)"
           if res.get("mfu") is not None else "MFU n/a")
    mem = [f"peak memory {res['gpu_used_gib']:.2f} GiB in use (nvidia-smi)" if res.get("gpu_used_gib") else
           "peak memory n/a"]
    for k, v in sorted(res.get("self_reported_memory", {}).items()):
        mem.append(f"{k} {v:.2f} GiB")
    what = f"LoRA r{a.lora} all-linear (bf16 base frozen)" if a.lora and prog == "ptk sft" else "bf16"
    return (f"{prog}: shape {a.shape} seq {a.seq} x {a.micro_batch} rows x {a.grad_accum} accum, {what}, "
            f"{a.steps} steps after {a.warmup} warm-up | tokens/s {res['tokens_per_s']:.0f} "
            f"(min {res['tokens_per_s_min']:.0f}, max {res['tokens_per_s_max']:.0f}) | {mfu} | {', '.join(mem)}")


def lora_flops_per_token(cfg, seq, rank):
    """(causal, MosaicML-style) training FLOPs per token with LoRA of `rank` on every decoder linear:
    the frozen linears and the output layer 4 per parameter, the adapters 6, causal attention 6 L q T."""
    H, d, L, I, V = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    matmul = L * (H * q + 2 * H * kv + q * H + 3 * H * I)
    adapters = L * rank * ((H + q) + 2 * (H + kv) + (q + H) + 3 * (H + I))
    causal = 4.0 * (matmul + V * H) + 6.0 * adapters + 6.0 * L * q * seq
    return causal, causal, adapters


def bench_ptk(a, out, flops, peak):
    data = out / "data"
    rc, _ = run_logged([a.ptk, "make-data", "arithmetic", "--out", data, "--train", 8, "--eval", 2, "--tokenizer",
                        "bytes"], out / "ptk-make-data.log", 120)
    if rc != 0:
        return {"error": f"make-data failed ({rc}): {tail(out / 'ptk-make-data.log')}"}
    # Records longer than a row (byte tokenizer: one token a byte): every packed row is one document
    # of exactly --seq tokens, every token a target.
    rows = (a.warmup + a.steps) * a.grad_accum * a.micro_batch + 8
    rnd = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz      .,0123456789\n"
    with open(out / "train.jsonl", "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": "".join(rnd.choice(alphabet) for _ in range(a.seq + 64))}) + "\n")
    recipe = {
        "run": {"dir": str(out / "run"), "device": a.device, "seed": 0},
        "model": {"config": str(a.config), "dtype": "bfloat16",
                  "activation_checkpointing": a.checkpointing},
        "tokenizer": {"path": str(data)},
        "data": {"train": [str(out / "train.jsonl")], "max_seq_len": a.seq, "packing": True},
        "train": {"max_steps": a.warmup + a.steps, "micro_batch_size": a.micro_batch, "grad_accum": a.grad_accum,
                  "log_every": 1, "tensorboard": False},
        "optim": {"lr": 1e-5, "warmup_steps": 0, "schedule": "constant"},
        "checkpoint": {"every": 0},
    }
    if a.lora:
        recipe["model"]["lora"] = {"enabled": True, "rank": a.lora, "alpha": 2 * a.lora, "targets": ["all-linear"]}
    (out / "sft.json").write_text(json.dumps(recipe, indent=1))
    with GpuMemory() as mem:
        rc, secs = run_logged([a.ptk, "sft", "--threads", os.cpu_count() or 16, "--recipe", out / "sft.json"],
                              out / "ptk-sft.log", a.timeout)
    metrics_path = out / "run" / "metrics.jsonl"
    steps = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()] if metrics_path.exists() else []
    measured = [m for m in steps if m.get("step", 0) > a.warmup] or steps[a.warmup:]
    if rc != 0 and not measured:
        return {"error": f"ptk sft exit {rc} after {secs:.0f} s: {tail(out / 'ptk-sft.log')}", "wall_s": secs}
    rates = sorted(m["tokens_per_s"] for m in measured if "tokens_per_s" in m)
    if not rates:
        return {"error": f"no measured steps in {metrics_path} (exit {rc})", "wall_s": secs}
    med = statistics.median(rates)
    res = {"program": "ptk sft", "exit": rc, "wall_s": round(secs, 1), "tokens_per_s": med,
           "tokens_per_s_min": rates[0], "tokens_per_s_max": rates[-1], "flops_per_token": flops[0],
           "flops_per_token_mosaic": flops[1], "peak_tflops": peak,
           "mfu": med * flops[0] / (peak * 1e12) if peak else None,
           "mfu_mosaic": med * flops[1] / (peak * 1e12) if peak else None,
           "ptk_mfu_metric": statistics.median([m["mfu"] for m in measured if "mfu" in m] or [float("nan")]),
           "gpu_used_gib": mem.max_mib / 1024 if mem.max_mib else None,
           "self_reported_memory": {}, "losses": [m.get("loss") for m in steps]}
    rss = [m["peak_rss_bytes"] for m in steps if "peak_rss_bytes" in m]
    if rss:
        res["self_reported_memory"]["host peak RSS"] = max(rss) / 2**30
    for m in measured:
        for k, v in m.items():
            if "mem" in k and isinstance(v, (int, float)):
                gib = v / 2**30 if v > 1e6 else v  # bytes or already GiB
                res["self_reported_memory"][k] = max(res["self_reported_memory"].get(k, 0), gib)
    return res


def bench_torch(a, out, peak):
    cmd = [sys.executable, ROOT / "bench" / "torch_sft_baseline.py", "--config", a.config, "--seq", a.seq, "--micro-batch", a.micro_batch,
           "--grad-accum", a.grad_accum, "--steps", a.steps, "--warmup", a.warmup, "--device", a.device,
           "--dtype", "bf16", "--json", out / "torch.json"] + (["--checkpointing"] if a.checkpointing else [])
    if peak:
        cmd += ["--peak-tflops", peak]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with GpuMemory() as mem:
        rc, secs = run_logged(cmd, out / "torch-sft.log", a.timeout, env=env)
    if rc != 0 or not (out / "torch.json").exists():
        return {"error": f"exit {rc} after {secs:.0f} s: {tail(out / 'torch-sft.log')}", "wall_s": secs}
    res = json.loads((out / "torch.json").read_text())
    res.update({"program": "torch", "wall_s": round(secs, 1), "gpu_used_gib": mem.max_mib / 1024 if mem.max_mib else None,
                "self_reported_memory": {"max_memory_allocated": res.get("peak_memory_gib", 0),
                                         "max_memory_reserved": res.get("peak_reserved_gib", 0)}})
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ptk", default=str(ROOT / ".gpu" / "bin" / "ptk"))
    ap.add_argument("--shape", default="0.5b", help="bench/shapes/qwen2.5-<shape>.json: 0.5b, 3b; or a config.json path")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing on both sides")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--timeout", type=float, default=240, help="seconds for each side")
    ap.add_argument("--sides", default="ptk,torch")
    ap.add_argument("--lora", type=int, default=0, help="ptk trains LoRA adapters of this rank (all linears); 0 = full")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    a.config = Path(a.shape).resolve() if a.shape.endswith(".json") else ROOT / "bench" / "shapes" / f"qwen2.5-{a.shape}.json"
    b = baseline_module()
    import torch
    cfg = b.Qwen2Config(json.loads(a.config.read_text()))
    flops = b.model_flops_per_token(cfg, a.seq)
    if a.lora:
        flops = lora_flops_per_token(cfg, a.seq, a.lora)[:2]
    peak = a.peak_tflops if a.peak_tflops is not None else b.default_peak_tflops(torch.device(a.device))
    results = {"shape": a.shape, "seq": a.seq, "micro_batch": a.micro_batch, "grad_accum": a.grad_accum,
               "steps": a.steps, "warmup": a.warmup, "checkpointing": a.checkpointing, "lora_rank": a.lora,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", "sides": {}}
    lines = []
    for side in a.sides.split(","):
        (out / side).mkdir(exist_ok=True)
        res = bench_ptk(a, out / side, flops, peak) if side == "ptk" else bench_torch(a, out / side, peak)
        results["sides"][side] = res
        line = fmt("ptk sft" if side == "ptk" else "torch loop", a, res)
        print(line, flush=True)
        lines.append(line)
    s = results["sides"]
    if all(k in s and s[k].get("tokens_per_s") for k in ("ptk", "torch")):
        line = f"ptk{' (LoRA)' if a.lora else ''} / torch (full) tokens/s at {a.shape}: {s['ptk']['tokens_per_s'] / s['torch']['tokens_per_s']:.2f}x"
        print(line)
        lines.append(line)
    (out / "result.json").write_text(json.dumps(results, indent=1))
    (out / "result.txt").write_text("\n".join(lines) + "\n")
    return 0 if all(not r.get("error") for r in s.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
