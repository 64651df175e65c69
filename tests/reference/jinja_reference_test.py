"""ptk's Jinja interpreter (core/tokenizer/jinja.cpp) against transformers 5.25's own renderer on every
real model template TRL ships (trl/chat_templates/*.jinja: Qwen2.5/3/3.5/VL, Llama 3.x, Gemma 1/3/4,
Phi-3, DeepSeek, GLM, GPT-OSS, Cohere, LFM2, Nemotron, SmolVLM, ..., and their _training variants
with {% generation %} blocks).

For each template, a set of conversations (single turn, system prompt, multi-turn, generation prompt
on and off, reasoning_content and "<think>" in content, tools with tool_calls whose arguments are a
dict or a JSON string plus tool results, unicode and JSON-special characters, enable_thinking=False,
an unsupported role, and 12 seeded random conversations per template) is rendered by transformers (`_render_with_assistant_indices` on the template
`_compile_jinja_template` compiles, with the context `apply_chat_template` builds: the tokenizer's
special tokens, messages with None values dropped and reasoning aliased, tools, documents=None,
add_generation_prompt) and by tests/tokenizer/jinja_render_probe (PTK_JINJA_PROBE). The text must be
identical, the {% generation %} spans identical (Python's character offsets converted to bytes, empty
spans dropped as ptk does), and where Python raises, ptk must raise too (raise_exception messages
must match exactly).
"""
import copy
import glob
import json
import os
import subprocess
from pathlib import Path

import ptkref

PROBE = os.environ.get("PTK_JINJA_PROBE", str(ptkref.SOURCE_DIR / "build" / "bin" / "jinja_render_probe"))

# Templates outside the subset, with the reason (none so far).
EXPECTED_UNSUPPORTED = {}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city name, e.g. \"Paris\""},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "description": "Forecast days", "default": 1},
                "threshold": {"type": "number", "default": 0.5},
            },
            "required": ["city"],
        },
    },
}


def conversations():
    """(name, messages, extra kwargs) cases; each is rendered with add_generation_prompt False and True."""
    u1 = {"role": "user", "content": "Hello, who are you?"}
    a1 = {"role": "assistant", "content": "I am a helpful assistant."}
    sys_ = {"role": "system", "content": "You are a terse assistant."}
    u2 = {"role": "user", "content": "What is 2 + 2?"}
    a2 = {"role": "assistant", "content": "4"}
    special = ("Quotes \" and ' and backslash \\ and tab\t and newline\nand {{ braces }} {% tags %} "
               "<b>html</b> & amp; unicode: caf\u00e9 \u4e2d\u6587 \U0001F600 \u00a0nbsp")
    calls_dict = [{"type": "function", "function": {"name": "get_weather",
                                                     "arguments": {"city": "Paris", "unit": "celsius", "days": 2}}}]
    calls_str = [{"type": "function", "function": {"name": "get_weather",
                                                    "arguments": json.dumps({"city": "Paris", "days": 2})}}]
    cases = [
        ("single", [u1, a1], {}),
        ("prompt_only", [u1], {}),
        ("system", [sys_, u1, a1], {}),
        ("multi_turn", [sys_, u1, a1, u2, a2], {}),
        ("multi_turn_no_system", [u1, a1, u2, a2], {}),
        ("reasoning_content", [u1, {"role": "assistant", "content": "Paris.",
                                    "reasoning_content": "The user asks; the capital is Paris."}], {}),
        ("think_in_content", [u1, {"role": "assistant", "content": "<think>\nLet me think.\n</think>\n\nParis."},
                              u2, {"role": "assistant", "content": "<think>short</think>4"}], {}),
        ("tools_dict_args", [sys_, {"role": "user", "content": "Weather in Paris?"},
                             {"role": "assistant", "content": "", "tool_calls": calls_dict},
                             {"role": "tool", "content": "{\"temperature\": 21.5, \"unit\": \"celsius\"}",
                              "name": "get_weather"},
                             {"role": "assistant", "content": "It is 21.5 \u00b0C in Paris."}],
         {"tools": [WEATHER_TOOL]}),
        ("tools_str_args", [{"role": "user", "content": "Weather in Paris?"},
                            {"role": "assistant", "content": None, "tool_calls": calls_str},
                            {"role": "tool", "content": "sunny", "name": "get_weather"},
                            {"role": "assistant", "content": "Sunny."}],
         {"tools": [WEATHER_TOOL]}),
        ("tools_no_calls", [u1, a1], {"tools": [WEATHER_TOOL]}),
        ("special_chars", [{"role": "system", "content": special}, {"role": "user", "content": special},
                           {"role": "assistant", "content": special}], {}),
        ("enable_thinking_false", [u1, a1, u2], {"enable_thinking": False}),
        ("enable_thinking_true", [u1, a1, u2], {"enable_thinking": True}),
        ("empty_reply", [u1, {"role": "assistant", "content": ""}], {}),
        ("bad_role", [{"role": "narrator", "content": "Once upon a time"}, u1], {}),
        ("content_parts", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}], {}),
        ("system_only", [sys_], {}),
        ("two_tool_calls", [{"role": "user", "content": "Weather in Paris and Rome?"},
                            {"role": "assistant", "content": "Let me check.", "reasoning_content": "Two cities.",
                             "tool_calls": [calls_dict[0], {"id": "call_2", "type": "function", "function": {
                                 "name": "get_weather", "arguments": {"city": "Rome", "nested": {
                                     "values": [1.0, 1e-05, 0.1, 12345678901234567, -3, True, None],
                                     "text": "\u00e9\"\n"}}}}]},
                            {"role": "tool", "content": "21", "tool_call_id": "call_1"},
                            {"role": "tool", "content": "25", "tool_call_id": "call_2"},
                            {"role": "assistant", "content": "21 and 25."}],
         {"tools": [WEATHER_TOOL, {"type": "function", "function": {"name": "noop", "description": "Does nothing.",
                                                                   "parameters": {"type": "object", "properties": {}}}}]}),
        ("long_reasoning_history", [sys_, u1, {"role": "assistant", "content": "A.", "reasoning_content": "first"},
                                    u2, {"role": "assistant", "content": "B.", "reasoning_content": "second"},
                                    {"role": "user", "content": "And now?"}], {}),
        ("documents", [u1, a1], {"documents": [{"title": "Doc 1", "text": "Paris is in France."},
                                               {"title": "Doc 2", "text": "Rome is in Italy."}]}),
        ("assistant_first", [a1, u1], {}),
    ]
    return cases


def random_conversations(seed, count):
    """Deterministic random conversations (roles, contents, reasoning, tool calls and results, content
    parts, template kwargs) for the cases the fixed list does not think of."""
    import random
    rng = random.Random(seed)
    texts = ["Hi", "", "  padded  ", "line one\nline two\n", "caf\u00e9 \u4e2d\u6587 \U0001F600", "a \"quoted\" {{ x }} \\ end",
             "<think>\nhidden\n</think>\n\nshown", "<tool_call>{}</tool_call>", "\t tab and trailing space ", "1.0"]
    args = [{"city": "Paris"}, {"n": 1, "x": 1.5, "flag": True, "none": None, "list": [1, "a", {"k": []}]}, {},
            {"q": "caf\u00e9 \"x\"\n"}, "{\"city\": \"Rome\"}"]
    out = []
    for k in range(count):
        msgs = []
        if rng.random() < 0.5:
            msgs.append({"role": "system", "content": rng.choice(texts)})
        for turn in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": rng.choice(texts)})
            r = rng.random()
            if r < 0.3:
                calls = [{"type": "function", "function": {"name": rng.choice(["get_weather", "noop"]),
                                                           "arguments": rng.choice(args)}}
                         for _ in range(rng.randint(1, 2))]
                if rng.random() < 0.5:
                    for i, c in enumerate(calls):
                        c["id"] = f"call_{turn}_{i}"
                msg = {"role": "assistant", "tool_calls": calls}
                if rng.random() < 0.6:
                    msg["content"] = rng.choice(texts)
                if rng.random() < 0.3:
                    msg["reasoning_content"] = rng.choice(texts)
                msgs.append(msg)
                for c in calls:
                    msgs.append({"role": "tool", "content": rng.choice(texts), "name": c["function"]["name"]})
                msgs.append({"role": "assistant", "content": rng.choice(texts)})
            elif r < 0.9 or turn < 2:
                msg = {"role": "assistant", "content": rng.choice(texts)}
                if rng.random() < 0.3:
                    msg["reasoning_content"] = rng.choice(texts)
                msgs.append(msg)
        if rng.random() < 0.3:
            msgs = msgs[:-1] if msgs[-1]["role"] == "assistant" and len(msgs) > 1 else msgs
        extra = {}
        if rng.random() < 0.4:
            extra["tools"] = [WEATHER_TOOL]
        if rng.random() < 0.5:
            extra["enable_thinking"] = rng.random() < 0.5
        out.append((f"random{k}", msgs, extra))
    return out


def special_tokens(template_name):
    """The special_tokens_map apply_chat_template passes, as the model's tokenizer has it."""
    n = template_name
    if n.startswith(("qwen", "lfm")):
        return {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    if n.startswith("llama3"):
        return {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    if n.startswith(("gemma", "diffusion_gemma")):
        return {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    if n.startswith("deepseek"):
        return {"bos_token": "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "eos_token": "<\uff5cend\u2581of\u2581sentence\uff5c>"}
    if n.startswith("phi3"):
        return {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>"}
    if n.startswith("gptoss"):
        return {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"}
    if n.startswith("cohere"):
        return {"bos_token": "<BOS_TOKEN>", "eos_token": "<|END_OF_TURN_TOKEN|>", "pad_token": "<PAD>"}
    return {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def build_context(cu, name, messages, extra, add_generation_prompt):
    """The keyword arguments transformers' renderer passes to template.render (apply_chat_template)."""
    msgs = cu._normalize_chat_messages(copy.deepcopy(messages))
    msgs = cu._alias_reasoning_fields(cu._plain_template_data(msgs))
    extra = dict(extra)
    tools = extra.pop("tools", None)
    documents = extra.pop("documents", None)
    ctx = {**special_tokens(name), **extra}
    ctx = cu._plain_template_data(ctx)
    ctx.update(messages=msgs, tools=cu._plain_template_data(tools), documents=cu._plain_template_data(documents),
               add_generation_prompt=add_generation_prompt)
    return ctx


def python_render(cu, compiled, ctx):
    """{"text", "generation" (byte spans, empty ones dropped)} or {"error": message} from transformers."""
    try:
        text, spans = cu._render_with_assistant_indices(
            compiled_template=compiled, messages=ctx["messages"], tools=ctx["tools"], documents=ctx["documents"],
            add_generation_prompt=ctx["add_generation_prompt"],
            **{k: v for k, v in ctx.items() if k not in ("messages", "tools", "documents", "add_generation_prompt")})
    except Exception as e:  # noqa: BLE001 - any failure of the template is a failure ptk must report too
        return {"error": str(e), "type": type(e).__name__}
    byte_spans = [[len(text[:b].encode()), len(text[:e].encode())] for b, e in spans if e > b]
    return {"text": text, "generation": byte_spans}


class JinjaReferenceTest(ptkref.TempDirTestCase):
    def test_every_trl_template(self):
        ptkref.need("jinja2")
        ptkref.need("transformers")
        trl = ptkref.need("trl")
        import transformers.utils.chat_template_utils as cu
        if not Path(PROBE).exists():
            self.fail(f"{PROBE} is missing: build the jinja_render_probe target")
        templates = sorted(glob.glob(str(Path(trl.__file__).parent / "chat_templates" / "*.jinja")))
        self.assertGreater(len(templates), 50, "trl/chat_templates holds fewer templates than expected")
        # and the ones tests/tokenizer keeps (Qwen2.5-Instruct's published template, plain ChatML)
        templates += sorted(glob.glob(str(ptkref.SOURCE_DIR / "tests" / "tokenizer" / "data" / "*.jinja")))
        failures = []
        renders = errors_both = 0
        for path in templates:
            name = Path(path).stem
            source = Path(path).read_text(encoding="utf-8")
            if name in EXPECTED_UNSUPPORTED:
                continue
            compiled = cu._compile_jinja_template(source)
            contexts, expected = [], []
            for case, messages, extra in conversations() + random_conversations(name, 12):
                for agp in (False, True):
                    ctx = build_context(cu, name, messages, extra, agp)
                    contexts.append(ctx)
                    expected.append((f"{case}/agp={agp}", python_render(cu, compiled, ctx)))
            ctx_file = self.tmp / f"{name}.json"
            ctx_file.write_text(json.dumps(contexts, ensure_ascii=False), encoding="utf-8")
            r = subprocess.run([PROBE, path, str(ctx_file)], capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                failures.append(f"{name}: probe exit {r.returncode}: {r.stderr.strip()[:500]}")
                continue
            got = json.loads(r.stdout)
            if isinstance(got, dict) and "parse_error" in got:
                failures.append(f"{name}: ptk refuses the template: {got['parse_error']}")
                continue
            for (label, want), have in zip(expected, got):
                renders += 1
                where = f"{name} [{label}]"
                if "error" in want:
                    if "error" not in have:
                        failures.append(f"{where}: transformers raises {want['type']}: {want['error'][:200]!r}; "
                                        f"ptk renders {have['text'][:200]!r}")
                    elif want["type"] == "TemplateError" and have["error"] != want["error"]:
                        failures.append(f"{where}: raise_exception message differs: "
                                        f"{want['error']!r} vs ptk {have['error']!r}")
                    else:
                        errors_both += 1
                    continue
                if "error" in have:
                    failures.append(f"{where}: ptk fails: {have['error']}")
                    continue
                if have["text"] != want["text"]:
                    a, b = want["text"], have["text"]
                    i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
                    failures.append(f"{where}: text differs at char {i}: transformers {a[max(0, i - 40):i + 60]!r} "
                                    f"vs ptk {b[max(0, i - 40):i + 60]!r}")
                    continue
                if have["generation"] != want["generation"]:
                    failures.append(f"{where}: generation spans differ: transformers {want['generation']} "
                                    f"vs ptk {have['generation']}")
        print(f"{len(templates)} templates, {renders} renderings compared ({errors_both} raise in both)")
        if failures:
            self.fail(f"{len(failures)} mismatches:\n" + "\n".join(failures[:60]))


if __name__ == "__main__":
    ptkref.main()
