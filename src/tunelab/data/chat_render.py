"""Chat templates rendered in the bounded sandbox, the way transformers renders them.

transformers' ``apply_chat_template`` renders in jinja2's sandbox but with no bound on time
or size. Here the same templates render with the same settings (``trim_blocks``,
``lstrip_blocks``, loop controls, a ``{% generation %}`` block, ``raise_exception``, a ``tojson``
that does not escape HTML, ``strftime_now``, ``dict``, ``namespace``, and the tokenizer's special
tokens as variables) in :mod:`tunelab.data.sandbox`, so the text is the same and a runaway
template stops with an error naming it. A multimodal processor still renders its own
conversations with its ``apply_chat_template`` (see ``data/tokenize.py``).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError
from jinja2.utils import Namespace

from tunelab.data.sandbox import (
    BoundedEnvironment,
    BoundedTemplate,
    TemplateBoundError,
    compile_template,
)
from tunelab.errors import DataError

MODELS_OWN = "the model's chat template"


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks the assistant's text; it renders as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # plain json.dumps: Jinja's own tojson escapes < > & ' for HTML, which a prompt must not have
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _public(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"namespace attribute {name!r} starts with '_'")


class _Namespace(Namespace):
    """``namespace()``, refusing attribute names that start with '_' (Python's internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (Jinja's own signature)
        attrs = dict(*args[1:], **kwargs)
        for name in attrs:
            _public(name)
        Namespace.__init__(args[0], attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _public(name)
        Namespace.__setitem__(self, name, value)


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)``, without handing templates the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Any, value: Any = None) -> dict:
        return dict.fromkeys(keys, value)


_ENV = BoundedEnvironment(
    filters={"tojson": _tojson},
    globals={
        "raise_exception": _raise_exception,
        "strftime_now": _strftime_now,
        "dict": _Dict(),
        "namespace": _Namespace,
    },
    trim_blocks=True,
    lstrip_blocks=True,
    extensions=[_Generation, jinja2.ext.loopcontrols],
)
_COMPILED: dict[str, BoundedTemplate] = {}  # by template text; one run uses one or two


def compile_chat_template(text: str, name: str = MODELS_OWN) -> BoundedTemplate:
    """The chat template, compiled (once per text); ``name`` says where it came from in errors,
    e.g. ``chat_template 'chatml'``. A syntax error is a :class:`DataError`."""
    cached = _COMPILED.get(text)
    if cached is None or (name != MODELS_OWN and cached.name != name):  # a name given wins
        if len(_COMPILED) > 32:
            _COMPILED.clear()
        _COMPILED[text] = cached = compile_template(_ENV, text, name)
    return cached


def template_text(tokenizer: Any) -> str:
    """The tokenizer's chat template (the default one where it has several)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not isinstance(template, str):
        raise DataError("the model's tokenizer has no chat template", "set chat_template")
    return template


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt=False) -> str:
    """The conversation as text, laid out by the tokenizer's chat template in the sandbox:
    the same text as ``tokenizer.apply_chat_template(messages, tokenize=False, ...)``."""
    template = compile_chat_template(template_text(tokenizer))
    if not messages:  # as transformers: an assistant turn needs something before it
        raise DataError(f"{template.name}: cannot render an empty conversation")
    variables = {
        **getattr(tokenizer, "special_tokens_map", {}),
        # as transformers does: a key set to None is left out, as templates test for keys
        "messages": [{k: v for k, v in m.items() if v is not None} for m in messages],
        "tools": None,
        "documents": None,
        "add_generation_prompt": add_generation_prompt,
    }
    try:
        return template.render(variables)
    except TemplateBoundError:
        raise
    except Exception as exc:  # the template's own raise_exception, or any error inside it
        raise DataError(
            f"{template.name}: cannot render this conversation: {exc}",
            "check the conversation's roles and order, or use another chat_template",
        ) from None
