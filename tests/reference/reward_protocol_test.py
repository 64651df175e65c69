"""OpenRLHF's own remote reward client against `ptk reward-server`, side by side with ptk's client.

OpenRLHF (0.11.2) scores rollouts by POSTing {"query", "prompts", "labels"} to --reward.remote_url:
openrlhf/utils/agent.py, SingleTurnAgentExecutor._fetch_rewards_via_http (aiohttp; shards a call over
the URLs; 5 attempts 1 s apart, then RuntimeError) and .execute (builds the query as
tokenizer.decode(prompt ids + response ids); on any error it logs and leaves the reward None).
ptk's client is reward/reward_client.h (what GRPO runs for grpo.reward_urls); no `ptk` command
scores a file against a URL, so the test drives it through tests/reward/reward_client_probe.cpp
(built next to the ptk binary).

Loading OpenRLHF's client: importing `openrlhf.utils` runs its __init__ (math_utils -> pylatexenc,
utils -> deepspeed ...), which --no-deps does not install. agent.py itself imports only asyncio,
abc, copy, itertools, aiohttp and openrlhf.utils.logging_utils (stdlib only), so both files are
loaded by path under their real module names and nothing is stubbed.

What is compared:
  - rewards, scores and extra_logs that OpenRLHF's client and ptk's get from the same server for the
    same rows (chat prompts, unicode, numeric labels), verifier-only and model-backed (a tiny
    Qwen2ForSequenceClassification whose scores transformers computes independently), and the
    same through OpenRLHF's execute() (its own query construction) and over two URLs (sharding);
  - failure: a closed port, a server answering 503 and one answering malformed JSON: OpenRLHF
    tries 5 times then raises RuntimeError (execute() turns that into reward None); ptk's client
    tries max_attempts times then raises, never a made-up reward;
  - the answer's shape (keys, content type) against what both clients read.
asyncio.sleep is not patched: each OpenRLHF failure case takes its real ~5 s.

Found here and fixed in ptk: its client read the server's numbers with RapidJSON's default parsing,
an ulp off at times (now exact, as Python's json); its server refused (400) a query that did not
start with the prompt verbatim even with no verifier to cut it for, and when the prompt only
differed by Unicode normalization (OpenRLHF sends the raw prompt but decodes the query from
tokens). Pinned: a prompt OpenRLHF left-truncated is still refused by a server with verifiers; a
400 is retried 5 times by OpenRLHF, not at all by ptk; OpenRLHF accepts an answer of the wrong
length, ptk does not.
"""
import asyncio
import importlib.util
import json
import logging
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import unicodedata
import urllib.request
from pathlib import Path

import ptkref

PROBE = Path(ptkref.PTK).parent / "reward_client_probe"

# ---------------------------------------------------------------------------------------------
# OpenRLHF's client, loaded by file path


_AGENT = None


def openrlhf_agent():
    """openrlhf/utils/agent.py as a module (with its real logging_utils), without openrlhf.utils'
    __init__; skips the test when openrlhf or aiohttp is missing."""
    global _AGENT
    if _AGENT is not None:
        return _AGENT
    ptkref.need("aiohttp")
    spec = importlib.util.find_spec("openrlhf")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        ptkref.skip_without("peers", "Python package `openrlhf` is not installed in .venv; scripts/setup.sh "
                                     "installs it (pip install --no-deps openrlhf==0.11.2)")
    utils = Path(list(spec.submodule_search_locations)[0]) / "utils"
    for name, file in (("openrlhf.utils.logging_utils", "logging_utils.py"), ("openrlhf.utils.agent", "agent.py")):
        s = importlib.util.spec_from_file_location(name, utils / file)
        mod = importlib.util.module_from_spec(s)
        sys.modules[name] = mod  # agent.py's `from openrlhf.utils.logging_utils import` finds it here
        s.loader.exec_module(mod)
    assert "openrlhf.utils" not in sys.modules, "loading agent.py imported openrlhf.utils' __init__"
    _AGENT = sys.modules["openrlhf.utils.agent"]
    return _AGENT


class LogCount(logging.Handler):
    """Counts OpenRLHF's log lines that contain `text` (its client logs one per failed attempt)."""

    def __init__(self, text):
        super().__init__(logging.INFO)
        self.text, self.lines = text, []

    def emit(self, record):
        msg = record.getMessage()
        if self.text in msg:
            self.lines.append(msg)

    def __enter__(self):
        logging.getLogger("openrlhf.utils.agent").addHandler(self)
        return self

    def __exit__(self, *a):
        logging.getLogger("openrlhf.utils.agent").removeHandler(self)


def openrlhf_fetch(urls, rows):
    """OpenRLHF's _fetch_rewards_via_http on rows (query, prompt, label): its list of per-shard answers."""
    agent = openrlhf_agent()
    ex = agent.SingleTurnAgentExecutor(remote_rm_url=urls)
    return asyncio.run(ex._fetch_rewards_via_http([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]))


def joined(shards):
    """OpenRLHF's shards put back together: rewards, scores and each extra_logs key, in query order."""
    out = {"rewards": [], "scores": [], "extra_logs": {}}
    for s in shards:
        out["rewards"] += s["rewards"]
        out["scores"] += s["scores"]
        for k, v in s["extra_logs"].items():
            out["extra_logs"].setdefault(k, []).extend(v)
    return out


# ---------------------------------------------------------------------------------------------
# ptk's side: the server and the client probe


def ptk_client(urls, rows, *args, check=True):
    """ptk's RewardClient on rows (query, prompt, label) via reward_client_probe: its JSON answer
    ({"rewards", "scores", "extra_logs", "answered_per_url", "requests", "retries"} or {"error", ...})."""
    if not PROBE.exists():
        raise AssertionError(f"{PROBE} not found: build it (cmake --build build --target reward_client_probe)")
    lines = "".join(json.dumps({"query": q, "prompt": p, "label": str(l)}, ensure_ascii=False) + "\n"
                    for q, p, l in rows)
    cmd = [str(PROBE)] + [a for u in urls for a in ("--url", u)] + [str(a) for a in args]
    p = subprocess.run(cmd, input=lines, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    if p.returncode not in (0, 2):
        raise AssertionError(f"`{' '.join(cmd)}` exited {p.returncode}:\n{p.stdout}\n{p.stderr[-4000:]}")
    out = json.loads(p.stdout)
    out["stderr"] = p.stderr
    if check and p.returncode != 0:
        raise AssertionError(f"ptk's client failed: {out['error']}")
    return out


class PtkRewardServer:
    """`ptk reward-server` on a free port with `reward` settings; .url is its /get_reward URL (the
    form OpenRLHF's --reward.remote_url takes), .base the server's root."""

    def __init__(self, folder, reward):
        folder = Path(folder)
        recipe = ptkref.write_json(folder / "reward_server.json", {"run": {"threads": 1}, "reward": reward})
        self.out = []
        self.proc = subprocess.Popen([ptkref.PTK, "reward-server", "--recipe", str(recipe), "--port", "0",
                                      "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     encoding="utf-8", errors="replace")
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.out.append(line)
                if line.startswith("listening on http://"):
                    self.base = line.split()[-1]
                    ready.set()
            ready.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        if not ready.wait(120) or self.proc.poll() is not None:
            self.stop()
            raise AssertionError("ptk reward-server did not start:\n" + "".join(self.out[-40:]))
        self.url = self.base + "/get_reward"

    def metrics(self):
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
            return json.loads(r.read())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(5)


def closed_port():
    """A port with no listener (bound a moment ago, then closed): connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_server(status, body):
    """A server whose /get_reward always answers `status` with `body`; .posts counts the requests."""
    return ptkref.JsonPostServer(lambda raw: (status, body))


# ---------------------------------------------------------------------------------------------
# Rows: a chat prompt (what OpenRLHF sends as `prompts`), the response as the policy wrote it (with
# its end-of-turn token, as both clients send it), the label, and the verifiers' expected values.

def chat(user):
    return f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


VERIFIERS = ["math", "format_answer", "exact"]
WEIGHTS = [1.0, 0.25, 0.5]  # each combination of verifier values gives a distinct reward
# (prompt, response, label, {verifier: expected value})
ROWS = [
    (chat("What is 12 + 30?"), "12 + 30 = 42. The answer is 42.<|im_end|>", "42",
     {"math": 1, "format_answer": 1, "exact": 0}),
    (chat("What is 12 + 30?"), "The answer is 41.<|im_end|>", "42", {"math": 0, "format_answer": 1, "exact": 0}),
    (chat("用一句话介绍你自己。算一下 7×6。"), "七乘六等于四十二 🎉，所以 \\boxed{42}<|im_end|>", "42",
     {"math": 1, "format_answer": 0, "exact": 0}),
    (chat("Un café ☕ coûte 3,50 € ; combien pour deux ?"), "Deux cafés : 7 €. The answer is 7.<|im_end|>", "7.0",
     {"math": 1, "format_answer": 1, "exact": 0}),
    (chat("How many grams in a kilogram?"), "#### 1,000<|im_end|>", "1000", {"math": 1, "format_answer": 0, "exact": 0}),
    (chat("Capital of France?"), "Paris<|im_end|>", "Paris", {"math": 0, "format_answer": 0, "exact": 1}),
    (chat("Say nothing useful."), "I don't know.<|im_end|>", "1,000", {"math": 0, "format_answer": 0, "exact": 0}),
]


def wire(rows):
    """(query, prompt, label) as both clients send them: query = prompt + response."""
    return [(p + r, p, l) for p, r, l, _ in rows]


def expected_rewards(rows):
    return [sum(w * exp[v] for v, w in zip(VERIFIERS, WEIGHTS)) for _, _, _, exp in rows]


# ---------------------------------------------------------------------------------------------


class VerifierServerTest(ptkref.TempDirTestCase):
    """Two verifier-only ptk reward servers (no model): math, format_answer, exact, weighted."""

    @classmethod
    def setUpClass(cls):
        openrlhf_agent()  # skip before starting anything when the peer is missing
        cls._dir = tempfile.TemporaryDirectory(prefix="ptkref-rs-")
        reward = {"verifiers": VERIFIERS, "verifier_weights": WEIGHTS, "http_threads": 2}
        cls.a = PtkRewardServer(Path(cls._dir.name) / "a", reward)
        cls.b = PtkRewardServer(Path(cls._dir.name) / "b", reward)

    @classmethod
    def tearDownClass(cls):
        for s in ("a", "b"):
            if hasattr(cls, s):
                getattr(cls, s).stop()
        cls._dir.cleanup()

    def test_same_rewards_as_ptk_client(self):
        rows = wire(ROWS)
        theirs = joined(openrlhf_fetch(self.a.url, rows))
        ours = ptk_client([self.a.url], rows)
        # Both clients read the same JSON doubles: equal exactly.
        self.assertEqual(theirs["rewards"], ours["rewards"])
        self.assertEqual(theirs["scores"], ours["scores"])
        self.assertEqual(theirs["extra_logs"], ours["extra_logs"])
        # ... and they are the verifiers' values (a wrong verifier or weighting breaks this).
        self.assertEqual(theirs["rewards"], expected_rewards(ROWS))
        for v in VERIFIERS:
            self.assertEqual(theirs["extra_logs"][v], [float(exp[v]) for *_, exp in ROWS], v)
        self.assertEqual(theirs["scores"], theirs["rewards"])  # ptk's server: scores = rewards

    def test_numeric_labels(self):
        # OpenRLHF sends the dataset's label_key value as it is: a JSON number when the data has one.
        # ptk's server reads numbers as their text; ptk's client always sends strings.
        picked = ROWS[:2] + ROWS[3:5]  # labels "42", "42", "7.0", "1000"
        rows = wire(picked)
        numeric = [(q, p, int(l) if l.isdigit() else float(l)) for q, p, l in rows]
        theirs = joined(openrlhf_fetch(self.a.url, numeric))
        ours = ptk_client([self.a.url], rows)
        self.assertEqual(theirs["rewards"], ours["rewards"])
        self.assertEqual(theirs["rewards"], expected_rewards(picked))

    def test_two_urls_shard(self):
        # OpenRLHF splits a call into one shard per URL (ceil(n / urls) queries each, in order);
        # ptk's client chunks by max_items_per_request round-robin. With 3 per request both send
        # rows 0-2 to the first URL and 3-5 to the second.
        rows = wire(ROWS[:6])
        before = [s.metrics()["items"] for s in (self.a, self.b)]
        shards = openrlhf_fetch([self.a.url, self.b.url], rows)
        after = [s.metrics()["items"] for s in (self.a, self.b)]
        self.assertEqual(len(shards), 2)
        self.assertEqual([len(s["rewards"]) for s in shards], [3, 3])
        self.assertEqual([y - x for x, y in zip(before, after)], [3, 3], "each server scores one shard")
        ours = ptk_client([self.a.url, self.b.url], rows, "--max-items-per-request", 3, "--max-concurrency", 1)
        self.assertEqual(ours["answered_per_url"], [1, 1])
        theirs = joined(shards)
        self.assertEqual(theirs["rewards"], ours["rewards"])
        self.assertEqual(theirs["extra_logs"], ours["extra_logs"])
        self.assertEqual(theirs["rewards"], expected_rewards(ROWS[:6]))

    def test_execute_builds_a_query_ptk_accepts(self):
        # OpenRLHF's execute() makes the query itself: hf_tokenizer.decode(prompt ids + response ids,
        # skip_special_tokens=False), with the raw prompt as `prompts`. ptk's server needs the query
        # to start with the prompt (to cut the response out for the verifiers): it does when the
        # tokenizer round-trips the prompt text.
        tok = hf_tokenizer()
        ex = openrlhf_agent().SingleTurnAgentExecutor(remote_rm_url=self.a.url)
        rewards = []
        for prompt, response, label, _ in ROWS:
            out = openrlhf_execute(ex, tok, prompt, response, label)
            self.assertIsNotNone(out["reward"], f"OpenRLHF got no reward for {response!r}")
            self.assertEqual(out["reward"], out["scores"])
            rewards += out["reward"]
        self.assertEqual(rewards, expected_rewards(ROWS))
        self.assertEqual(rewards, ptk_client([self.a.url], wire(ROWS))["rewards"])

    def test_execute_decomposed_prompt(self):
        # A prompt in NFD ("e" + U+0301): the tokenizer (NFC, as Qwen2's) decodes it composed, so the
        # query OpenRLHF sends starts with NFC(prompt), not with the prompt it sends. ptk's server
        # cuts the NFC form off (it answered 400 before, which OpenRLHF retried 5 times and then
        # left the sample without a reward).
        tok = hf_tokenizer()
        ex = openrlhf_agent().SingleTurnAgentExecutor(remote_rm_url=self.a.url)
        prompt = chat(unicodedata.normalize("NFD", "Un café coûte 3,50 € ; combien pour deux ?"))
        self.assertNotEqual(prompt, unicodedata.normalize("NFC", prompt))
        out = openrlhf_execute(ex, tok, prompt, "The answer is 7.<|im_end|>", "7")
        self.assertEqual(out["reward"], [1.25])  # math 1, format_answer 1

    def test_execute_truncated_prompt_is_refused(self):
        # Pinned difference: execute() left-truncates a prompt longer than max_length - max_tokens
        # and still sends the whole prompt, so the query does not start with it. A ptk server with
        # verifiers cannot tell where the response starts and answers 400 (a model-only server
        # scores the query: ModelServerTest); OpenRLHF retries the 400 5 times, 1 s apart, then
        # leaves the sample's reward None. ptk's own client never truncates prompts.
        tok = hf_tokenizer()
        ex = openrlhf_agent().SingleTurnAgentExecutor(remote_rm_url=self.a.url)
        prompt, response, label, _ = ROWS[0]
        with LogCount("400") as log:
            out = openrlhf_execute(ex, tok, prompt, response, label, max_length=64 + 12)
        self.assertIsNone(out["reward"])
        self.assertEqual(len(log.lines), 5, log.lines)
        self.assertIn("Bad Request", log.lines[0])

    def test_answer_shape(self):
        # What OpenRLHF reads (rewards; scores, else rewards; extra_logs) and what its own server
        # (openrlhf/cli/serve_rm.py) sends: {"rewards": [...], "scores": [...], "extra_logs": {k: [...]}},
        # one value per query, as application/json (aiohttp's response.json() insists on it).
        rows = wire(ROWS[:2])
        body = json.dumps({"query": [r[0] for r in rows], "prompts": [r[1] for r in rows],
                           "labels": [r[2] for r in rows]}).encode()
        req = urllib.request.Request(self.a.url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            self.assertEqual(r.headers.get_content_type(), "application/json")
            d = json.loads(r.read())
        self.assertEqual(set(d), {"rewards", "scores", "extra_logs"})
        self.assertEqual(d["rewards"], expected_rewards(ROWS[:2]))
        self.assertEqual(d["scores"], d["rewards"])
        self.assertEqual(sorted(d["extra_logs"]), sorted(VERIFIERS))
        for v in d["extra_logs"].values():
            self.assertEqual(len(v), 2)


class SamplingParams:
    """The two fields of vLLM's SamplingParams that execute() reads."""

    def __init__(self, max_tokens=64):
        self.max_tokens, self.logprobs = max_tokens, None


def openrlhf_execute(executor, tok, prompt, response, label, max_length=4096):
    """OpenRLHF's execute() on one prompt whose 'generated' response is `response`'s token ids: its
    output dict (reward, scores, extra_logs; the query it sent is decode(prompt ids + response ids)).
    A prompt over max_length - 64 tokens is left-truncated by execute(), as in a real run."""
    ids = tok(text=response, add_special_tokens=False)["input_ids"]
    return asyncio.run(executor.execute(prompt, label, SamplingParams(), max_length, tok, FakeEngine(ids)))


def hf_tokenizer(folder=None):
    """transformers' tokenizer of `folder`, by default of the harness's tiny tokenizer (made once)."""
    ptkref.need("transformers")
    from transformers import AutoTokenizer
    global _TOK_DIR
    if folder is None:
        if _TOK_DIR is None:
            _TOK_DIR = tempfile.TemporaryDirectory(prefix="ptkref-tok-")
            ptkref.tiny_tokenizer(Path(_TOK_DIR.name) / "tok")
        folder = Path(_TOK_DIR.name) / "tok"
    return AutoTokenizer.from_pretrained(str(folder))


_TOK_DIR = None


class FakeEngine:
    """Stands in for OpenRLHF's vLLM engine: generate() 'samples' the given response ids."""

    def __init__(self, ids):
        self.ids = list(ids)

    async def generate(self, prompt_ids, params, multi_modal_data=None):
        class Out:
            token_ids, text, finish_reason, logprobs = self.ids, "", "stop", None

        class Res:
            outputs = [Out]

        return Res


class ModelServerTest(ptkref.TempDirTestCase):
    """A ptk reward server with a tiny reward model (Qwen2ForSequenceClassification saved by
    transformers) and the math verifier: rewards = 0.5 * rm + 1.0 * math."""

    @classmethod
    def setUpClass(cls):
        openrlhf_agent()
        ptkref.need("torch", "transformers")
        import torch
        from transformers import Qwen2ForSequenceClassification
        cls._dir = tempfile.TemporaryDirectory(prefix="ptkref-rm-")
        d = Path(cls._dir.name)
        tok = ptkref.tiny_tokenizer(d / "tok")
        lm = ptkref.tiny_qwen2(d / "lm", tok, seed=3)
        torch.manual_seed(4)
        rm = Qwen2ForSequenceClassification.from_pretrained(str(lm), num_labels=1)
        with torch.no_grad():  # the default init (std 0.02) gives scores ~0.05; spread them to ~1
            rm.score.weight.normal_(0, 1.0)
        rm.save_pretrained(str(d / "rm"))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (d / "rm" / f).write_bytes((tok / f).read_bytes())
        cls.rm_dir = d / "rm"
        cls.server = PtkRewardServer(d / "srv", {"model": str(d / "rm"), "model_weight": 0.5, "verifiers": ["math"],
                                                "http_threads": 2})
        cls.model_only = PtkRewardServer(d / "srv2", {"model": str(d / "rm"), "http_threads": 2})

    @classmethod
    def tearDownClass(cls):
        for s in ("server", "model_only"):
            if hasattr(cls, s):
                getattr(cls, s).stop()
        cls._dir.cleanup()

    def transformers_scores(self, queries):
        """The reward model's score of each query by transformers: the score head at the last token
        (one query at a time, so no padding), the query tokenized as OpenRLHF's serve_rm does
        (add_special_tokens=False; the chat markers in the text are special tokens)."""
        import torch
        from transformers import AutoTokenizer, Qwen2ForSequenceClassification
        tok = AutoTokenizer.from_pretrained(str(self.rm_dir))
        model = Qwen2ForSequenceClassification.from_pretrained(str(self.rm_dir), dtype=torch.float32).eval()
        out = []
        with torch.no_grad():
            for q in queries:
                ids = torch.tensor([tok(q, add_special_tokens=False)["input_ids"]])
                h = model.model(input_ids=ids).last_hidden_state
                out.append(float(model.score(h)[0, -1, 0]))
        return out

    def test_same_rewards_as_ptk_client_and_transformers(self):
        rows = wire(ROWS)
        theirs = joined(openrlhf_fetch(self.server.url, rows))
        ours = ptk_client([self.server.url], rows)
        self.assertEqual(theirs["rewards"], ours["rewards"])
        self.assertEqual(theirs["extra_logs"], ours["extra_logs"])
        self.assertEqual(sorted(theirs["extra_logs"]), ["math", "rm"])
        ref = self.transformers_scores([q for q, _, _ in rows])
        # fp32 forwards of a 2-layer model, batched and padded (ptk) vs one at a time (transformers):
        # summation order differs, ~1e-6 relative.
        ptkref.assert_close("rm score", theirs["extra_logs"]["rm"], ref, rtol=1e-4, atol=1e-5)
        self.assertGreater(max(ref) - min(ref), 0.1, "the scores should differ between queries")
        # The server sums in double and writes round-trip digits: exact. (ptk's client read them an ulp
        # off before it parsed answers with full precision; the assertEqual above caught it.)
        want = [0.5 * s + exp["math"] for s, (*_, exp) in zip(theirs["extra_logs"]["rm"], ROWS)]
        self.assertEqual(theirs["rewards"], want)


    def test_model_only_ignores_prompts(self):
        # OpenRLHF's execute() with a prompt it left-truncates (over max_length - max_tokens): the query
        # does not start with the prompt it sends. A model-only ptk server scores the query and
        # ignores `prompts`, as OpenRLHF's serve_rm does (it answered 400 before).
        tok = hf_tokenizer(self.rm_dir)
        ex = openrlhf_agent().SingleTurnAgentExecutor(remote_rm_url=self.model_only.url)
        prompt, response, label, _ = ROWS[2]
        out = openrlhf_execute(ex, tok, prompt, response, label, max_length=64 + 12)
        self.assertIsNotNone(out["reward"], "the model-only server refused OpenRLHF's truncated prompt")
        prompt_ids = tok(text=prompt, add_special_tokens=False)["input_ids"][-12:]
        query = tok.decode(prompt_ids + tok(text=response, add_special_tokens=False)["input_ids"],
                           skip_special_tokens=False)
        self.assertFalse(query.startswith(prompt))
        ptkref.assert_close("rm score", out["reward"], self.transformers_scores([query]), rtol=1e-4, atol=1e-5)
        self.assertEqual(out["extra_logs"], {"rm": out["reward"]})


class FailureTest(ptkref.TempDirTestCase):
    """A server that is away, or answers 503, or answers malformed JSON: OpenRLHF's client tries 5
    times, 1 s apart, then raises RuntimeError; ptk's tries max_attempts times (GRPO's default 5)
    with backoff (shortened here) and raises naming every attempt. Neither makes up a reward."""

    def openrlhf_fails(self, url):
        with LogCount("error, please check") as log:
            with self.assertRaisesRegex(RuntimeError, "Request error for 5 times"):
                openrlhf_fetch(url, wire(ROWS[:2]))
        self.assertEqual(len(log.lines), 5, log.lines)
        return log.lines

    def ptk_fails(self, url, why):
        out = ptk_client([url], wire(ROWS[:2]), "--max-attempts", 5, "--backoff", 0.02, "--max-backoff", 0.05,
                         check=False)
        self.assertIn("error", out, f"ptk's client returned {out}")
        self.assertEqual((out["requests"], out["retries"]), (5, 4))
        self.assertIn("got no reward after 5 attempts", out["error"])
        self.assertIn("attempt 5: ", out["error"])
        self.assertRegex(out["error"], why)
        self.assertIn("no reward was made up", out["error"])
        return out

    def test_closed_port(self):
        url = f"http://127.0.0.1:{closed_port()}/get_reward"
        lines = self.openrlhf_fails(url)
        self.assertIn("Cannot connect", lines[0])
        self.ptk_fails(url, "(?i)connection")

    def test_closed_port_execute_leaves_reward_none(self):
        # OpenRLHF's executor catches the RuntimeError, logs it and returns reward None (its trainer
        # then leaves `reward` out of the sample's info): no zero is made up there either.
        tok = hf_tokenizer()
        ex = openrlhf_agent().SingleTurnAgentExecutor(remote_rm_url=f"http://127.0.0.1:{closed_port()}/get_reward")
        prompt, response, label, _ = ROWS[0]
        with LogCount("Failed to fetch reward from remote RM") as log:
            out = openrlhf_execute(ex, tok, prompt, response, label)
        self.assertIsNone(out["reward"])
        self.assertIsNone(out["scores"])
        self.assertEqual(len(log.lines), 1)

    def test_short_answer(self):
        # Pinned difference: an answer with fewer rewards than queries. OpenRLHF's client returns it as
        # it is (it checks nothing in the answer); ptk's client refuses it as malformed, retries, and
        # fails.
        srv = fake_server(200, '{"rewards": [0.5], "scores": [0.5], "extra_logs": {}}')
        try:
            self.assertEqual(openrlhf_fetch(srv.url, wire(ROWS[:2])), [{"rewards": [0.5], "scores": [0.5],
                                                                       "extra_logs": {}}])
            self.ptk_fails(srv.url, "`rewards` has 1 values for 2 queries")
        finally:
            srv.stop()

    def test_503(self):
        srv = fake_server(503, '{"error": "warming up"}')
        try:
            lines = self.openrlhf_fails(srv.url)
            self.assertIn("503", lines[0])
            self.assertEqual(srv.posts, 5)
            self.ptk_fails(srv.url, "HTTP 503")
            self.assertEqual(srv.posts, 10)
        finally:
            srv.stop()

    def test_malformed_json(self):
        srv = fake_server(200, '{"rewards": [0.5, ')
        try:
            self.openrlhf_fails(srv.url)
            self.assertEqual(srv.posts, 5)
            self.ptk_fails(srv.url, "malformed answer: the answer is not JSON")
            self.assertEqual(srv.posts, 10)
        finally:
            srv.stop()


if __name__ == "__main__":
    ptkref.main()
