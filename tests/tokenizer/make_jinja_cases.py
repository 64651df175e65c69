#!/usr/bin/env python3
"""Expected outputs for tests/tokenizer/jinja_test.cpp: renders each case below with transformers'
own jinja2 environment (the one apply_chat_template uses) and rewrites the kCases table between the
GENERATED markers of jinja_test.cpp. Never used by ptk at run time.

    .venv/bin/python3 tests/tokenizer/make_jinja_cases.py
"""
import json
import os
import re

import transformers.utils.chat_template_utils as cu

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, template, context)
CASES = [
 ("IfElifElse", "{% for x in [1, 2, 3] %}{% if x == 1 %}one{% elif x == 2 %}two{% else %}many{% endif %},{% endfor %}", {}),
 ("LoopVariables", "{% for x in 'abc' %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.revindex }}{{ loop.revindex0 }}|{% endfor %}", {}),
 ("LoopPrevNextCycle", "{% for x in [1, 2, 3] %}{{ loop.previtem is defined and loop.previtem }}-{{ loop.nextitem | default('end') }}-{{ loop.cycle('a', 'b') }};{% endfor %}", {}),
 ("ForIfFilterCountsFiltered", "{% for m in messages if m.role != 'system' %}{{ loop.index }}/{{ loop.length }}:{{ m.role }} {% endfor %}", {"messages": [{"role": "system"}, {"role": "user"}, {"role": "assistant"}]}),
 ("ForElse", "{% for x in [] %}x{% else %}empty{% endfor %}{% for x in [1] %}{{ x }}{% else %}no{% endfor %}", {}),
 ("BreakContinue", "{% for x in range(10) %}{% if x is even %}{% continue %}{% endif %}{% if x > 6 %}{% break %}{% endif %}{{ x }}{% endfor %}", {}),
 ("SetInLoopDoesNotLeak", "{% set x = 0 %}{% for i in range(3) %}{{ x }}{% set x = x + 1 %}{{ x }}{% endfor %}{{ x }}", {}),
 ("NamespaceCarriesAcrossLoop", "{% set ns = namespace(n=0, seen=[]) %}{% for i in range(4) %}{% set ns.n = ns.n + i %}{% set ns.seen = ns.seen + [i] %}{% endfor %}{{ ns.n }} {{ ns.seen }}", {}),
 ("TupleUnpacking", "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% set a, b = [1, 2] %}{{ a }}{{ b }}{% for (x, y) in [[1, 2], [3, 4]] %}{{ x * y }}{% endfor %}", {"d": {"z": 1, "a": [1, 2], "m": None}}),
 ("BlockSet", "{% set greeting %}Hello {{ name }}!{% endset %}[{{ greeting | upper }}]{% set up | lower %}ABC{% endset %}{{ up }}", {"name": "Ann"}),
 ("MacroDefaultsKwargs", "{% macro tag(name, value='x', sep='=') %}<{{ name }}{{ sep }}{{ value }}>{% endmacro %}{{ tag('a') }}{{ tag('b', 2) }}{{ tag('c', sep=':', value=[1]) }}", {}),
 ("MacroRecursion", "{% macro count(n) %}{{ n }}{% if n > 0 %},{{ count(n - 1) }}{% endif %}{% endmacro %}{{ count(5) }}", {}),
 ("CallBlock", "{% macro box(title) %}[{{ title }}: {{ caller() }}]{% endmacro %}{% call box('T') %}inside {{ 1 + 1 }}{% endcall %}", {}),
 ("FilterBlock", "{% filter upper %}hello {{ name }}{% endfilter %}", {"name": "bob"}),
 ("RawBlock", "{% raw %}{{ not rendered }} {% if %}{% endraw %}!", {}),
 ("Comments", "a{# a comment {{ x }} #}b{#- trimmed -#}  c", {}),
 ("WhitespaceMinus", "a  {{- 'b' -}}  c\n  {%- if true -%}  d  {%- endif -%}  e", {}),
 ("TrimBlocksLstripBlocks", "<ul>\n  {% for x in [1, 2] %}\n    <li>{{ x }}</li>\n  {% endfor %}\n</ul>\n", {}),
 ("LstripNotForExpressions", "line\n    {{ 'x' }}\n    {% if true %}y{% endif %}\n", {}),
 ("PlusDisablesLstripAndTrim", "a\n    {%+ if true +%}\nb\n    {% endif %}\nc", {}),
 ("LstripOnlyWhenLineIsBlank", "text {% if true %}x{% endif %}\n  {# c #}\nz", {}),
 ("TrailingNewlineDropped", "hello\n\n", {}),
 ("CrlfNormalized", "a\r\nb\rc{% if true %}\r\nd{% endif %}", {}),
 ("StringLiterals", "{{ 'it\\'s' }}|{{ \"tab\\there\" }}|{{ 'a\\nb' }}|{{ '\\u00e9\\x41' }}|{{ 'raw\\d' }}|{{ 'con' 'cat' }}", {}),
 ("NumberLiterals", "{{ 42 }} {{ 1_000 }} {{ 3.0 }} {{ 2.5e3 }} {{ 1e16 }} {{ 1e-05 }} {{ 0.1 + 0.2 }} {{ 10 / 4 }} {{ 10 / 5 }}", {}),
 ("ContainerLiterals", "{{ [1, 'a', none, True, 1.5] }} {{ {'k': 'v', 'n': [1]} }} {{ (1,) }} {{ (1, 2) }} {{ () }} {{ [] }}", {}),
 ("PrintScalars", "{{ none }} {{ true }} {{ False }} {{ x }} {{ y }} {{ z }} {{ big }}", {"x": None, "y": 1.0, "z": 1e-7, "big": 123456789012345678}),
 ("AttributeAndSubscript", "{{ m.role }} {{ m['content'] }} {{ m.tool_calls[0].function.name }} {{ xs[-1] }} {{ xs.0 }} {{ m.missing is defined }}", {"m": {"role": "user", "content": "hi", "tool_calls": [{"function": {"name": "f"}}]}, "xs": [1, 2, 3]}),
 ("Slices", "{{ xs[1:] }} {{ xs[:-1] }} {{ xs[::-1] }} {{ xs[::2] }} {{ xs[-2:] }} {{ s[::-1] }} {{ s[1:3] }} {{ s[10:] }}|", {"xs": [1, 2, 3, 4], "s": "h\u00e9llo"}),
 ("Arithmetic", "{{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 7 % -3 }} {{ 2 ** 10 }} {{ 2 ** -1 }} {{ 7.5 // 2 }} {{ 'ab' * 3 }} {{ [1] * 2 }} {{ 1 + 2.0 }} {{ -x }} {{ +x }}", {"x": 3}),
 ("Concat", "{{ 'a' ~ 1 ~ none ~ 2.0 ~ true ~ [1] ~ undefined_name }}", {}),
 ("Comparisons", "{{ 1 < 2 < 3 }} {{ 1 < 3 < 2 }} {{ 'a' < 'b' }} {{ 1 == 1.0 }} {{ true == 1 }} {{ 'a' != 'b' }} {{ [1, 2] == [1, 2] }} {{ none == none }} {{ 2 >= 2 }}", {}),
 ("InNotIn", "{{ 'b' in 'abc' }} {{ 2 in [1, 2] }} {{ 'k' in d }} {{ 'x' not in d }} {{ 3 not in [1] }}", {"d": {"k": 1}}),
 ("AndOrNotReturnOperands", "{{ 0 or 'x' }} {{ 'a' and 'b' }} {{ '' and 'b' }}| {{ not [] }} {{ none or [] }} {{ not x is defined }}", {}),
 ("InlineIf", "{{ 'y' if true else 'n' }} {{ 'y' if false else 'n' }} [{{ 'y' if false }}] {{ 1 if none else 2 if true else 3 }}", {}),
 ("StrMethodsStrip", "[{{ s.strip() }}] [{{ s.lstrip() }}] [{{ s.rstrip() }}] [{{ t.strip('xy') }}] [{{ t.lstrip('x') }}] [{{ t.rstrip('yx') }}]", {"s": " \n\t hi there \n", "t": "xxhixyy"}),
 ("StrMethodsSplit", "{{ s.split() }} {{ s.split(' ', 1) }} {{ c.split(',') }} {{ c.rsplit(',', 1) }} {{ c.split(',', maxsplit=1) }} {{ '  a  b '.split(none, 1) }} {{ t.split('</think>')[-1] }}", {"s": "a b  c", "c": "x,y,,z", "t": "<think>r</think>answer"}),
 ("StrMethodsMisc", "{{ s.startswith('He') }} {{ s.startswith(('x', 'H')) }} {{ s.endswith('!') }} {{ s.replace('l', 'L') }} {{ s.replace('l', '', 1) }} {{ s.upper() }} {{ s.lower() }} {{ 'hello wORLD'.title() }} {{ 'hELLO'.capitalize() }} {{ s.find('o') }} {{ s.find('z') }} {{ s.count('l') }} {{ '-'.join(['a', 'b']) }} {{ '{} + {x}'.format(1, x=2) }}", {"s": "Hello, world!"}),
 ("DictMethods", "{{ d.get('a') }} {{ d.get('zz') }} {{ d.get('zz', 5) }} {{ d.keys() | list }} {{ d.values() | list }} {{ d.items() | list }}", {"d": {"a": 1, "b": "two"}}),
 ("FiltersText", "[{{ s | trim }}] {{ s | length }} {{ 'héllo' | length }} {{ 'abc' | upper }} {{ 'ABC' | lower }} {{ 'hello world' | capitalize }} {{ 'hello big-world (x)' | title }} {{ 'aXa' | replace('a', 'b') }} {{ 5 | string }}{{ 'x' | string }}", {"s": "  padded  "}),
 ("FiltersLists", "{{ xs | first }} {{ xs | last }} {{ xs | join(', ') }} {{ xs | reverse | list }} {{ xs | sort }} {{ xs | sort(reverse=true) }} {{ xs | unique | list }} {{ xs | sum }} {{ xs | min }} {{ xs | max }} {{ xs | count }} {{ 'ab' | list }} {{ xs | batch(2) | list }}", {"xs": [3, 1, 2, 3]}),
 ("FiltersDefault", "{{ missing | default('d') }} {{ none | default('d') }} {{ '' | default('d', true) }} {{ 0 | d('z', boolean=true) }} {{ 'v' | default('d') }}", {}),
 ("FiltersSelect", "{{ ms | selectattr('role', 'equalto', 'user') | map(attribute='content') | list }} {{ ms | rejectattr('role', 'eq', 'user') | map(attribute='role') | join(',') }} {{ [0, 1, 2, ''] | select | list }} {{ [1, 2, 3, 4] | reject('odd') | list }} {{ ['a', 'b'] | map('upper') | list }} {{ ms | selectattr('tool') | list | length }}", {"ms": [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1", "tool": 1}, {"role": "user", "content": "u2"}]}),
 ("FiltersNumbers", "{{ '42' | int }} {{ 'x' | int }} {{ 3.9 | int }} {{ '2.5' | float }} {{ 2 | float }} {{ -3 | abs }} {{ 2.567 | round(2) }} {{ 2.5 | round }} {{ 3.5 | round }} {{ 2.1 | round(0, 'ceil') }}", {}),
 ("FiltersMappings", "{{ d | dictsort }} {{ d | items | list }} {{ d | dictsort(reverse=true) | first }} {{ d | length }}", {"d": {"b": 1, "A": 2, "c": 0}}),
 ("FilterIndent", "{{ text | indent(2) }}|{{ text | indent(2, true) }}|{{ 'a\n\nb' | indent(3, blank=true) }}", {"text": "one\ntwo\nthree"}),
 ("FilterSafe", "{{ '<b>' | safe }} {{ ('<a>' | safe) + '<b>' }} {{ ('x' | tojson | safe) ~ '<' }}", {}),
 ("Tests", "{{ x is defined }}{{ y is undefined }}{{ n is none }}{{ 's' is string }}{{ 1 is number }}{{ 1 is integer }}{{ 1.0 is float }}{{ true is boolean }}{{ d is mapping }}{{ l is iterable }}{{ l is sequence }}{{ 's' is sequence }}{{ d is sequence }}{{ true is true }}{{ 0 is false }}{{ 3 is odd }}{{ 4 is even }}{{ 9 is divisibleby 3 }}{{ 'a' is eq 'a' }}{{ 1 is ne 2 }}{{ 2 is in [1, 2] }}{{ range is callable }}{{ 'x' is not string }}{{ y is iterable }}{{ d is not mapping }}", {"x": 1, "n": None, "d": {"a": 1}, "l": [1]}),
 ("Globals", "{{ range(3) | list }} {{ range(1, 7, 2) | list }} {{ range(3, 0, -1) | list }} {{ dict(a=1, b='x') }} {{ namespace(a=1).a }}", {}),
 ("UndefinedPrintsEmpty", "[{{ nothing }}] [{{ d.missing }}] [{{ xs[9] }}] [{{ nothing | length }}] [{% for x in nothing %}x{% endfor %}] [{{ nothing | default('dflt') }}]", {"d": {}, "xs": []}),
 ("TojsonScalarsAndFloats", "{{ 1.0 | tojson }} {{ 1e-05 | tojson }} {{ 0.1 | tojson }} {{ big | tojson }} {{ fl | tojson }} {{ none | tojson }} {{ true | tojson }} {{ 's\"\\\\\n\u00e9\U0001F600' | tojson }}", {"big": 12345678901234567890 // 1000, "fl": 1e300}),
 ("TojsonContainers", "{{ v | tojson }}\n{{ v | tojson(indent=2) }}\n{{ v | tojson(separators=(',', ':')) }}\n{{ v | tojson(sort_keys=true) }}\n{{ v | tojson(ensure_ascii=true) }}\n{{ [] | tojson(indent=2) }}{{ {} | tojson }}", {"v": {"z": [1, 2.5, {"q": None}], "a": "caf\u00e9 \u4e2d", "e": [], "o": {}, "t": True}}),
 ("TojsonNumbersFromContext", "{{ nums | tojson }}", {"nums": [1, 1.0, 0.5, 1e16, 1e-7, 123456789.123, -0.0, 1.5e300, 100.0]}),
 ("GenerationSpans", "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}{{ m.content }}</s>{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}", {"messages": [{"role": "user", "content": "h\u00e9"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "\u4e2d2"}]}),
 ("StrftimeNowIsDefined", "{{ strftime_now is defined }} {{ strftime_now('%Y') | length }}", {}),
 ("WithBlock", "{% with a = 1, b = 2 %}{{ a + b }}{% endwith %}[{{ a }}]", {}),
 ("LoopChanged", "{% for x in [1, 1, 2, 2, 3] %}{% if loop.changed(x) %}{{ x }}{% endif %}{% endfor %}", {}),
 ("NestedLoopsOuterVariable", "{% for a in [1, 2] %}{% set outer = loop %}{% for b in 'xy' %}{{ outer.index }}{{ loop.index }}{{ a }}{{ b }} {% endfor %}{% endfor %}", {}),
 ("MessagesRebindAtTopLevel", "{% if messages[0].role == 'system' %}{% set sys = messages[0].content %}{% set messages = messages[1:] %}{% endif %}{{ sys }}|{% for m in messages %}{{ m.role }},{% endfor %}", {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]}),
 ("MacroVarargsKwargs", "{% macro m(a) %}{{ a }}{{ varargs }}{{ kwargs }}{% endmacro %}{{ m(1, 2, 3, k='v') }}", {}),
 ("MacroSeesLoopVariableWhereDefined", "{% for i in [1, 2] %}{% macro m() %}{{ i }}{% endmacro %}{{ m() }}{% endfor %}", {}),
 ("MacroSeesTopLevelAtCallTime", "{% set x = 5 %}{% macro m() %}{{ x }}{% endmacro %}{% set x = 6 %}{{ m() }}", {}),
 ("RoundLikePython", "{{ 2.675 | round(2) }} {{ 2.5 | round }} {{ 3.5 | round }} {{ 5 | round }} {{ -0.4 | round }} {{ 1.55 | round(1, 'floor') }}", {}),
 ("FullCaseMapping", "{{ 'stra\u00dfe' | upper }} {{ '\u00c9t\u00e9' | lower }} {{ 'caf\u00e9' | capitalize }}", {}),
 ("InUndefinedIsFalse", "{{ 'x' in nothing }} {{ 'x' not in nothing }}", {}),
 ("Partition", "{{ 'a=b=c'.partition('=') }} {{ 'a=b=c'.rpartition('=') }} {{ 'abc'.partition('x') }}", {}),
 ("LoopRepr", "{% for x in 'ab' %}{{ loop }}{% endfor %}", {}),
 ("FormatFilter", "{{ '%s-%s' | format('a', [1]) }} {{ '%5.2f|%-4d|%04d|%+d|%x|%e|%g|%r|%c|%%' | format(3.14159, 7, 42, 5, 255, 12345.678, 0.0001, 'q', 65) }} {{ '%.3s|%5s|' % ('abcdef', 'ab') }}", {}),
 ("ReprOfContextValues", "{{ tools | string }} {{ '[T]' + tools|string }}", {"tools": [{"type": "function", "function": {"name": "f", "description": "d'x\"", "parameters": {"a": {"default": 1.5, "n": None, "b": True}}}}]}),
 ("DictEqualityAndIdentity", "{% set um = messages | selectattr('role', 'equalto', 'user') | list %}{% for m in messages %}{{ m == um[-1] }}{{ m is sameas um[-1] }} {% endfor %}", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]}),
]


def c_literal(s):
    out = '"'
    for b in s.encode():
        c = chr(b)
        if c == '"':
            out += '\\"'
        elif c == "\\":
            out += "\\\\"
        elif c == "\n":
            out += "\\n"
        elif c == "\t":
            out += "\\t"
        elif c == "\r":
            out += "\\r"
        elif 32 <= b < 127:
            out += c
        else:
            out += '\\x%02x""' % b
    return out + '"'


def main():
    rows = []
    for name, template, ctx in CASES:
        compiled = cu._compile_jinja_template(template)
        kw = dict(ctx)
        text, spans = cu._render_with_assistant_indices(
            compiled, kw.pop("messages", []), kw.pop("tools", None), kw.pop("documents", None),
            kw.pop("add_generation_prompt", False), **kw)
        byte_spans = [[len(text[:b].encode()), len(text[:e].encode())] for b, e in spans if e > b]
        rows.append("    {%s, %s,\n     %s,\n     %s,\n     %s}," % (
            c_literal(name), c_literal(template), c_literal(json.dumps(ctx, ensure_ascii=False)), c_literal(text),
            c_literal(json.dumps(byte_spans))))
    path = os.path.join(HERE, "jinja_test.cpp")
    src = open(path, encoding="utf-8").read()
    begin, end = "    // BEGIN GENERATED by make_jinja_cases.py\n", "    // END GENERATED\n"
    head, rest = src.split(begin)
    _, tail = rest.split(end)
    open(path, "w", encoding="utf-8").write(head + begin + "\n".join(rows) + "\n" + end + tail)
    print(f"{len(rows)} cases written to {path}")


if __name__ == "__main__":
    main()
