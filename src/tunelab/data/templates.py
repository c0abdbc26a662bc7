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


# axolotl's names for other templates of its own: tunelab uses the model's own template for
# them (the one the model family was trained with), as axolotl's ``tokenizer_default`` does.
AXOLOTL_TEMPLATES = frozenset(
    """aya cohere command_a command_a_rag command_a_tool_use deepseek_v2 deepseek_v3 exaone
    exaone4 falcon_h1 gemma3n gemma4 gemma4_unified jamba llama3_2_vision llama4 llava metharme
    mistral_v1 mistral_v2v3 mistral_v3_tekken mistral_v7_tekken nemotron_h phi_3 phi_35 phi_4
    pixtral qwen2_vl qwen3 qwen3_5 qwen_25""".split()
)
SYNONYMS = {"gemma3": "gemma"}  # axolotl's name -> tunelab's template of the same layout
MODELS_OWN_CHOICE = "tokenizer_default"
FALLBACK_PREFIX = "tokenizer_default_fallback_"  # the model's own, else the named one


def _has_template(tokenizer: Any) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def _names() -> str:
    return ", ".join([*CHAT_TEMPLATES, MODELS_OWN_CHOICE])


def _use_models_own(tokenizer: Any, why: str | None = None) -> None:
    if not _has_template(tokenizer):
        raise DataError(
            f"{why}, but the model's tokenizer has no chat template"
            if why
            else "the model's tokenizer has no chat template",
            f"give the template's Jinja text (or file) as chat_template_jinja, or set "
            f"chat_template to one of {', '.join(CHAT_TEMPLATES)}",
        )
    compile_chat_template(template_text(tokenizer))


def _use_jinja(tokenizer: Any, jinja: str) -> None:
    """``chat_template_jinja``: the template's text, or the path of a file holding it."""
    text, where = jinja, "chat_template_jinja"
    looks_like_path = "\n" not in jinja and "{{" not in jinja and "{%" not in jinja
    if looks_like_path:
        path = Path(jinja).expanduser()
        if not path.is_file():
            raise DataError(
                f"chat_template_jinja '{jinja}': neither Jinja text nor an existing file",
                "give the template's text (with {% ... %} / {{ ... }}) or the path of its file",
            )
        text, where = read_text(path), f"chat_template_jinja {path}"
    tokenizer.chat_template = text
    compile_chat_template(text, where)


def apply_chat_template(tokenizer: Any, choice: str | None, jinja: str | None = None) -> list[str]:
    """Give ``tokenizer`` the chosen template and check that it compiles in the sandbox, so a
    broken template is named before any row renders. Returns notes for the user.

    ``jinja`` (``chat_template_jinja``: text or a file) wins over ``choice``. ``choice`` is a
    tunelab name, a Jinja file, or one of axolotl's names: ``tokenizer_default`` and axolotl's
    names for model families' own templates (``qwen_25``, ``phi_3``, ...) mean the model's own
    template; ``gemma3`` is tunelab's ``gemma``.
    """
    if jinja:
        _use_jinja(tokenizer, jinja)
        if choice in (None, "jinja", MODELS_OWN_CHOICE):
            return []
        return [f"chat_template '{choice}' is not used: chat_template_jinja wins over it"]
    if choice == "jinja":
        raise DataError(
            "chat_template 'jinja' needs the template itself in chat_template_jinja",
            "set chat_template_jinja to the template's text or the path of its file",
        )
    if choice is None or choice == MODELS_OWN_CHOICE:
        _use_models_own(tokenizer, f"chat_template is '{choice}'" if choice else None)
        return []
    notes: list[str] = []
    if choice.startswith(FALLBACK_PREFIX):
        if _has_template(tokenizer):
            compile_chat_template(template_text(tokenizer))
            return []
        choice = choice[len(FALLBACK_PREFIX) :]
        notes.append(f"the model has no chat template of its own; using '{choice}'")
    choice = SYNONYMS.get(choice, choice)
    if choice in CHAT_TEMPLATES:
        tokenizer.chat_template = CHAT_TEMPLATES[choice]
        compile_chat_template(tokenizer.chat_template, f"chat_template '{choice}'")
        return notes
    if choice in AXOLOTL_TEMPLATES:
        why = f"chat_template '{choice}' is axolotl's name for a model family's own template"
        _use_models_own(tokenizer, why)
        model = getattr(tokenizer, "name_or_path", "") or "the model"
        return [f"{why}; using the template of {model}"]
    path = Path(choice).expanduser()
    if not path.is_file():
        raise DataError(
            f"chat_template '{choice}': neither a known name nor a file",
            f"use one of {_names()} (or an axolotl template name), the path of a Jinja file, "
            "or chat_template_jinja",
        )
    tokenizer.chat_template = read_text(path)
    compile_chat_template(tokenizer.chat_template, f"chat_template {path}")
    return notes


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
