"""Templates: named chat templates, Jinja data templates and text-generation-webui format files.

Data templates and format files turn a row into plain text. Their rule for what is
trained is the same and predictable: the **last** column placeholder in the template,
and everything after it, is the response (trained); everything before it is the prompt
(trained only with ``train_on_inputs``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from jinja2.exceptions import SecurityError

from tunelab.data.chat_render import compile_chat_template, template_text
from tunelab.data.formats import RowError, TextSample, checked_text
from tunelab.data.sandbox import BoundedEnvironment, TemplateBoundError, compile_template
from tunelab.errors import DataError
from tunelab.textfile import loads_json, read_text

CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3": (
        "{{ bos_token or '' }}{% for m in messages %}<|start_header_id|>"
        "{{ 'ipython' if m['role'] == 'tool' else m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "gemma": (
        "{{ bos_token or '' }}{% set ns = namespace(system='') %}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}{% else %}"
        "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
        "{% if loop.index0 == 1 or (loop.first and m['role'] != 'system') %}{{ ns.system }}"
        "{% endif %}{{ m['content'] | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "alpaca": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}"
        "{{ eos_token or '' }}\n\n"
        "{% else %}### Instruction:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### Response:\n{% endif %}"
    ),
    "vicuna": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'assistant' %}ASSISTANT: {{ m['content'] }}{{ eos_token or '' }}\n"
        "{% else %}USER: {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
}


def apply_chat_template(tokenizer: Any, choice: str | None) -> None:
    """Give ``tokenizer`` the chosen template (a name or a Jinja file); check it has one and
    that it compiles in the sandbox, so a broken template is named before any row renders."""
    if choice is None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(
                "the model's tokenizer has no chat template",
                f"set chat_template to one of {', '.join(CHAT_TEMPLATES)} or a Jinja file",
            )
        compile_chat_template(template_text(tokenizer))
        return
    if choice in CHAT_TEMPLATES:
        tokenizer.chat_template = CHAT_TEMPLATES[choice]
        compile_chat_template(tokenizer.chat_template, f"chat_template '{choice}'")
        return
    path = Path(choice).expanduser()
    if not path.is_file():
        raise DataError(
            f"chat_template '{choice}': neither a known name nor a file",
            f"use one of {', '.join(CHAT_TEMPLATES)}, or the path of a Jinja file",
        )
    tokenizer.chat_template = read_text(path)
    compile_chat_template(tokenizer.chat_template, f"chat_template {path}")


_ENV = BoundedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_LAST_EXPR = re.compile(r"\{\{.*?\}\}", re.S)


class DataTemplate:
    """A Jinja template over a row's columns: ``Prompt: {{dialogue}}\\nSummary: {{summary}}``."""

    def __init__(self, text: str, where: str = "data_template"):
        try:
            ast = _ENV.parse(text)
        except jinja2.TemplateSyntaxError as exc:
            raise DataError(f"{where}: line {exc.lineno}: {exc.message}") from None
        expressions = list(_LAST_EXPR.finditer(text))
        if not expressions:
            raise DataError(f"{where}: the template has no {{{{column}}}} to train on")
        cut = expressions[-1].start()
        self.columns = jinja2.meta.find_undeclared_variables(ast) - set(_ENV.globals)
        self.prompt = compile_template(_ENV, text[:cut], where)
        self.response = compile_template(_ENV, text[cut:], where)
        self.where = where

    def check_columns(self, columns: set[str], name: str) -> None:
        missing = sorted(self.columns - columns)
        if missing:
            raise DataError(
                f"{name}: the {self.where} names column(s) {missing} that the data does not have",
                f"its columns are {sorted(columns)}",
            )

    def __call__(self, row: dict[str, Any]) -> TextSample:
        for key in sorted(self.columns & row.keys()):
            checked_text(row[key], key)
        try:
            prompt, response = self.prompt.render(row), self.response.render(row)
        except jinja2.UndefinedError as exc:
            raise RowError(
                str(exc).split("'")[1] if "'" in str(exc) else "?", "is missing"
            ) from None
        except SecurityError as exc:  # the same on every row: stop at the first
            raise DataError(
                f"{self.where}: {exc}", "a data template only lays out columns"
            ) from None
        except TemplateBoundError:
            raise
        except Exception as exc:  # the template's own logic failed on this row's values
            raise RowError(self.where, f"cannot be rendered: {exc}") from None
        if not response.strip():
            raise RowError("response", "renders empty")
        return TextSample(((prompt, False), (response, True)))


class FormatFile:
    """A text-generation-webui format file: ``{"col1,col2": "... %col1% ... %col2%"}``.

    Each row takes the entry whose column set equals its non-empty columns.
    """

    def __init__(self, path: str):
        file = Path(path).expanduser()
        if not file.is_file():
            raise DataError(f"format_file {path}: no such file")
        try:
            entries = loads_json(read_text(file), str(file))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
            raise DataError(f"{path}: expected an object of 'col1,col2': 'template' entries")
        self.path = path
        self.entries = {
            frozenset(c.strip() for c in key.split(",")): value for key, value in entries.items()
        }

    def __call__(self, row: dict[str, Any]) -> TextSample:
        self._check(row)
        present = frozenset(k for k, v in row.items() if isinstance(v, str) and v.strip())
        template = self.entries.get(present)
        if template is None:
            known = " | ".join(",".join(sorted(k)) for k in self.entries)
            raise RowError(
                ",".join(sorted(present)), f"has no entry in {self.path} (it has: {known})"
            )
        last = max(template.rfind(f"%{c}%") for c in present)
        render = lambda text: re.sub(r"%(\w+)%", lambda m: _text(row, m[1], m[0]), text)  # noqa: E731
        return TextSample(((render(template[:last]), False), (render(template[last:]), True)))

    def _check(self, row: dict[str, Any]) -> None:
        """A column the file names holds text or nothing (null: the column is left out)."""
        for key in sorted(frozenset().union(*self.entries) & row.keys()):
            if row[key] is not None:
                checked_text(row[key], key)


def _text(row: dict[str, Any], key: str, placeholder: str) -> str:
    if key not in row:
        return placeholder  # not a column: the text keeps it, as text-generation-webui does
    return checked_text(row[key], key)
