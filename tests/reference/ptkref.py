"""The reference suite's shared harness (tests/reference/): ptk and a peer (TRL, transformers, OpenRLHF's
client) on the same tiny Qwen2, the same data and hyper-parameters, fp32 on CPU.

Each *_test.py is a unittest module that ends with `ptkref.main()`. ctest runs it with the project's
.venv Python (tests/reference/CMakeLists.txt, label `reference`). What this module gives them:
  - need(*modules): imports a peer package, or skips the test with "[peers] ..." (fails instead when
    $PTK_REQUIRE lists "peers", as scripts/test.sh sets it once set-up has installed them);
  - ptk(*args): runs the ptk binary ($PTK_BINARY), failing with its output when it exits non-zero;
  - tiny_tokenizer(folder): a small byte-level BPE (Qwen2's pre-tokenizer regex, NFC, ChatML specials,
    merges trained on `corpus`) with Qwen2.5's chat template, written as tokenizer.json +
    tokenizer_config.json, which both transformers and ptk load;
  - tiny_qwen2(folder, ...): a random-init Qwen2ForCausalLM saved by transformers (fp32 safetensors);
  - metrics(run_dir): ptk's metrics.jsonl as a list of dicts;
  - ptk_row_order / ptk_micro_batch_rows: the order ptk's loader visits rows in, for the peer's
    sequential sampler;
  - assert_close(name, ours, theirs, rtol, atol): element-wise comparison with a message naming the
    quantity, the step and both values;
  - JsonPostServer(respond): a local reward server the test controls (answers, failures);
  - main(): runs the module's tests, writes one line per test to $PTK_TEST_RESULTS_DIR/<module>.tsv in
    the format of tests/support/test_main.cpp (scripts/test_summary.sh adds them up), prints the
    all-skipped line ctest turns into "Skipped", exits 1 on a failure.
Nothing here times anything: benchmarks live in bench/.
"""
import json
import math
import os
import subprocess
import sys
import tempfile
import traceback
import unittest
from pathlib import Path

ALL_SKIPPED = "ptk-test: every test of this executable skipped"
HERE = Path(__file__).resolve().parent
SOURCE_DIR = Path(os.environ.get("PTK_SOURCE_DIR", HERE.parent.parent)).resolve()
PTK = os.environ.get("PTK_BINARY", str(SOURCE_DIR / "build" / "bin" / "ptk"))
# Qwen2.5's tokenizer_config.json (chat template, special tokens), as shipped with the checkpoints.
QWEN25_TOKENIZER_CONFIG = SOURCE_DIR / "tests" / "tokenizer" / "data" / "qwen2.5_tokenizer_config.json"

# Threads for both sides: the suite runs two tests at once (ctest -j2) on a 2-core machine, and
# comparisons need no speed. Set before torch is imported by any test module.
THREADS = int(os.environ.get("PTK_REFERENCE_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")            # nothing is downloaded: every model is made here
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("WANDB_DISABLED", "true")


def required(resource):
    """Whether $PTK_REQUIRE (comma-separated) lists `resource` (see tests/support/test_util.h)."""
    return resource in [r.strip() for r in os.environ.get("PTK_REQUIRE", "").split(",")]


def skip_without(resource, reason):
    """Skips the calling test for want of `resource`, or fails it when $PTK_REQUIRE lists it."""
    if required(resource):
        raise AssertionError(f'PTK_REQUIRE lists "{resource}", so this test may not skip for want of it: {reason}')
    raise unittest.SkipTest(f"[{resource}] {reason}")


def need(*modules):
    """Imports each module (a peer package) and returns the last; skips the test when one is missing."""
    import importlib
    mod = None
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            skip_without("peers", f"Python package `{name}` is not installed in .venv ({e}); "
                                  "scripts/setup.sh installs the pinned peers (requirements.txt)")
    return mod


def ptk(*args, cwd=None, env=None, timeout=600, check=True):
    """Runs `ptk args...` and returns the CompletedProcess (stdout and stderr together in .stdout)."""
    if not Path(PTK).exists():
        raise AssertionError(f"ptk binary not found at {PTK} (build first: scripts/build.sh)")
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", str(THREADS))
    if env:
        e.update(env)
    cmd = [PTK] + [str(a) for a in args]
    p = subprocess.run(cmd, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"`{' '.join(cmd)}` exited {p.returncode}:\n{p.stdout[-6000:]}")
    return p


def write_jsonl(path, records):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def metrics(run_dir):
    """ptk's per-step metrics (run folder's metrics.jsonl), training lines only (those with "step")."""
    out = []
    with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


# Qwen2's pre-tokenizer regex (tokenizer.json of every Qwen2/2.5 checkpoint).
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 + 30? The answer is 42.",
    "Making a plan: first read the question, then answer it in one sentence.",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "Write a short poem about the sea.\nThe sea is wide, the sea is deep.",
    "用一句话介绍你自己。我是一个乐于助人的助手。",
    "def add(a, b):\n    return a + b\n",
]


def tiny_tokenizer(folder, corpus=None, vocab_size=400):
    """Writes a small byte-level BPE tokenizer to `folder` (tokenizer.json, tokenizer_config.json with
    Qwen2.5's chat template) and returns the folder. Same structure as Qwen2.5's: NFC normalizer,
    Split(Qwen2 regex) + ByteLevel pre-tokenizer, ByteLevel decoder, ChatML special tokens; merges are
    trained on `corpus` (deterministic), so BPE boundaries matter as they do with the real vocabulary."""
    need("tokenizers")
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(list(corpus or DEFAULT_CORPUS) * 4, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(folder / "tokenizer.json"))
    cfg = json.loads(QWEN25_TOKENIZER_CONFIG.read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"] = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    cfg["model_max_length"] = 4096
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    write_json(folder / "tokenizer_config.json", cfg)
    return folder


def tokenizer_size(folder):
    d = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
    ids = list(d["model"]["vocab"].values()) + [t["id"] for t in d.get("added_tokens", [])]
    return max(ids) + 1


def tiny_qwen2(folder, tokenizer_folder=None, seed=0, tie=True, hidden=32, layers=2, heads=4, kv_heads=2,
               intermediate=64, vocab_size=None, dtype="float32", max_shard_size=None):
    """A random-init Qwen2ForCausalLM saved by transformers to `folder` (with the tokenizer files when
    `tokenizer_folder` is given); returns the folder. vocab_size defaults to the tokenizer's size."""
    need("torch", "transformers")
    import shutil
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    folder = Path(folder)
    if vocab_size is None:
        vocab_size = tokenizer_size(tokenizer_folder) if tokenizer_folder else 512
    ids = {}
    if tokenizer_folder:
        d = json.loads((Path(tokenizer_folder) / "tokenizer.json").read_text(encoding="utf-8"))
        ids = {t["content"]: t["id"] for t in d.get("added_tokens", [])}
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
                      max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=tie, bos_token_id=ids.get("<|endoftext|>"),
                      eos_token_id=ids.get("<|im_end|>"), pad_token_id=ids.get("<|endoftext|>"))
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype))
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **kw)
    if tokenizer_folder:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(tokenizer_folder) / f, folder / f)
    return folder


# ---- ptk's row order (datasets/loader.cpp: Permutation, Loader::next_rows) -----------------------
# ptk always shuffles (no sequential order); the reference tests replay its order into the peer's
# sequential sampler. A change of the loader's permutation fails them at step 1 (num_tokens).

_M64 = (1 << 64) - 1


def splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def ptk_row_order(n, seed, epoch=0):
    """The row ids ptk's Loader (one rank) visits in `epoch`: a 4-round Feistel network on the next
    even power of two, keyed by splitmix64(seed ^ splitmix64(epoch + 1)), cycle-walked into [0, n)."""
    bits = 2
    while bits < 64 and (1 << bits) < n:
        bits += 1
    if bits % 2:
        bits += 1
    half = bits // 2
    mask = (1 << half) - 1
    keys, k = [], splitmix64(seed ^ splitmix64(epoch + 1))
    for _ in range(4):
        k = splitmix64(k)
        keys.append(k)

    def perm(i):
        x = i
        while True:
            left, right = x >> half, x & mask
            for key in keys:
                left, right = right, left ^ (splitmix64(right ^ key) & mask)
            x = (left << half) | right
            if x < n:
                return x

    return [perm(i) for i in range(n)]


def ptk_micro_batch_rows(n, micro_batch_size, micro_batches, seed):
    """The row ids ptk's Loader hands out, micro-batch after micro-batch (one rank): an epoch's last
    micro-batch is filled from the start of that epoch's order, then the next epoch reshuffles."""
    per_epoch = (n + micro_batch_size - 1) // micro_batch_size
    out, epoch, batch = [], 0, 0
    order = ptk_row_order(n, seed, epoch)
    for _ in range(micro_batches):
        if batch >= per_epoch:
            epoch, batch = epoch + 1, 0
            order = ptk_row_order(n, seed, epoch)
        base = batch * micro_batch_size
        out.extend(order[(base + j) % n] for j in range(micro_batch_size))
        batch += 1
    return out


def _flat(x):
    try:
        import torch
        if isinstance(x, torch.Tensor):
            return [float(v) for v in x.detach().double().flatten().tolist()]
    except ImportError:
        pass
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        out = []
        for v in x:
            out.extend(_flat(v))
        return out
    return [float(x)]


def assert_close(name, ours, theirs, rtol=1e-5, atol=1e-6):
    """Element-wise |ours - theirs| <= atol + rtol * |theirs| (NaN equals NaN); the message names the
    quantity, the worst element and both values."""
    a, b = _flat(ours), _flat(theirs)
    if len(a) != len(b):
        raise AssertionError(f"{name}: ptk has {len(a)} values, the reference {len(b)}")
    worst, worst_i = -1.0, -1
    for i, (x, y) in enumerate(zip(a, b)):
        if math.isnan(x) and math.isnan(y):
            continue
        err = abs(x - y) - (atol + rtol * abs(y))
        if math.isnan(err) or err > worst:
            worst, worst_i = (math.inf if math.isnan(err) else err), i
    if worst > 0:
        i = worst_i
        raise AssertionError(f"{name}: element {i} of {len(a)}: ptk {a[i]!r} vs reference {b[i]!r} "
                             f"(|diff| {abs(a[i] - b[i]):.3g} > atol {atol:g} + rtol {rtol:g} * |reference|)")


class JsonPostServer:
    """A local HTTP server in a thread (a reward server the test controls): every POST gets
    respond(request body bytes) -> (status, JSON text) back as application/json; .posts counts the
    requests, .port and .url (…/get_reward) say where it listens. Stop it with stop() or `with`."""

    def __init__(self, respond):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        owner = self
        self.posts = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                owner.posts += 1
                status, text = respond(raw)
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/get_reward"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class TempDirTestCase(unittest.TestCase):
    """A TestCase with self.tmp, a fresh folder removed after the test (kept when PTK_KEEP_TMP=1)."""

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="ptkref-")
        self.tmp = Path(self._tmp.name)

    def tearDown(self):
        if os.environ.get("PTK_KEEP_TMP") == "1":
            print(f"kept {self.tmp}", file=sys.stderr)
            self._tmp._finalizer.detach()
        else:
            self._tmp.cleanup()


class _ResultLog(unittest.TextTestResult):
    def __init__(self, *a, exe="", out=None, **kw):
        super().__init__(*a, **kw)
        self.exe, self.out, self.counts = exe, out, {"passed": 0, "skipped": 0, "failed": 0}

    def _log(self, status, test, reason=""):
        self.counts[status] += 1
        if self.out:
            name = f"{type(test).__name__}.{getattr(test, '_testMethodName', str(test))}"
            reason = " ".join(str(reason).split())
            self.out.write(f"{status}\t{self.exe}\t{name}\t{reason}\n")
            self.out.flush()

    def addSuccess(self, test):
        super().addSuccess(test)
        self._log("passed", test)

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._log("skipped", test, reason)

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._log("failed", test)

    def addError(self, test, err):
        super().addError(test, err)
        self._log("failed", test)


def main():
    """Runs the calling module's tests (argv: unittest test names to select, like -k)."""
    caller = sys.modules["__main__"]
    exe = Path(caller.__file__).stem
    results = os.environ.get("PTK_TEST_RESULTS_DIR", "")
    out = None
    if results:
        Path(results).mkdir(parents=True, exist_ok=True)
        out = open(Path(results) / f"{exe}.tsv", "w", encoding="utf-8")
    loader = unittest.TestLoader()
    names = [a for a in sys.argv[1:] if not a.startswith("-")]
    if names:
        suite = loader.loadTestsFromNames(names, caller)
    else:
        suite = loader.loadTestsFromModule(caller)
    runner = unittest.TextTestRunner(verbosity=2, stream=sys.stdout,
                                     resultclass=lambda *a, **kw: _ResultLog(*a, exe=exe, out=out, **kw))
    try:
        result = runner.run(suite)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    c = result.counts
    if c["skipped"] > 0 and c["passed"] == 0 and c["failed"] == 0:
        print(ALL_SKIPPED)
    sys.exit(0 if result.wasSuccessful() else 1)
