#!/usr/bin/env python3
"""The RL half of the GPU benchmark (scripts/gpu_check.sh), one part per call; figures go to BENCHMARKS.md.

  decode  bench/decode_bench at each --shapes shape, batch 1, bf16: the device-to-device copy rate,
          the bound it sets (weight bytes / rate, in tokens/s) and the engine's decode tokens/s against
          it (goal >= 60%).
  rollout --prompts x --samples x --new-tokens (64 x 8 x 512) at --shape (1.5b), temperature 1, no stop:
          the engine (decode_bench) and then bench/hf_generate_baseline.py (transformers' generate in
          plain PyTorch: the GPU machines have no transformers) on the same prompts, same GPU, same
          run; tokens/s of each and their ratio (goal >= 5x).
  grpo    `ptk grpo` at --shape (random init, bf16), make-data's arithmetic prompts over the byte
          tokenizer, --steps steps of --prompts-per-step prompts x --samples samples x --new-tokens,
          beta 0.04 (a full-fine-tuning reference, grpo.reference_device=--reference-device): seconds
          per step (median after the first) and the phase split from metrics.jsonl (time/generate_s,
          time/score_s, time/reference_s, time/update_s; "other" = step_time_s minus them: AdamW and
          the loop), the sampler/trainer log-prob gap (sampling/sampling_logp_difference/mean, max).

    python3 bench/gpu_rl_bench.py decode  --bin .gpu/bin --out OUT/bench-decode [--shapes "0.5b 1.5b"]
    python3 bench/gpu_rl_bench.py rollout --bin .gpu/bin --out OUT/bench-rollout [--shape 1.5b]
    python3 bench/gpu_rl_bench.py grpo    --bin .gpu/bin --out OUT/bench-grpo [--shape 1.5b]
    python3 bench/gpu_rl_bench.py smoke   --bin build --out DIR   (all three on the CPU at a tiny shape)

Each part writes OUT/result.txt (the lines gpu_check.sh copies into its summary) and OUT/result.json.
A side that fails or times out is reported as such; the others still run. Never fails on a figure.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.dont_write_bytecode = True  # no __pycache__ beside the sources
sys.path.insert(0, str(ROOT / "bench"))
from gpu_sft_bench import run_logged, tail  # noqa: E402  (one subprocess runner for both GPU benchmarks)

TINY = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 512, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "initializer_range": 0.02,
        "tie_word_embeddings": True, "torch_dtype": "float32"}


def shape_path(shape, out):
    if shape == "tiny":
        p = out / "tiny.json"
        p.write_text(json.dumps(TINY))
        return p
    return Path(shape).resolve() if shape.endswith(".json") else ROOT / "bench" / "shapes" / f"qwen2.5-{shape}.json"


def read_json(p):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, ValueError):
        return None


def part_decode(a, out, lines, res):
    for shape in a.shapes.split():
        cfg = shape_path(shape, out)
        js = out / f"decode-{shape}.json"
        rc, secs = run_logged([a.bin / "decode_bench", "--shape", cfg, "--device", a.device, "--no-batch",
                               "--decode-tokens", a.decode_tokens, "--json", js] + (["--dtype", a.dtype] if a.dtype else []),
                              out / f"decode-{shape}.log", a.timeout)
        r = read_json(js) if rc == 0 else None
        if not r:
            lines.append(f"decode {shape}: did not finish (exit {rc}, {secs:.0f} s): {tail(out / f'decode-{shape}.log', 4)}")
            continue
        res[f"decode-{shape}"] = r
        lines.append(f"decode {shape} batch 1 ({r['dtype']}, {r['device']}): {r['decode_tokens_per_s']:.1f} tokens/s = "
                     f"{100 * r['decode_fraction_of_bound']:.1f}% of the bound {r['bound_tokens_per_s']:.1f} tokens/s "
                     f"(weights {r['weight_bytes'] / 1e9:.3f} GB / copy rate {r['copy_bytes_per_s'] / 1e9:.0f} GB/s); "
                     f"goal >= 60%")


def part_rollout(a, out, lines, res):
    cfg = shape_path(a.shape, out)
    prompts = out / "prompts.json"
    ptk_js, hf_js = out / "ptk.json", out / "hf.json"
    cmd = [a.bin / "decode_bench", "--shape", cfg, "--device", a.device, "--no-decode", "--prompts", a.prompts,
           "--samples", a.samples, "--new-tokens", a.new_tokens, "--prompt-len", a.prompt_len,
           "--prompts-out", prompts, "--json", ptk_js] + (["--dtype", a.dtype] if a.dtype else [])
    rc, secs = run_logged(cmd, out / "ptk-rollout.log", a.timeout)
    p = read_json(ptk_js)
    if p:
        res["ptk"] = p
        lines.append(f"rollout ptk engine: {a.prompts} prompts x {a.samples} samples x {a.new_tokens} new tokens at "
                     f"{a.shape} ({p['dtype']}, {p['device']}): {p['batch_tokens']} tokens in {p['batch_s']:.2f} s = "
                     f"{p['batch_tokens_per_s']:.0f} tokens/s; KV cache re-made in {p['kv_alloc_s']:.4f} s")
    else:
        lines.append(f"rollout ptk engine: did not finish (exit {rc}, {secs:.0f} s): {tail(out / 'ptk-rollout.log', 4)}")
    if not prompts.exists():
        lines.append("rollout baseline: not run (no prompts from decode_bench)")
        return
    cmd = [sys.executable, ROOT / "bench" / "hf_generate_baseline.py", "--config", cfg, "--prompts", prompts,
           "--device", a.device, "--json", hf_js] + (["--dtype", a.dtype] if a.dtype else [])
    rc, secs = run_logged(cmd, out / "hf-rollout.log", a.timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    h = read_json(hf_js)
    if h:
        res["hf_generate_baseline"] = h
        lines.append(f"rollout baseline (transformers' generate in plain PyTorch, same prompts): {h['tokens']} tokens "
                     f"in {h['seconds']:.2f} s = {h['tokens_per_s']:.0f} tokens/s")
    else:
        lines.append(f"rollout baseline: did not finish (exit {rc}, {secs:.0f} s): {tail(out / 'hf-rollout.log', 4)}")
    if p and h:
        ratio = p["batch_tokens_per_s"] / h["tokens_per_s"]
        res["ratio"] = ratio
        lines.append(f"rollout ptk / baseline: {ratio:.2f}x (goal >= 5x)")


def part_grpo(a, out, lines, res):
    cfg = shape_path(a.shape, out)
    data = out / "data"
    for old in (data, out / "run"):  # a fresh run (an earlier one's folder would be resumed)
        shutil.rmtree(old, ignore_errors=True)
    rc, _ = run_logged([a.bin / "ptk", "make-data", "arithmetic", "--out", data, "--train", 64, "--eval", 2,
                        "--tokenizer", "bytes"], out / "make-data.log", 120)
    if rc != 0:
        lines.append(f"grpo: make-data failed ({rc}): {tail(out / 'make-data.log', 4)}")
        return
    G, B = a.samples, a.prompts_per_step
    recipe = {
        "run": {"dir": str(out / "run"), "device": a.device, "seed": 0},
        "model": {"config": str(cfg), "dtype": a.model_dtype},
        "tokenizer": {"path": str(data)},
        "data": {"train": [str(data / "rl_train.jsonl")], "max_seq_len": 256},
        "train": {"max_steps": a.steps, "micro_batch_size": G, "grad_accum": B, "log_every": 1, "tensorboard": False,
                  "eval_every": 0},
        "optim": {"lr": 1e-6, "warmup_steps": 0},
        "checkpoint": {"every": 0},
        "rollout": {"slots": G * B},
        "grpo": {"num_generations": G, "max_completion_length": a.new_tokens, "reward_funcs": ["math"],
                 "beta": 0.04, "reference_device": a.reference_device, "log_rollouts_every": 0,
                 "eval_at_start": False},
    }
    (out / "grpo.json").write_text(json.dumps(recipe, indent=1))
    rc, secs = run_logged([a.bin / "ptk", "grpo", "--recipe", out / "grpo.json"], out / "ptk-grpo.log", a.timeout)
    mp = out / "run" / "metrics.jsonl"
    steps = [json.loads(l) for l in mp.read_text().splitlines() if l.strip()] if mp.exists() else []
    if not steps:
        lines.append(f"grpo: no steps (exit {rc}, {secs:.0f} s): {tail(out / 'ptk-grpo.log', 4)}")
        return
    measured = steps[1:] or steps
    phases = ["time/generate_s", "time/score_s", "time/reference_s", "time/update_s"]

    def med(k):
        v = [m[k] for m in measured if isinstance(m.get(k), (int, float))]
        return statistics.median(v) if v else float("nan")

    step_s = med("step_time_s")
    split = {k.split("/")[1][:-2]: med(k) for k in phases}
    other = step_s - sum(v for v in split.values() if v == v)
    gap = [m.get("sampling/sampling_logp_difference/mean") for m in steps]
    gap_max = [m.get("sampling/sampling_logp_difference/max") for m in steps]
    mean_len = med("completions/mean_length")
    res.update({"steps": len(steps), "step_s": step_s, "phases_s": split, "other_s": other, "exit": rc,
                "completion_mean_length": mean_len,
                "logp_gap_mean": gap, "logp_gap_max": gap_max,
                "peak_allocated_gib": max([m.get("memory/peak_allocated_gib", 0) for m in steps] or [0])})
    lines.append(f"grpo {a.shape} ({a.model_dtype}, {a.device}, reference_device={a.reference_device}): {B} prompts x "
                 f"{G} samples x <= {a.new_tokens} tokens a step (mean completion {mean_len:.0f}), {len(steps)} steps "
                 f"(exit {rc}): {step_s:.2f} s/step "
                 f"(median after the first) = " + " + ".join(f"{k} {v:.2f}" for k, v in split.items()) +
                 f" + other {other:.2f} (AdamW, the loop); peak allocated {res['peak_allocated_gib']:.1f} GiB")
    lines.append("grpo sampler/trainer log-prob gap per step (mean | max): " +
                 ", ".join(f"{x:.2e} | {y:.2e}" if isinstance(x, (int, float)) and isinstance(y, (int, float)) else "n/a"
                           for x, y in zip(gap, gap_max)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["decode", "rollout", "grpo", "smoke"])
    ap.add_argument("--bin", required=True, help="folder with ptk and decode_bench (.gpu/bin, or a build folder)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="", help="decode_bench / baseline dtype (default: bf16 on CUDA)")
    ap.add_argument("--model-dtype", default="bfloat16", help="grpo: model.dtype")
    ap.add_argument("--shapes", default="0.5b 1.5b")
    ap.add_argument("--shape", default="1.5b")
    ap.add_argument("--decode-tokens", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--reference-device", default="host", choices=["same", "host"])
    ap.add_argument("--timeout", type=float, default=240)
    a = ap.parse_args()
    a.bin = Path(a.bin).resolve()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # A build folder keeps ptk in bin/ and the benchmarks in bench/; .gpu/bin holds both.
    if not (a.bin / "decode_bench").exists() and (a.bin / "bench" / "decode_bench").exists():
        (out / "bin").mkdir(exist_ok=True)
        for src in (a.bin / "bench" / "decode_bench", a.bin / "bin" / "ptk"):
            dst = out / "bin" / src.name
            if not dst.exists():
                dst.symlink_to(src)
        a.bin = out / "bin"
    lines, res = [], {}
    rc = 0
    if a.part == "smoke":
        # Every part on the CPU at a tiny shape (ctest: gpu_rl_bench_smoke): each must produce its figures.
        a.device, a.dtype, a.model_dtype = "cpu", "fp32", "float32"
        a.shapes, a.shape = "tiny", "tiny"
        a.decode_tokens, a.prompts, a.samples, a.new_tokens, a.prompt_len = 16, 3, 2, 6, 8
        a.prompts_per_step, a.steps = 2, 2
        for name, fn in (("decode", part_decode), ("rollout", part_rollout), ("grpo", part_grpo)):
            sub = {}
            fn(a, out, lines, sub)
            res[name] = sub
        d, r, g = res["decode"].get("decode-tiny", {}), res["rollout"], res["grpo"]
        problems = [what for what, ok in (
            ("decode: no bound or rate", d.get("bound_tokens_per_s", 0) > 0 and d.get("decode_tokens_per_s", 0) > 0),
            ("decode: not 16 tokens", d.get("decode_tokens") == 16),
            ("rollout: the engine made the wrong number of tokens", r.get("ptk", {}).get("batch_tokens") == 3 * 2 * 6),
            ("rollout: the baseline made the wrong number of tokens", r.get("hf_generate_baseline", {}).get("tokens") == 3 * 2 * 6),
            ("rollout: no ratio", r.get("ratio", 0) > 0),
            ("grpo: not 2 steps", g.get("steps") == 2),
            ("grpo: a phase is missing", all(v == v for v in g.get("phases_s", {"none": float("nan")}).values())),
        ) if not ok]
        for p in problems:
            lines.append("SMOKE FAILED: " + p)
        rc = 1 if problems else 0
    else:
        {"decode": part_decode, "rollout": part_rollout, "grpo": part_grpo}[a.part](a, out, lines, res)
        # A side that did not give its figures fails the part (gpu_check.sh: "benchmark incomplete").
        rc = 1 if any(w in l for l in lines for w in ("did not finish", "not run", "no steps", "failed")) else 0
    (out / "result.txt").write_text("\n".join(lines) + "\n")
    (out / "result.json").write_text(json.dumps(res, indent=1) + "\n")
    print("\n".join(lines))
    return rc


if __name__ == "__main__":
    sys.exit(main())
