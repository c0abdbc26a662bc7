"""A bounded Jinja sandbox for the templates users supply: data templates and chat templates.

A template is data, never code. It renders in jinja2's ``ImmutableSandboxedEnvironment`` (no
attribute tricks, no changes to lists and dicts), and each render has bounds, so a template
that loops without end or builds a giant value stops with an error naming the template and
the bound instead of hanging or exhausting memory. The bounds are module constants (a test
may lower them); real templates stay far below them (a chat template renders in well under
a millisecond and writes a few kilobytes):

- ``MAX_SECONDS`` (5 s): the time one render may take.
- ``MAX_LOOP_STEPS`` (1,000,000): ``{% for %}`` iterations in one render, all loops together.
- ``MAX_OUTPUT_CHARS`` (10,000,000): characters one render may write (text written into
  macros and ``{% set %}`` blocks counts too), and the size of any one string or list a
  template builds. One step (a filter, a string method, ``%``) that could need more than ten
  times that is refused before it runs.
- ``MAX_NUMBER_DIGITS`` (4,300, Python's own limit for printing an int): an integer built
  with ``*`` or ``**``.
- ``MAX_CALL_DEPTH`` (64): macros (or recursive loops) calling each other.
- ``MAX_RANGE`` (jinja2's 100,000): numbers in one ``range()``.

How the time bound works: a Jinja loop needs no call to spin (nested ``{% for %}`` over a
string), so after parsing, the tree is rewritten: the iterable of every ``{% for %}`` goes
through a guard that counts steps and checks the deadline at each item, every expression
written goes through a guard that counts its characters, and every ``~`` through one that
checks the size first. Calls, filters and the operators ``* ** + %`` are checked by the
environment. Sizes are checked *before* a value is built: a 10 GB string cannot be refused
after the fact.
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.sandbox
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from tunelab.errors import DataError

MAX_SECONDS = 5.0
MAX_LOOP_STEPS = 1_000_000
MAX_OUTPUT_CHARS = 10_000_000
MAX_NUMBER_DIGITS = 4_300
MAX_CALL_DEPTH = 64
MAX_RANGE = jinja2.sandbox.MAX_RANGE
STEP_FACTOR = 10  # one step may need this many times the output bound, no more

HINT = "real templates stay far below this bound: fix the template, or use another"
_DIGITS = re.compile(r"\d{4,}")  # widths and precisions in a format string


class TemplateBoundError(DataError):
    """A template broke a bound while rendering; the message names the template and the bound."""


@dataclass
class _Budget:
    name: str
    deadline: float
    steps: int = 0
    written: int = 0
    depth: int = 0


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("budget", default=None)


def _fail(what: str) -> None:
    budget = _BUDGET.get()
    raise TemplateBoundError(f"{budget.name if budget else 'template'}: {what}", HINT)


def _tick(budget: _Budget | None) -> None:
    if budget is not None and time.monotonic() > budget.deadline:
        _fail(f"rendering took more than {MAX_SECONDS:g} s (the time bound)")


def _size(value: Any, limit: int) -> int:
    """About how many characters ``value`` prints as (nesting weighs, since indented JSON
    repeats it on every line); counting stops past ``limit``. Containers are walked lazily,
    so a huge one costs no memory to measure."""
    total, stack = 0, [(iter((value,)), 0)]
    while stack and total <= limit:
        items, depth = stack[-1]
        item = next(items, _DONE)
        if item is _DONE:
            stack.pop()
        elif isinstance(item, str):
            total += len(item)
        elif isinstance(item, int):
            total += item.bit_length() * 3 // 10 + 1
        elif isinstance(item, (dict, list, tuple, set, frozenset)):
            total += 2 + (2 + depth) * len(item)
            members = (
                itertools.chain(item.keys(), item.values()) if isinstance(item, dict) else item
            )
            stack.append((iter(members), depth + 1))
        else:
            total += 24
    return total


_DONE = object()


def _check_step(what: str, subject: Any, args: tuple, kwargs: dict, format_like: bool) -> None:
    """Refuse a filter, string method or ``%`` whose result could pass the step bound."""
    limit = STEP_FACTOR * MAX_OUTPUT_CHARS
    widths = [a if isinstance(a, int) else _size(a, limit) for a in (*args, *kwargs.values())]
    if format_like and isinstance(subject, str):
        widths += [int(d) for d in _DIGITS.findall(subject)]
    if (_size(subject, limit) + 1) * (1 + sum(map(abs, widths))) > limit:
        _fail(f"{what} would build more than {MAX_OUTPUT_CHARS:,} characters (the size bound)")


def _check_result(what: str, value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_OUTPUT_CHARS:
        _fail(f"{what} built more than {MAX_OUTPUT_CHARS:,} characters (the size bound)")
    return value


def _check_binop(operator: str, left: Any, right: Any) -> None:
    ints = isinstance(left, int) and isinstance(right, int)
    max_bits = MAX_NUMBER_DIGITS * math.log2(10)
    if operator == "**" and ints and right > 0 and abs(left) > 1:
        too_big = right * math.log2(abs(left)) > max_bits
    elif operator == "*" and ints:
        too_big = left.bit_length() + right.bit_length() > max_bits
    elif operator == "*" and isinstance(left, int) != isinstance(right, int):
        seq, times = (right, left) if isinstance(left, int) else (left, right)
        too_big = isinstance(seq, (str, list, tuple)) and len(seq) * times > MAX_OUTPUT_CHARS
    elif operator == "+" and isinstance(left, (str, list, tuple)) and type(left) is type(right):
        too_big = len(left) + len(right) > MAX_OUTPUT_CHARS
    elif operator == "%" and isinstance(left, str):
        _check_step("'%'", left, right if isinstance(right, tuple) else (right,), {}, True)
        return
    else:
        return
    if too_big and ints:
        _fail(f"'{operator}' would build a number of more than {MAX_NUMBER_DIGITS:,} digits "
              "(the number bound)")  # fmt: skip
    if too_big:
        noun = "characters" if isinstance(left, str) or isinstance(right, str) else "items"
        _fail(f"'{operator}' would build more than {MAX_OUTPUT_CHARS:,} {noun} (the size bound)")


def _budget() -> _Budget:
    budget = _BUDGET.get()
    assert budget is not None, "sandboxed templates render through BoundedTemplate.render"
    return budget


@jinja2.pass_context  # a context filter is never folded at compile time, when no budget runs
def _guard_loop(context: Any, iterable: Any) -> Any:
    budget = _budget()
    for item in iterable:
        budget.steps += 1
        if budget.steps > MAX_LOOP_STEPS:
            _fail(f"its loops ran more than {MAX_LOOP_STEPS:,} steps (the loop bound)")
        _tick(budget)
        yield item


@jinja2.pass_context
def _guard_write(context: Any, value: Any) -> str:
    budget = _budget()
    if not isinstance(value, str) and _size(value, MAX_OUTPUT_CHARS) > MAX_OUTPUT_CHARS:
        _fail(f"it writes more than {MAX_OUTPUT_CHARS:,} characters (the output bound)")
    text = str(value)
    budget.written += len(text)
    if budget.written > MAX_OUTPUT_CHARS:
        _fail(f"it writes more than {MAX_OUTPUT_CHARS:,} characters (the output bound)")
    _tick(budget)
    return text


@jinja2.pass_context
def _guard_concat(context: Any, items: list) -> str:
    if sum(_size(x, MAX_OUTPUT_CHARS) for x in items) > MAX_OUTPUT_CHARS:
        _fail(f"'~' would build more than {MAX_OUTPUT_CHARS:,} characters (the size bound)")
    return "".join(map(str, items))


_LOOP, _WRITE, _CONCAT = "tunelab_loop", "tunelab_write", "tunelab_concat"


def _through(node: nodes.Expr, guard: str) -> nodes.Filter:
    return nodes.Filter(node, guard, [], [], None, None, lineno=node.lineno)


class _Guards(NodeTransformer):
    """Routes every loop's iterable, every written expression and every ``~`` through a guard."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = _through(node.iter, _LOOP)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        node = self.generic_visit(node)
        node.nodes = [_through(child, _WRITE) for child in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        return _through(nodes.List(node.nodes, lineno=node.lineno), _CONCAT)


def _bounded_filter(name: str, func: Any) -> Any:
    passes_first = getattr(func, "jinja_pass_arg", None) is not None  # context or environment

    @functools.wraps(func)  # keeps jinja_pass_arg, so jinja passes what the filter expects
    def bounded(*args: Any, **kwargs: Any) -> Any:
        subject, *rest = args[passes_first:] or [None]
        _tick(_BUDGET.get())
        _check_step(f"the {name} filter", subject, tuple(rest), kwargs, name == "format")
        return _check_result(f"the {name} filter", func(*args, **kwargs))

    return bounded


def _range(*args: int) -> range:
    numbers = range(*args)
    try:
        count = len(numbers)
    except OverflowError:  # more than sys.maxsize numbers
        count = MAX_RANGE + 1
    if count > MAX_RANGE:
        _fail(f"range() of more than {MAX_RANGE:,} numbers (the range bound)")
    return numbers


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox with bounds on time, loops, sizes and call depth.

    ``filters`` and ``globals`` are added to Jinja's own; every filter is bounded.
    """

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, filters: dict | None = None, globals: dict | None = None, **options: Any):
        super().__init__(**options)
        self.filters.update(filters or {})
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.filters.update({_LOOP: _guard_loop, _WRITE: _guard_write, _CONCAT: _guard_concat})
        self.globals.pop("lipsum", None)  # writes any amount of text; no real template uses it
        self.globals.update({"range": _range, **(globals or {})})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick(_budget())
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _budget()
        _tick(budget)
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        subject, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
        if isinstance(subject, str):
            _check_step(f"str.{name}", subject, args, kwargs, name in ("format", "format_map"))
        if budget.depth >= MAX_CALL_DEPTH:
            _fail(f"calls nest more than {MAX_CALL_DEPTH} deep (the recursion bound)")
        budget.depth += 1
        try:
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        return _check_result(f"{name or 'a call'}()", result)


class BoundedTemplate:
    """A compiled template that renders only within the bounds; ``name`` is used in errors."""

    def __init__(self, template: jinja2.Template, name: str):
        self.template = template
        self.name = name

    def render(self, variables: dict[str, Any]) -> str:
        """The text, streamed and counted. Raises :class:`TemplateBoundError` when a bound
        breaks, and whatever the template raises (its own errors, undefined names) otherwise."""
        token = _BUDGET.set(_Budget(self.name, time.monotonic() + MAX_SECONDS))
        try:
            pieces, size = [], 0
            # the write guard counts too; this is the last line should a piece slip past it
            for piece in self.template.generate(variables):
                size += len(piece)
                if size > MAX_OUTPUT_CHARS:
                    _fail(f"it writes more than {MAX_OUTPUT_CHARS:,} characters (the output bound)")
                pieces.append(piece)
            return "".join(pieces)
        except RecursionError:
            raise TemplateBoundError(
                f"{self.name}: it recurses deeper than Python allows (the recursion bound)", HINT
            ) from None
        finally:
            _BUDGET.reset(token)


def compile_template(env: BoundedEnvironment, text: str, name: str) -> BoundedTemplate:
    """Parse ``text`` and put its loops, output and ``~`` under guard; a syntax error is a
    :class:`DataError` naming the template and line."""
    try:
        tree = _Guards().visit(env.parse(text))
        tree.set_environment(env)
        return BoundedTemplate(env.from_string(tree), name)
    except jinja2.TemplateSyntaxError as exc:
        raise DataError(f"{name}: line {exc.lineno}: {exc.message}") from None
