"""Fuzz target ``template``: chat and prompt templates built from the constructs that blow up
time or memory (nested loops, string and list repetition, powers, format widths, width-taking
filters and methods, recursion), with huge and small numbers, plus arbitrary text.

Each must render or raise ``TemplateRenderError`` (a ValueError naming the template); the
fuzz runs with a 0.1 s budget per render so that runaway inputs cost little, the suite and
the shipped code use ``sdk.tools.templates.RENDER_SECONDS``. Kept inputs are ``*.j2`` files
under ``tests/fuzz/corpus/template/``, replayed with the shipped budget.
"""
from __future__ import annotations

import json

import jinja2
import pytest
from hypothesis import given, strategies as st

from sdk.tools.templates import TemplateRenderError, compile_template, environment, render
from tests.fuzz.budget import budget, corpus, tried

NUMBERS = st.one_of(st.integers(-3, 12), st.sampled_from([100, 1000, 99999, 100000, 10**6, 10**7, 10**9, 10**10,
                                                          2**63, 10**30]),
                    st.builds(lambda k: f"10**{k}", st.integers(0, 12)))
STRINGS = st.sampled_from(["'a'", "'ab\\n'", "''", "'%s'", "'%0999999999d'", "'%*d'", "'{:>9999999999}'",
                           "'{0:>{1}}'", "'{:>10}'", "'\\t'", "'x'"])
FILTERS = ["center", "indent", "wordwrap", "batch", "slice", "truncate", "round", "tojson", "format", "join",
           "list", "length", "string", "first", "sum", "unique", "reverse", "e", "trim", "title"]


def exprs():
    return st.recursive(
        st.one_of(NUMBERS.map(str), STRINGS, st.just("range(100000)"), st.just("messages"), st.just("[1, 2, 3]"),
                  st.just("lipsum(10**9)"), st.just("namespace(a=1)"), st.just("x"),
                  st.builds(lambda n: f"range({n})", NUMBERS)),
        lambda inner: st.one_of(
            st.builds(lambda a, b: f"({a} * {b})", inner, NUMBERS),
            st.builds(lambda a, b: f"({a} ** {b})", inner, NUMBERS),
            st.builds(lambda a, b: f"({a} % {b})", STRINGS, inner),
            st.builds(lambda a, b: f"({a} ~ {b})", inner, inner),
            st.builds(lambda a, b: f"({a} + {b})", inner, inner),
            st.builds(lambda a, f, n: f"({a}|{f}({n}))", inner, st.sampled_from(FILTERS), NUMBERS),
            st.builds(lambda a, f: f"({a}|{f})", inner, st.sampled_from(FILTERS)),
            st.builds(lambda a, n: f"({a}|tojson(indent={n}))", inner, NUMBERS),
            st.builds(lambda a, m, n: f"{a}.{m}({n})", STRINGS, st.sampled_from(["ljust", "rjust", "center", "zfill",
                                                                               "expandtabs", "format", "split"]),
                      NUMBERS),
            st.builds(lambda a, b: f"{a}.replace('a', {b})", inner, inner),
            st.builds(lambda a, b: f"{a}[{b}]", inner, NUMBERS),
        ), max_leaves=5)


def statements():
    return st.recursive(
        st.one_of(exprs().map(lambda e: f"{{{{ {e} }}}}"), st.text(max_size=8),
                  st.just("{{ raise_exception('refused') }}"), st.just("{{ loop.index }}")),
        lambda inner: st.one_of(
            st.builds(lambda e, b: f"{{% for x in {e} %}}{b}{{% endfor %}}", exprs(), inner),
            st.builds(lambda e, b: f"{{% for x in {e} recursive %}}{b}{{{{ loop({e}) }}}}{{% endfor %}}",
                      exprs(), inner),
            st.builds(lambda e, b: f"{{% set x = {e} %}}{b}", exprs(), inner),
            st.builds(lambda e, b: f"{{% if {e} %}}{b}{{% endif %}}", exprs(), inner),
            st.builds(lambda b: f"{{% macro m(n) %}}{b}{{{{ m(n) }}}}{{% endmacro %}}{{{{ m(1) }}}}", inner),
            st.builds(lambda a, b: a + b, inner, inner),
        ), max_leaves=4)


TEMPLATES = st.one_of(statements(), st.text(max_size=40))


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


CHAT = environment(filters={"tojson": _tojson}, globals={"raise_exception": _raise}, trim_blocks=True,
                   lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])       # as sdk.tools.text
PROMPT = environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)  # as the advisor
CONTEXT = {"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": True, "bos_token": "<s>"}


def check(text: str, seconds: float) -> None:
    """Compile and render ``text`` in both environments: output or TemplateRenderError."""
    for env in (CHAT, PROMPT):
        try:
            render(compile_template(env, text, "fuzz.j2"), CONTEXT, "fuzz.j2", seconds=seconds)
        except TemplateRenderError as exc:
            assert str(exc).startswith("fuzz.j2: ")


@budget()
@given(text=TEMPLATES)
def test_fuzz_template(text):
    with tried("template"):
        check(text, 0.1)


@pytest.mark.parametrize("path", corpus("template"), ids=lambda p: p.name)
def test_template_corpus(path):
    """Every kept template that once hung, exhausted memory or escaped now gives TemplateRenderError."""
    for env in (CHAT, PROMPT):
        with pytest.raises(TemplateRenderError, match="^fuzz.j2: "):
            render(compile_template(env, path.read_text(), "fuzz.j2"), CONTEXT, "fuzz.j2")
