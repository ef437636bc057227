"""Jinja2 templates (chat templates, advisor prompts) rendered in a sandbox under a budget.

A template comes with a checkpoint or a deployment, so it is treated as hostile: Jinja2's
immutable sandbox already refuses unsafe attributes and caps ``range`` at 100,000 items; on
top of it every render here has a budget, and a template past it fails with
:class:`TemplateRenderError` naming the template, within about :data:`RENDER_SECONDS`:

- time: the render's deadline is checked at every loop iteration (each ``{% for %}`` is
  rewritten at compile time to iterate through the budget), every call, attribute access and
  arithmetic operation, and every piece of output; so nested ``range(100000)`` loops stop
  after a second instead of running for hours. This is a checked budget in the rendering
  thread, not a signal or a subprocess: it works in any thread and costs a clock read per
  step, but a single C-level operation is not interrupted, hence the size checks;
- size: any string, list or number a template builds is checked *before* it is built
  (``'a' * 10**10``, ``10 ** 10**10``, ``'%0999999999d' % 1``, ``'x'.ljust(10**10)``,
  ``'{:>9999999999}'.format(1)``, ``center``/``indent``/``wordwrap`` widths) against
  :data:`VALUE_ITEMS`, and the output against :data:`RENDER_CHARS`.

Use :func:`environment` for an environment and :func:`render` to render with the budget.
"""
from __future__ import annotations

import contextvars
import math
import re
import time
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

#: Seconds one render may take.
RENDER_SECONDS = 1.0
#: Characters one render may output.
RENDER_CHARS = 1 << 20
#: Items (characters, elements) in any one value a template builds; digits of a number.
VALUE_ITEMS = 1 << 20
_CHECK_EVERY = 256                  # steps between clock reads
_WIDE_FORMAT = re.compile(r"%[-#0 +]*(\*|\d{7,})|%[-#0 +]*\d*\.(\*|\d{7,})")
_WIDE_SPEC = re.compile(r"\{[^{}]*:[^{}]*(\{|\d{7,})")
_WIDTH_METHODS = {"ljust", "rjust", "center", "zfill"}
#: What a hostile template can make Jinja or a filter raise (Jinja's own filters use ``assert``).
_FAILURES = (jinja2.TemplateError, RecursionError, MemoryError, ArithmeticError, TypeError, AssertionError,
             ValueError, LookupError, AttributeError)


class TemplateRenderError(ValueError):
    """A template failed to compile or render, or ran past its budget; the message names it."""


class _OverBudget(Exception):
    pass


class _Budget:
    """One render's deadline and step counter."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps % _CHECK_EVERY == 0 and time.monotonic() > self.deadline:
            raise _OverBudget(f"ran past its {self.seconds:g} s budget (after {self.steps:,} steps)")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("template_budget", default=None)


def _step() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.step()


def _check_size(n: float, what: str) -> None:
    if n > VALUE_ITEMS:
        raise _OverBudget(f"{what} would hold {n:,.0f} items, more than {VALUE_ITEMS:,}")


def _size(v: Any) -> int:
    return len(v) if isinstance(v, (str, bytes, list, tuple)) else 0


class BudgetedSandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox with every render's loops, calls, attribute reads and
    arithmetic checked against the budget (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "%", "+", "//", "/"})

    def __init__(self, *, filters: dict | None = None, globals: dict | None = None, **options: Any):
        super().__init__(**options)
        self.filters.update(filters or {})
        self.globals.update(globals or {})
        for name, func in list(self.filters.items()):
            self.filters[name] = _checked_filter(name, func)
        self.globals.pop("lipsum", None)          # lipsum(n=10**9): unbounded text, and no template needs it

    def budget_iter(self, iterable: Any):
        """What every ``{% for %}`` iterates: ``iterable``, one budget step per item."""
        for item in iterable:
            _step()
            yield item

    def from_string(self, source, globals=None, template_class=None):
        """Compile ``source`` with each for-loop's iterable wrapped in :meth:`budget_iter`."""
        if isinstance(source, str):
            tree = self.parse(source)
            for loop in tree.find_all(nodes.For):
                loop.iter = nodes.Call(nodes.EnvironmentAttribute("budget_iter"), [loop.iter], [], None, None,
                                       lineno=loop.lineno)
            source = tree
        cls = template_class or self.template_class
        return cls.from_code(self, self.compile(source), self.make_globals(globals), None)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        """Arithmetic, with the size of what it would build checked first."""
        _step()
        if operator == "*":
            seq, n = (left, right) if _size(left) else (right, left)
            if _size(seq) and isinstance(n, int):
                _check_size(_size(seq) * n, f"{type(seq).__name__} * {n}")
        elif operator == "**" and isinstance(left, int) and isinstance(right, (int, float)):
            if abs(left) > 1 and right > 0:
                _check_size(right * math.log10(abs(left)), f"{left} ** {right} (digits)")
        elif operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
            raise _OverBudget(f"format {left[:40]!r} has a width or precision of 7+ digits or '*'")
        elif operator == "+":
            _check_size(_size(left) + _size(right), "a concatenation")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        """A call, with widths and format specs of string methods checked first."""
        _step()
        owner, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "")
        if isinstance(owner, str):
            if name in _WIDTH_METHODS and args and isinstance(args[0], int):
                _check_size(args[0], f"str.{name}({args[0]})")
            elif name == "expandtabs":
                _check_size(len(owner) * (args[0] if args and isinstance(args[0], int) else 8), "str.expandtabs")
            elif name == "replace" and len(args) >= 2 and isinstance(args[1], str):
                _check_size(len(owner) + (len(owner) + 1) * len(args[1]), "str.replace")
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        """An attribute read (``x.y``), one budget step; ``str.format`` of a format string with
        huge or nested widths is refused here (the sandbox wraps the method it returns)."""
        _step()
        if isinstance(obj, str) and attribute in ("format", "format_map") and _WIDE_SPEC.search(obj):
            raise _OverBudget(f"format {obj[:40]!r} has a nested or 7+ digit width")
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        """An item read (``x[y]``), one budget step."""
        _step()
        return super().getitem(obj, argument)


def _checked_filter(name: str, func):
    """``func`` with one budget step per call and its arguments checked before it runs: no
    integer argument past :data:`VALUE_ITEMS` (``batch(10**9)``, ``slice``, ``tojson(indent=)``),
    the widths of ``center``, ``indent`` and ``wordwrap`` times the lines, ``format``'s widths."""
    def checked(*args, **kwargs):
        _step()
        for v in list(args) + list(kwargs.values()):
            if isinstance(v, int) and not isinstance(v, bool):
                _check_size(abs(v), f"{name}(..., {v})")
        value = args[1] if getattr(func, "jinja_pass_arg", None) is not None and len(args) > 1 else \
            args[0] if args else None
        rest = args[2:] if getattr(func, "jinja_pass_arg", None) is not None else args[1:]
        if name == "format":
            if _WIDE_FORMAT.search(str(value)):
                raise _OverBudget(f"format {str(value)[:40]!r} has a width or precision of 7+ digits or '*'")
        elif name in ("center", "indent", "wordwrap"):
            text = str(value)
            width = rest[0] if rest else kwargs.get("width", 0)
            width = len(width) if isinstance(width, str) else width
            if isinstance(width, int):
                _check_size(width * (text.count("\n") + 1) + len(text), f"{name}({width})")
        return func(*args, **kwargs)
    checked.__name__ = name
    if getattr(func, "jinja_pass_arg", None) is not None:
        checked.jinja_pass_arg = func.jinja_pass_arg
    return checked


def environment(*, filters: dict | None = None, globals: dict | None = None, **options: Any) -> BudgetedSandbox:
    """A sandboxed, budgeted Jinja2 environment: ``filters`` and ``globals`` added to Jinja's
    (every filter checked, see :func:`_checked_filter`), ``options`` as for ``jinja2.Environment``."""
    return BudgetedSandbox(filters=filters, globals=globals, **options)


def compile_template(env: BudgetedSandbox, text: str, where: str) -> jinja2.Template:
    """Compile ``text``; a syntax error raises :class:`TemplateRenderError` naming ``where`` and the
    line, as does any other failure while compiling (Jinja folds constant expressions then, so
    ``StrictUndefined`` and the sandbox can already refuse some)."""
    try:
        return env.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateRenderError(f"{where}: line {exc.lineno}: {exc.message}") from None
    except _OverBudget as exc:
        raise TemplateRenderError(f"{where}: {exc}") from None
    except _FAILURES as exc:
        raise TemplateRenderError(f"{where}: cannot compile: {type(exc).__name__}: {str(exc)[:300]}") from None


def render(template: jinja2.Template, context: dict, where: str, *, seconds: float = RENDER_SECONDS) -> str:
    """Render ``template`` with ``context`` under the budget; any failure (an error the
    template raises, a sandbox refusal, the budget) raises :class:`TemplateRenderError`
    naming ``where``."""
    budget = _Budget(seconds)
    token = _BUDGET.set(budget)
    out, size = [], 0
    try:
        for piece in template.generate(**context):
            size += len(piece)
            if size > RENDER_CHARS:
                raise _OverBudget(f"output passed {RENDER_CHARS:,} characters")
            budget.step()
            out.append(piece)
    except _OverBudget as exc:
        raise TemplateRenderError(f"{where}: {exc}") from None
    except _FAILURES as exc:
        message = getattr(exc, "message", None) or str(exc)
        raise TemplateRenderError(f"{where}: {type(exc).__name__}: {str(message)[:300]}") from None
    finally:
        _BUDGET.reset(token)
    return "".join(out)
