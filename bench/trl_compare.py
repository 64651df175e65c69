#!/usr/bin/env python3
"""Issue 25's side-by-side benchmark: `ptk sft|dpo|grpo` against TRL's SFTTrainer, DPOTrainer and
GRPOTrainer (the pinned peers in .venv: trl 1.16.0, transformers 5.25.0, torch 2.11.0, the wheel ptk
links), one after the other in the same invocation, on the same model, data, batch and threads, fp32 on
the CPU. Prints, per comparison, a table: ptk, TRL, ratio. Never fails on time.

  .venv/bin/python3 bench/trl_compare.py sft  --shape tiny|0.5b [--repeats N] [--steps S] [--warmup W]
  .venv/bin/python3 bench/trl_compare.py dpo  --shape tiny|0.5b ...
  .venv/bin/python3 bench/trl_compare.py grpo --shape tiny|0.5b ...
  (run from the repository root; env PTK = the binary, default build/bin/ptk; --work DIR, default
   /tmp/ptk_trl_compare)

Shapes:
  tiny: recipes/tiny/model.json (2 layers, hidden 128, vocab 259) with `ptk make-data arithmetic
        --tokenizer bytes` (byte-level tokenizer, the tiny demo's).
  0.5b: the Qwen2.5-0.5B config (24 layers, hidden 896, vocab 151,936, tied), random init, with
        assets/tokenizers/qwen.
  The model is made once per shape by transformers (random init, seed 0, fp32 safetensors) and loaded
  from that folder by both sides. Data: the make-data arithmetic set (chat messages), the first
  --records records; TRL reads the same records (SFT as conversational prompt/completion, so both sides
  train on the assistant reply only; DPO as prompt/chosen/rejected; GRPO prompts with "answer").

What each side runs (settings aligned, TRL's defaults changed where they differ from the comparison):
  - fp32 (TRL: bf16=False), no activation checkpointing (SFTConfig/GRPOConfig default it on; ptk off),
    constant LR, no warm-up, weight decay 0, AdamW betas (0.9, 0.999), eps 1e-8, clipping 1.0, no
    eval, no checkpoints (ptk still writes final/ after the last step, outside the timed steps),
    logging every step on both sides, --threads threads on both (torch.set_num_threads,
    OMP_NUM_THREADS), OMP_WAIT_POLICY=PASSIVE on both (ptk sets it for itself when unset).
  - SFT: packed rows of --seq tokens, --micro-batch rows a step, no grad accumulation. ptk:
    data.packing=true; TRL: packing=True (its default "bfd" strategy, hence padding-free batches).
    Tokens counted: every non-pad input token of the step's batch, both sides (ptk: metrics.jsonl's
    num_tokens; TRL: SFTTrainer's own num_tokens count, the flattened padding-free batch length).
  - DPO: sigmoid loss, beta 0.1, live reference model (TRL's default precompute_ref_log_probs=False;
    ptk dpo.precompute_ref_log_probs=false), --micro-batch pairs a step.
  - GRPO: --prompts prompts x --generations completions a step of at most --new-tokens tokens,
    temperature 1, one rule reward (the last number of the reply equals "answer"; ptk's `math`
    verifier, a Python function of the same rule for TRL), loss dapo, beta 0 (no reference),
    epsilon 0.2, one iteration; TRL generates with transformers' generate() (use_vllm=False).
Timing: per optimizer step after --warmup untimed steps. ptk: metrics.jsonl's step_time_s (from
fetching the micro-batches, generation included for GRPO, to the optimizer step). TRL: a
TrainerCallback's on_step_begin -> on_step_end (forward/backward of every micro-batch, GRPO's
generation and scoring, clipping, optimizer step; the Trainer fetches the batch just before
on_step_begin, so this leaves out TRL's batch fetch and its logging: a little in TRL's favour).
CPU seconds per step (user + system, all threads; ptk: /proc of the child sampled when metrics.jsonl
gains a line, every 50 ms, so only meaningful for steps of seconds; TRL: time.process_time() in the
callback): less exposed to other tenants than wall time, though not immune (shared caches, cores).
Peak memory: each side runs as a child process, its peak RSS (ru_maxrss from wait4) — for ptk
including its data preparation and the final save; ptk's own peak_rss_bytes (metrics.jsonl, at the last
step) is printed beside it.
Each repeat runs both back to back (--first's side first in odd repeats, the other in even ones); --repeats N
prints min and median of each figure and of the per-repeat ratios, and a "best step" row (the fastest
timed step of each run, less exposed to other tenants' bursts). The load average is printed before each run (the machine is shared).
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

ROOT = Path(__file__).resolve().parent.parent

QWEN05B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "hidden_act": "silu",
    "initializer_range": 0.02, "tie_word_embeddings": True, "use_sliding_window": False,
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643,
}

# Per shape and comparison: defaults for the run's size (overridable on the command line).
DEFAULTS = {
    ("sft", "tiny"): dict(seq=256, micro_batch=8, steps=20, warmup=2, lr=1e-4, records=3000),
    ("sft", "0.5b"): dict(seq=512, micro_batch=1, steps=4, warmup=1, lr=1e-5, records=600),
    ("dpo", "tiny"): dict(seq=128, micro_batch=16, steps=10, warmup=2, lr=1e-5, records=1000),
    ("dpo", "0.5b"): dict(seq=128, micro_batch=4, steps=2, warmup=1, lr=1e-6, records=200),
    ("grpo", "tiny"): dict(seq=128, prompts=16, generations=8, new_tokens=24, steps=4, warmup=1, lr=1e-6,
                           records=1000, micro_batch=32),
    ("grpo", "0.5b"): dict(seq=128, prompts=2, generations=4, new_tokens=64, steps=1, warmup=1, lr=1e-6,
                           records=200, micro_batch=8),
}


def loadavg():
    return " ".join(open("/proc/loadavg").read().split()[:3])


def proc_cpu_s(pid):
    """CPU seconds (user + system, every thread) the process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_child(cmd, log_path, env=None, watch=None, cpu_marks=None):
    """Runs cmd with stdout+stderr to log_path; returns (exit status, peak RSS bytes, wall seconds).
    With watch (a metrics.jsonl path) and cpu_marks (a list), appends (lines, CPU seconds of the child)
    whenever the file gains lines (polled every 50 ms): the CPU time of each step."""
    e = dict(os.environ)
    if env:
        e.update(env)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        p = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env=e, cwd=ROOT)
        seen = 0
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG if watch is not None else 0)
            if pid == p.pid:
                break
            try:
                n = sum(1 for _ in open(watch)) if os.path.exists(watch) else 0
                if n > seen:
                    cpu_marks.append((n, proc_cpu_s(p.pid)))
                    seen = n
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.05)
        p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, ru.ru_maxrss * 1024, time.perf_counter() - t0


def fail(msg, log_path=None):
    if log_path and Path(log_path).exists():
        sys.stderr.write("".join(open(log_path).readlines()[-40:]))
    sys.exit(msg)


# ---------------------------------------------------------------------------------------------
# Set-up: data and one model folder per shape.

def setup(a):
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    arith = work / "arith"
    if not (arith / "sft_train.jsonl").exists():
        rc, _, _ = run_child([a.ptk, "make-data", "arithmetic", "--out", arith, "--tokenizer", "bytes"],
                             work / "make-data.log")
        if rc != 0:
            fail("ptk make-data failed", work / "make-data.log")
    model = work / f"model-{a.shape}"
    if not (model / "config.json").exists():
        if a.shape == "tiny":
            cfg = json.loads((ROOT / "recipes/tiny/model.json").read_text())
            tok = arith
        else:
            cfg = dict(QWEN05B_CONFIG)
            tok = ROOT / "assets/tokenizers/qwen"
        tmp = work / f"model-{a.shape}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "wanted_config.json").write_text(json.dumps(cfg))
        rc, _, _ = run_child([sys.executable, __file__, "_make-model", tmp, tok], work / "make-model.log")
        if rc != 0:
            fail("making the model failed", work / "make-model.log")
        tmp.rename(model)
    if a.shape == "0.5b":
        # assets/tokenizers/qwen's tokenizer_config.json carries a chat template ptk does not recognise (it
        # runs Qwen2.5's, Qwen2's and plain ChatML, no arbitrary Jinja): give both sides Qwen2.5's (the
        # checkpoints' own, tests/tokenizer/data), so that they tokenize the same text.
        cfg = json.loads((ROOT / "assets/tokenizers/qwen/tokenizer_config.json").read_text())
        cfg["chat_template"] = json.loads(
            (ROOT / "tests/tokenizer/data/qwen2.5_tokenizer_config.json").read_text())["chat_template"]
        (model / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    if a.cmd == "grpo" and a.shape == "tiny":
        # GRPO from a random-init model scores 0 everywhere (zero advantages) and never stops early: train
        # the tiny model first (ptk sft, the tiny recipe, 1000 steps: "The answer is N." replies, some
        # right), so that groups carry signal and replies end at EOS as in the demo.
        sft_model = work / "model-tiny-sft"
        if not (sft_model / "config.json").exists():
            run = work / "tiny-sft-run"
            shutil.rmtree(run, ignore_errors=True)
            rc, _, _ = run_child([a.ptk, "sft", "--threads", a.threads, "--recipe", ROOT / "recipes/tiny/sft.json",
                                  f"run.dir={run}", f"tokenizer.path={arith}",
                                  f'data.train=["{arith}/sft_train.jsonl"]', "data.eval=[]", "train.max_steps=1000",
                                  "train.eval_every=0", "checkpoint.every=0", "sft.eval_prompts="], work / "tiny-sft.log")
            if rc != 0:
                fail("ptk sft (the tiny GRPO model) failed", work / "tiny-sft.log")
            (run / "final").rename(sft_model)
        model = sft_model
    # The first --records records of each file (the same lines for both sides).
    data = work / f"data-{a.cmd}-{a.shape}-{a.records}"
    data.mkdir(exist_ok=True)
    src = {"sft": "sft_train.jsonl", "dpo": "preference_train.jsonl", "grpo": "rl_train.jsonl"}[a.cmd]
    out = data / "train.jsonl"
    if not out.exists():
        with open(arith / src) as f:
            lines = [line for _, line in zip(range(a.records), f)]
        out.write_text("".join(lines))
    return model, out


def make_model(folder, tokenizer_folder):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    folder = Path(folder)
    cfg = json.loads((folder / "wanted_config.json").read_text())
    for k in ("architectures", "model_type", "torch_dtype"):
        cfg.pop(k, None)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg)).to(torch.float32)
    model.save_pretrained(str(folder))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_folder) / f, folder / f)
    (folder / "wanted_config.json").unlink()


# ---------------------------------------------------------------------------------------------
# ptk's side: a recipe written here, `ptk <stage> --recipe`, figures from metrics.jsonl.

def ptk_recipe(a, model, data, run_dir):
    r = {
        "run": {"dir": str(run_dir), "seed": 1234, "threads": a.threads},
        "model": {"path": str(model)},
        "tokenizer": {"path": str(model)},
        "data": {"train": [str(data)], "eval": [], "max_seq_len": a.seq},
        "train": {"max_steps": a.warmup + a.steps, "micro_batch_size": a.micro_batch, "grad_accum": 1,
                  "eval_every": 0, "log_every": 1},
        "optim": {"lr": a.lr, "min_lr": a.lr, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                  "betas": [0.9, 0.999], "eps": 1e-8, "clip_grad_norm": 1.0},
        "checkpoint": {"every": 0},
    }
    if a.cmd == "sft":
        r["data"]["packing"] = True
        r["sft"] = {"eval_prompts": ""}
    elif a.cmd == "dpo":
        r["dpo"] = {"loss_type": "sigmoid", "beta": 0.1, "precompute_ref_log_probs": False, "eval_prompts": ""}
    else:
        n = a.prompts * a.generations
        r["train"]["micro_batch_size"] = min(a.micro_batch, n)
        r["train"]["grad_accum"] = n // r["train"]["micro_batch_size"]
        r["grpo"] = {"num_generations": a.generations, "max_completion_length": a.new_tokens, "temperature": 1.0,
                     "reward_funcs": ["math"], "loss_type": "dapo", "beta": 0.0, "epsilon": 0.2,
                     "scale_rewards": "group", "num_iterations": 1, "eval_at_start": False,
                     "log_rollouts_every": 0}
        r["rollout"] = {"slots": min(n, 64)}
    return r


def run_ptk(a, model, data, rep):
    work = Path(a.work)
    run_dir = work / f"run-ptk-{a.cmd}-{a.shape}-{rep}"
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = work / f"recipe-{a.cmd}-{a.shape}.json"
    recipe.write_text(json.dumps(ptk_recipe(a, model, data, run_dir), indent=1))
    log = work / f"ptk-{a.cmd}-{a.shape}-{rep}.log"
    marks = []
    rc, rss, wall = run_child([a.ptk, a.cmd, "--threads", a.threads, "--recipe", recipe], log,
                              env={"OMP_NUM_THREADS": str(a.threads)}, watch=run_dir / "metrics.jsonl",
                              cpu_marks=marks)
    if rc != 0:
        fail(f"ptk {a.cmd} exited {rc} ({log})", log)
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl") if l.strip()]
    rows = [r for r in rows if "step_time_s" in r]
    timed = rows[a.warmup:]
    prev = rows[a.warmup - 1]["num_tokens"] if a.warmup > 0 else 0
    toks = [r["num_tokens"] for r in rows]
    res = {"step_s": [r["step_time_s"] for r in timed], "tokens": timed[-1]["num_tokens"] - prev,
           "step_tokens": [toks[i] - (toks[i - 1] if i > 0 else 0) for i in range(a.warmup, len(rows))],
           "rss": rss, "own_peak_rss": max(r["peak_rss_bytes"] for r in rows), "wall": wall}
    if a.cmd == "grpo":
        res["gen_s"] = [r.get("time/generate_s", float("nan")) for r in timed]
        res["completion_len"] = [r.get("completions/mean_length", float("nan")) for r in timed]
    # CPU seconds per timed step: the child's CPU time when metrics.jsonl reached the last warm-up line and
    # the last line (first sighting of each, 50 ms polls; NaN when a step was too short to be seen).
    at = dict(marks)
    first, last = a.warmup, a.warmup + a.steps
    res["cpu_per_step"] = ((at[last] - at[first]) / a.steps if first in at and last in at and first > 0
                           else float("nan"))
    shutil.rmtree(run_dir / "final", ignore_errors=True)  # 2 GB at 0.5B
    return res


# ---------------------------------------------------------------------------------------------
# TRL's side: a child process (`_trl`) whose peak RSS is its own.

def run_trl(a, model, data, rep):
    work = Path(a.work)
    log = work / f"trl-{a.cmd}-{a.shape}-{rep}.log"
    out = work / f"trl-{a.cmd}-{a.shape}-{rep}.json"
    out.unlink(missing_ok=True)
    args = dict(vars(a), model=str(model), data=str(data), out=str(out),
                out_dir=str(work / f"run-trl-{a.cmd}-{a.shape}"))
    rc, rss, wall = run_child([sys.executable, __file__, "_trl", json.dumps(args)], log,
                              env={"OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false",
                                   "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_DISABLED": "true",
                                   "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"})
    if rc != 0 or not out.exists():
        fail(f"TRL {a.cmd} exited {rc} ({log})", log)
    res = json.loads(out.read_text())
    steps = res["steps"][a.warmup:]
    r = {"step_s": [s["dt"] for s in steps], "tokens": sum(s["tokens"] for s in steps),
         "step_tokens": [s["tokens"] for s in steps], "rss": rss, "wall": wall,
         "cpu_per_step": statistics.mean(s.get("cpu_s", float("nan")) for s in steps)}
    if a.cmd == "grpo":
        r["gen_s"] = [s.get("gen_s", float("nan")) for s in steps]
        r["completion_len"] = [s.get("completion_len", float("nan")) for s in steps]
    return r


def trl_child(args):
    a = argparse.Namespace(**json.loads(args))
    import torch
    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    records = [json.loads(l) for l in open(a.data) if l.strip()]
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    common = dict(output_dir=a.out_dir, max_steps=a.warmup + a.steps, per_device_train_batch_size=a.micro_batch,
                  gradient_accumulation_steps=1, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
                  weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
                  bf16=False, fp16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
                  eval_strategy="no", report_to="none", use_cpu=True, seed=1234, dataloader_num_workers=0,
                  disable_tqdm=True)
    steps = []
    gen_s = [0.0]

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            gen_s[0] = 0.0
            self.t0 = time.perf_counter()
            self.c0 = time.process_time()
            self.tok0 = getattr(trainer, "_total_train_tokens", 0)

        def on_step_end(self, args, state, control, **kw):
            dt = time.perf_counter() - self.t0
            steps.append({"dt": dt, "tokens": getattr(trainer, "_total_train_tokens", 0) - self.tok0,
                          "gen_s": gen_s[0], "cpu_s": time.process_time() - self.c0})
            print(f"step {state.global_step}: {dt:.3f} s", flush=True)

        def on_log(self, args, state, control, logs=None, **kw):
            if steps and logs:  # GRPO's per-step generation figures
                if "completions/mean_length" in logs:
                    steps[-1]["completion_len"] = logs["completions/mean_length"]

    if a.cmd == "sft":
        from trl import SFTConfig, SFTTrainer
        # Conversational prompt/completion: TRL's completion_only_loss (its default for this format) trains
        # on the assistant reply only, as ptk does on messages.
        ds = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records])
        cfg = SFTConfig(**common, packing=True, max_length=a.seq, shuffle_dataset=False)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    elif a.cmd == "dpo":
        from trl import DPOConfig, DPOTrainer
        ds = Dataset.from_list(records)
        cfg = DPOConfig(**common, max_length=a.seq, loss_type=["sigmoid"], beta=0.1, precompute_ref_log_probs=False)
        trainer = DPOTrainer(model=model, ref_model=None, args=cfg, train_dataset=ds, processing_class=tok,
                             callbacks=[Timer()])
    else:
        import re
        from trl import GRPOConfig, GRPOTrainer
        num = re.compile(r"-?\d+(?:\.\d+)?")

        def math_reward(completions, answer, **kw):  # the last number of the reply equals the answer
            out = []
            for c, ans in zip(completions, answer):
                text = c[-1]["content"] if isinstance(c, list) else c
                found = num.findall(text.replace(",", ""))
                out.append(1.0 if found and float(found[-1]) == float(ans) else 0.0)
            return out

        n = a.prompts * a.generations
        mb = min(a.micro_batch, n)
        common.update(per_device_train_batch_size=mb, gradient_accumulation_steps=n // mb)
        ds = Dataset.from_list(records)
        cfg = GRPOConfig(**common, num_generations=a.generations, max_completion_length=a.new_tokens,
                         temperature=1.0, beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group",
                         num_iterations=1, use_vllm=False, log_completions=False, shuffle_dataset=True)
        trainer = GRPOTrainer(model=model, reward_funcs=[math_reward], args=cfg, train_dataset=ds,
                              processing_class=tok, callbacks=[Timer()])
        generate = trainer._generate_single_turn

        def timed_generate(*args, **kw):  # transformers' generate() and its prompt/completion handling
            t0 = time.perf_counter()
            out = generate(*args, **kw)
            gen_s[0] += time.perf_counter() - t0
            return out

        trainer._generate_single_turn = timed_generate
    print(f"TRL {a.cmd}: torch {torch.__version__}, {torch.get_num_threads()} threads, attention "
          f"{trainer.model.config._attn_implementation}, activation checkpointing "
          f"{getattr(trainer.model, 'is_gradient_checkpointing', '?')}", flush=True)
    trainer.train()
    Path(a.out).write_text(json.dumps({"steps": steps}))


# ---------------------------------------------------------------------------------------------

def fmt_gib(b):
    return f"{b / 2**30:.2f} GiB"


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_make-model":
        return make_model(sys.argv[2], sys.argv[3])
    if len(sys.argv) > 1 and sys.argv[1] == "_trl":
        return trl_child(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=["sft", "dpo", "grpo"])
    ap.add_argument("--shape", choices=["tiny", "0.5b"], default="tiny")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--first", choices=["ptk", "trl"], default="ptk", help="the side that runs first in repeat 1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/ptk_trl_compare")
    ap.add_argument("--ptk", default=os.environ.get("PTK", str(ROOT / "build/bin/ptk")))
    for k in ("seq", "micro_batch", "steps", "warmup", "records", "prompts", "generations", "new_tokens"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    a = ap.parse_args()
    for k, v in DEFAULTS[(a.cmd, a.shape)].items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    for k in ("prompts", "generations", "new_tokens"):
        if getattr(a, k) is None:
            setattr(a, k, 0)
    if not Path(a.ptk).exists():
        sys.exit(f"no ptk at {a.ptk} (scripts/build.sh, or set PTK)")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    import transformers
    import trl
    print(f"trl_compare {a.cmd} --shape {a.shape}: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, "
          f"{os.cpu_count()} cores, load {loadavg()}, {a.threads} threads, OMP_WAIT_POLICY "
          f"{os.environ['OMP_WAIT_POLICY']}; trl {trl.__version__}, transformers {transformers.__version__}, "
          f"torch {torch.__version__}", flush=True)
    if a.cmd == "grpo":
        print(f"  {a.prompts} prompts x {a.generations} completions of <= {a.new_tokens} tokens a step, "
              f"micro-batch {min(a.micro_batch, a.prompts * a.generations)}; {a.warmup} warm-up + {a.steps} timed steps",
              flush=True)
    else:
        unit = "packed rows" if a.cmd == "sft" else "pairs"
        print(f"  {a.micro_batch} {unit} a step, max_seq_len {a.seq}; {a.warmup} warm-up + {a.steps} timed steps",
              flush=True)
    model, data = setup(a)
    ours, theirs = [], []
    for rep in range(a.repeats):
        # Alternate which side goes first, so that a load trend on the shared machine favours neither.
        for side in (("ptk", "TRL") if (rep + (a.first == "trl")) % 2 == 0 else ("TRL", "ptk")):
            print(f"-- repeat {rep + 1}/{a.repeats}: {side} {a.cmd} (load before {loadavg()})", flush=True)
            r = run_ptk(a, model, data, rep) if side == "ptk" else run_trl(a, model, data, rep)
            (ours if side == "ptk" else theirs).append(r)
            print(f"   {side}: steps {', '.join(f'{x:.3f}' for x in r['step_s'])} s, wall {r['wall']:.1f} s, "
                  f"peak RSS {fmt_gib(r['rss'])}; load after {loadavg()}", flush=True)

    def rate(r):
        if a.cmd == "sft":
            return r["tokens"] / sum(r["step_s"])
        if a.cmd == "dpo":
            return a.micro_batch * len(r["step_s"]) / sum(r["step_s"])
        return sum(r["step_s"]) / len(r["step_s"])  # seconds per step

    name = {"sft": "tokens/s", "dpo": "pairs/s", "grpo": "s/step"}[a.cmd]
    def best(r):  # the fastest timed step alone: less exposed to the other tenants' bursts
        i = min(range(len(r["step_s"])), key=lambda k: r["step_s"][k])
        if a.cmd == "sft":
            return r["step_tokens"][i] / r["step_s"][i]
        return a.micro_batch / r["step_s"][i] if a.cmd == "dpo" else r["step_s"][i]

    rows = [(name, [rate(r) for r in ours], [rate(r) for r in theirs], a.cmd != "grpo"),
            (name + ", best step", [best(r) for r in ours], [best(r) for r in theirs], a.cmd != "grpo"),
            ("CPU s/step", [r["cpu_per_step"] for r in ours], [r["cpu_per_step"] for r in theirs], False),
            ("peak RSS (GiB)", [r["rss"] / 2**30 for r in ours], [r["rss"] / 2**30 for r in theirs], False)]
    if a.cmd == "grpo":
        rows.append(("generation s/step", [statistics.mean(r["gen_s"]) for r in ours],
                     [statistics.mean(r["gen_s"]) for r in theirs], False))
        rows.append(("completion length", [statistics.mean(r["completion_len"]) for r in ours],
                     [statistics.mean(r["completion_len"]) for r in theirs], None))
    print(f"\n== {a.cmd} {a.shape}: {a.repeats} repeat(s); ratio = ptk/TRL for rates, TRL/ptk for seconds and "
          "memory (above 1 favours ptk); min / median over the repeats")
    print(f"  {'figure':<20} {'ptk (min / median)':>24} {'TRL (min / median)':>24} {'ratio (min / median)':>22}")
    for label, o, t, higher_better in rows:
        if higher_better is None:
            ratios = []
        elif higher_better:
            ratios = [x / y for x, y in zip(o, t)]
        else:
            ratios = [y / x for x, y in zip(o, t)]
        fo = f"{min(o):.4g} / {statistics.median(o):.4g}"
        ft = f"{min(t):.4g} / {statistics.median(t):.4g}"
        fr = f"{min(ratios):.2f}x / {statistics.median(ratios):.2f}x" if ratios and ratios[0] == ratios[0] else ""
        print(f"  {label:<20} {fo:>24} {ft:>24} {fr:>22}")
    print(f"  ptk's own peak_rss_bytes (metrics.jsonl): " + ", ".join(fmt_gib(r["own_peak_rss"]) for r in ours))
    print("RESULT_JSON " + json.dumps({"cmd": a.cmd, "shape": a.shape, "ptk": ours, "trl": theirs}))


if __name__ == "__main__":
    main()
