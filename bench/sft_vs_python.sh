#!/usr/bin/env bash
# Issue 11's benchmark: `ptk sft` against the eager PyTorch loop an HF-Trainer user runs
# (bench/sft_python_loop.py: same model config, same prepared packed rows, same micro-batch, same
# loss, torch.optim.AdamW, same thread count), run one after the other in the same invocation.
# Prints tokens/s and MFU of both and the ratio. Never fails on time.
#
#   bench/sft_vs_python.sh [tiny|0.5b|all]      (default all; run from the repository root)
#   env: PTK (default build/bin/ptk), PY (default .venv/bin/python3: the torch 2.11.0 wheel ptk links),
#        WORK (default /tmp/h3/sft_vs_python), THREADS (default 2),
#        TINY_STEPS (default 30), BIG_STEPS (default 4), WARMUP (untimed first steps, default 2 tiny / 1 0.5b)
#
# tiny: recipes/tiny/model.json (2 layers, hidden 128, vocab 259) on `ptk make-data arithmetic
#       --tokenizer bytes` data, recipes/tiny/sft.json with the shape pinned by overrides: 8 packed rows
#       of 256 tokens, lr 3e-3, 20 warm-up steps, weight decay 0.01, betas 0.9/0.95, clipping 1.0.
#       SFT_EXTRA: more ptk overrides (e.g. sft.eval_prompts= to skip a held-out eval at the end).
# 0.5b: the Qwen2.5-0.5B config (random init, vocab 151,936, tied), the same data packed into
#       rows of 1024 tokens, 1 row per step, lr 1e-5.
# Both sides time a step from batch construction to the optimizer step (ptk: metrics.jsonl's
# step_time_s; eval and checkpoints are off) and skip the first WARMUP steps. MFU uses ptk sft's
# FLOPs per token (6N + 3 L nh D T) over each side's own fp32 1024^3 matmul peak (same LibTorch build).
set -euo pipefail
# ptk re-executes itself with OMP_WAIT_POLICY=PASSIVE when unset (apps/ptk/main.cpp); give the Python
# loop the same OpenMP policy.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
which_runs=${1:-all}
PTK=${PTK:-build/bin/ptk}
PY=${PY:-.venv/bin/python3}
WORK=${WORK:-/tmp/h3/sft_vs_python}
THREADS=${THREADS:-2}
TINY_STEPS=${TINY_STEPS:-30}
BIG_STEPS=${BIG_STEPS:-4}
[ -x "$PTK" ] || { echo "no ptk at $PTK (scripts/build.sh, or set PTK)" >&2; exit 2; }
[ -x "$PY" ] || { echo "no Python at $PY (scripts/setup.sh makes .venv, or set PY)" >&2; exit 2; }
mkdir -p "$WORK"
echo "sft_vs_python: $(date -u +%FT%TZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), threads $THREADS," \
  "OMP_WAIT_POLICY $OMP_WAIT_POLICY, python torch $("$PY" -c 'import torch; print(torch.__version__)')"

if [ ! -f "$WORK/arith/sft_train.jsonl" ]; then
  "$PTK" make-data arithmetic --out "$WORK/arith" --tokenizer bytes >/dev/null
fi

# ptk's metrics.jsonl -> tokens/s and MFU over steps after the warm-up (tokens from num_tokens).
ptk_figures() {  # metrics.jsonl warmup
  "$PY" - "$1" "$2" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
warm = int(sys.argv[2])
prev = rows[warm - 1]["num_tokens"] if warm > 0 else 0
timed = rows[warm:]
tokens = timed[-1]["num_tokens"] - prev
secs = sum(r["step_time_s"] for r in timed)
tps = tokens / secs
# mfu = fpt * tok/s / peak per step: recover fpt/peak from any step, then apply to the mean rate.
k = timed[0]["mfu"] / timed[0]["tokens_per_s"]
print(json.dumps({"tokens_per_s": tps, "mfu": k * tps, "steps": len(timed), "step_s": secs / len(timed),
                  "peak_rss_gb": max(r["peak_rss_bytes"] for r in rows) / 2**30}))
EOF
}

compare() {  # name ptk_json py_json
  "$PY" - "$@" <<'EOF'
import json, sys
name, a, b = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"\n== {name} ==")
print(f"  ptk sft      : {a['tokens_per_s']:9.1f} tokens/s  MFU {100*a['mfu']:5.1f}%  ({a['steps']} timed steps, {a['step_s']:.3f} s/step, peak RSS {a['peak_rss_gb']:.2f} GiB)")
print(f"  python loop  : {b['tokens_per_s']:9.1f} tokens/s  MFU {100*b['mfu']:5.1f}%  ({b['steps']} timed steps, {b['step_s']:.3f} s/step, peak {b['peak_gflops']:.1f} GFLOP/s, peak RSS {b['peak_rss_gb']:.2f} GiB)")
print(f"RESULT {name}: ptk/python = {a['tokens_per_s']/b['tokens_per_s']:.2f}x tokens/s")
EOF
}

run_pair() {  # name warmup steps micro_batch python-args... -- ptk-overrides...
  local name=$1 warm=$2 steps=$3 mb=$4; shift 4
  local pyargs=() ; while [ "$1" != "--" ]; do pyargs+=("$1"); shift; done; shift
  local run="$WORK/run-$name"
  rm -rf "$run"
  echo "-- $name: ptk sft ($((warm + steps)) steps) -- load $(cut -d' ' -f1-3 /proc/loadavg)"
  "$PTK" sft --threads "$THREADS" --recipe recipes/tiny/sft.json run.dir="$run" \
    tokenizer.path="$WORK/arith" data.train="[\"$WORK/arith/sft_train.jsonl\"]" data.eval="[]" \
    train.max_steps=$((warm + steps)) train.micro_batch_size="$mb" train.eval_every=0 train.log_every=1 \
    checkpoint.every=0 ${SFT_EXTRA:-} "$@" 2>&1 | grep -v '^\s*$' | tail -n 4
  local ptk_json; ptk_json=$(ptk_figures "$run/metrics.jsonl" "$warm")
  echo "-- $name: python loop -- load $(cut -d' ' -f1-3 /proc/loadavg)"
  local log="$WORK/python-$name.log"
  /usr/bin/time -f '%M' -o "$WORK/python-$name.rss" "$PY" bench/sft_python_loop.py --data "$run/data/train" \
    --micro-batch "$mb" --steps "$steps" --warmup "$warm" --threads "$THREADS" "${pyargs[@]}" >"$log" 2>&1 ||
    { tail -n 20 "$log"; exit 1; }
  tail -n 3 "$log" | grep -v RESULT_JSON || true
  local py_json; py_json=$(grep '^RESULT_JSON ' "$log" | cut -d' ' -f2-)
  py_json=$("$PY" -c 'import json,sys; d=json.loads(sys.argv[1]); d["peak_rss_gb"]=int(sys.argv[2])/2**20; print(json.dumps(d))' \
    "$py_json" "$(cat "$WORK/python-$name.rss")")
  compare "$name" "$ptk_json" "$py_json"
}

if [ "$which_runs" = tiny ] || [ "$which_runs" = all ]; then
  # recipes/tiny/sft.json: lr 3e-3, warmup 20, weight decay 0.01, betas 0.9/0.95, clip 1.0, 8 rows of 256.
  run_pair tiny "${WARMUP:-2}" "$TINY_STEPS" 8 \
    --config recipes/tiny/model.json --lr 3e-3 --warmup-steps 20 --weight-decay 0.01 --betas 0.9 0.95 --clip 1.0 \
    --pad-id 256 -- data.max_seq_len=256 data.packing=true optim.lr=3e-3 optim.warmup_steps=20 \
    optim.weight_decay=0.01 'optim.betas=[0.9,0.95]' optim.clip_grad_norm=1.0
fi

if [ "$which_runs" = 0.5b ] || [ "$which_runs" = all ]; then
  cfg="$WORK/qwen2.5-0.5b-config.json"
  cat >"$cfg" <<'EOF'
{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
 "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
 "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "hidden_act": "silu",
 "initializer_range": 0.02, "tie_word_embeddings": true, "use_sliding_window": false, "attention_dropout": 0.0,
 "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "float32"}
EOF
  run_pair 0.5b "${WARMUP:-1}" "$BIG_STEPS" 1 \
    --config "$cfg" --lr 1e-5 --warmup-steps 0 --weight-decay 0.01 --betas 0.9 0.95 --clip 1.0 --pad-id 256 -- \
    model.config="$cfg" data.max_seq_len=1024 data.packing=true optim.lr=1e-5 optim.min_lr=1e-6 optim.warmup_steps=0
fi
