#!/usr/bin/env python3
"""Reference trajectory for tests/optim/optim_test.cpp (AdamW.MatchesTorchAdamWOverStepsWithGroups):
torch.optim.AdamW with two param groups (weight decay on / off) driven by transformers'
get_cosine_with_min_lr_schedule_with_warmup, fed a fixed gradient sequence. Never used by ptk.

    python3 torch_adamw_reference.py INPUT.json OUTPUT.json

INPUT: {"betas": [b1, b2], "eps", "weight_decay", "steps",
        "schedule": {"lr", "min_lr", "warmup_steps", "total_steps"},
        "params": [{"name", "shape", "no_decay": bool, "init": [...], "grads": [[step 1], [step 2], ...]}]}
OUTPUT: {"lr": [lr of step 1, ...], "params": {name: [[after step 1], [after step 2], ...]}}
Values are float32 numbers written as the double they equal (exact both ways).
"""
import json
import sys

import torch
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

inp_path, out_path = sys.argv[1:3]
with open(inp_path, encoding="utf-8") as f:
    inp = json.load(f)

params, grads = {}, {}
decay, no_decay = [], []
for p in inp["params"]:
    t = torch.tensor(p["init"], dtype=torch.float32).reshape(p["shape"]).requires_grad_(True)
    params[p["name"]] = t
    grads[p["name"]] = [torch.tensor(g, dtype=torch.float32).reshape(p["shape"]) for g in p["grads"]]
    (no_decay if p["no_decay"] else decay).append(t)

s = inp["schedule"]
# The torch default on CPU tensors (foreach and fused unset): the single-tensor for-loop path.
opt = torch.optim.AdamW(
    [{"params": decay, "weight_decay": inp["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
    lr=s["lr"], betas=tuple(inp["betas"]), eps=inp["eps"])
sched = get_cosine_with_min_lr_schedule_with_warmup(
    opt, num_warmup_steps=s["warmup_steps"], num_training_steps=s["total_steps"], min_lr=s["min_lr"])

out = {"lr": [], "params": {name: [] for name in params}}
for k in range(inp["steps"]):
    for name, t in params.items():
        t.grad = grads[name][k].clone()
    out["lr"].append(opt.param_groups[0]["lr"])
    opt.step()
    sched.step()
    for name, t in params.items():
        out["params"][name].append(t.detach().reshape(-1).tolist())
with open(out_path, "w", encoding="utf-8") as f:
    json.dump(out, f)
