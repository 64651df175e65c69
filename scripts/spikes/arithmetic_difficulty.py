# Spike behind the arithmetic demo's default difficulty (datasets/arithmetic.h): how much of the task a
# 2-layer hidden-128 byte-level GPT learns in a fixed CPU budget. A measurement, not part of ptk.
# Usage: python3 arithmetic_difficulty.py DIGITS OPS SECONDS   e.g.  2 + 150  (one thread; needs PyTorch)
import sys, time, random, math, torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(1); torch.manual_seed(0); random.seed(0)
D, OPS, SECS = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
EOT, IMS, IME = 256, 257, 258; V = 259
hi = 10 ** D
probs = [(a, op, b) for op in OPS for a in range(hi) for b in range(hi) if not (op == '-' and b > a)]
random.shuffle(probs)
n_eval = min(300, len(probs) // 5)
ev, tr = probs[:n_eval], probs[n_eval:]
def ans(a, op, b): return a + b if op == '+' else a - b if op == '-' else a * b
def enc(s): return list(s.encode())
def prompt_ids(p):
    a, op, b = p
    return [IMS] + enc("user\nWhat is %d %s %d?" % (a, op, b)) + [IME] + enc("\n") + [IMS] + enc("assistant\n")
def sample(p):
    pi = prompt_ids(p); ci = enc("The answer is %d." % ans(*p)) + [IME]
    return pi + ci, len(pi)
class Block(nn.Module):
    def __init__(s, h, nh):
        super().__init__(); s.n1 = nn.LayerNorm(h); s.att = nn.Linear(h, 3 * h); s.o = nn.Linear(h, h)
        s.n2 = nn.LayerNorm(h); s.mlp = nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h)); s.nh = nh
    def forward(s, x):
        B, T, C = x.shape; q, k, v = s.att(s.n1(x)).split(C, 2)
        q, k, v = [t.view(B, T, s.nh, C // s.nh).transpose(1, 2) for t in (q, k, v)]
        a = (q @ k.transpose(-1, -2)) / math.sqrt(C // s.nh)
        a = a.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float('-inf')).softmax(-1)
        x = x + s.o((a @ v).transpose(1, 2).reshape(B, T, C)); return x + s.mlp(s.n2(x))
class GPT(nn.Module):
    def __init__(s, h=128, L=2, nh=4):
        super().__init__(); s.e = nn.Embedding(V, h); s.p = nn.Embedding(96, h)
        s.b = nn.ModuleList([Block(h, nh) for _ in range(L)]); s.n = nn.LayerNorm(h); s.out = nn.Linear(h, V, bias=False)
    def forward(s, x):
        x = s.e(x) + s.p(torch.arange(x.shape[1]))
        for b in s.b: x = b(x)
        return s.out(s.n(x))
m = GPT(); opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
BS = 32; t0 = time.time(); step = 0
while time.time() - t0 < SECS:
    batch = [sample(random.choice(tr)) for _ in range(BS)]
    T = max(len(s) for s, _ in batch)
    x = torch.full((BS, T), EOT); y = torch.full((BS, T), -100)
    for i, (s, pl) in enumerate(batch):
        x[i, :len(s)] = torch.tensor(s); y[i, pl - 1:len(s) - 1] = torch.tensor(s[pl:])
    frac = (time.time() - t0) / SECS
    for g in opt.param_groups: g['lr'] = 3e-3 * min(1, step / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    loss = F.cross_entropy(m(x).view(-1, V), y.view(-1), ignore_index=-100)
    opt.zero_grad(); loss.backward(); opt.step(); step += 1
m.eval(); right = fmt = 0
with torch.no_grad():
    for p in ev:
        ids = prompt_ids(p); out = []
        for _ in range(24):
            nxt = int(m(torch.tensor([ids + out]))[0, -1].argmax())
            if nxt == IME: break
            out.append(nxt)
        s = bytes(o for o in out if o < 256).decode(errors='replace')
        fmt += s.startswith("The answer is ") and s.endswith(".")
        right += s == "The answer is %d." % ans(*p)
print("digits=%d ops=%s train_pool=%d steps=%d final_loss=%.3f heldout=%d/%d format=%d/%d" % (D, OPS, len(tr), step, loss.item(), right, len(ev), fmt, len(ev)), flush=True)
