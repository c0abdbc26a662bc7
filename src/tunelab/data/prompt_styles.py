"""Instruction rows laid out as fixed prompt text, the way axolotl's ``type: alpaca`` does.

``type: alpaca_prompt`` (axolotl's ``alpaca``) and ``type: jeopardy`` need no chat template:
the row becomes one prompt text in the dataset's ``prompt_style`` (not trained, unless
``train_on_inputs``) followed by the response (trained) and the EOS token. The texts are
axolotl's, character for character, so a config written for axolotl trains the same tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.data.formats import RowError, TextSample, response_field, text_field


@dataclass(frozen=True)
class PromptLayout:
    """One prompt style: the system line and the turn, with and without an input."""

    system: str  # holds {system}
    turn: str  # holds {instruction} and {input}
    turn_no_input: str  # holds {instruction}


# The system prompts axolotl's Alpaca prompter puts before every instruction.
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request."
)

LAYOUTS: dict[str, PromptLayout] = {
    "instruct": PromptLayout(
        "{system}\n\n",
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "chat": PromptLayout(
        "SYSTEM: {system}\n",
        "USER: {instruction}\n{input}\nASSISTANT:",
        "USER: {instruction}\nASSISTANT:",
    ),
    "chatml": PromptLayout(
        "<|im_start|>system\n{system}<|im_end|>\n",
        "<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
    ),
    "phi": PromptLayout(
        "<|system|>\n{system}<|end|>\n",
        "<|user|>\n{instruction}<|end|>{input}<|assistant|>",
        "<|user|>\n{instruction}<|end|>\n<|assistant|>\n",
    ),
}


def prompt_text(style: str, instruction: str, extra: str) -> str:
    """The prompt for ``instruction`` (and ``extra`` input, when not empty) in ``style``.

    Only the layouts are format strings; braces in a row's text stay as they are.
    """
    layout = LAYOUTS[style]
    if extra:
        return layout.system.format(system=WITH_INPUT) + layout.turn.format(
            instruction=instruction, input=extra
        )
    return layout.system.format(system=WITHOUT_INPUT) + layout.turn_no_input.format(
        instruction=instruction
    )


def _instruction_sample(style: str, instruction: str, extra: str, response: str) -> TextSample:
    return TextSample(((prompt_text(style, instruction, extra), False), (response, True)))


def alpaca_prompt_row(row: dict[str, Any], style: str = "instruct") -> TextSample:
    """``instruction`` (+ ``input``) as the prompt, ``output`` as the response."""
    instruction = text_field(row, "instruction", required=True)
    extra = text_field(row, "input", required=False)
    return _instruction_sample(style, instruction, extra, response_field(row, "output"))


def jeopardy_row(row: dict[str, Any], style: str = "instruct") -> TextSample:
    """``question`` as the instruction, ``category`` as the input, "what is " + ``answer``."""
    question = text_field(row, "question", required=True)
    category = text_field(row, "category", required=True)
    answer = text_field(row, "answer", required=True)
    if not answer.strip():
        raise RowError("answer", "is empty: there is no response to train on")
    return _instruction_sample(style, question, category, "what is " + answer)


# ``type:`` names -> (columns they need, row converter taking the prompt style)
PROMPTED_FORMATS: dict[str, tuple[tuple[str, ...], Callable[..., TextSample]]] = {
    "alpaca_prompt": (("instruction", "output"), alpaca_prompt_row),
    "jeopardy": (("question", "category", "answer"), jeopardy_row),
}


# A chat template for a run trained on these prompts: a conversation renders as the prompt the
# run learned, built from the same layouts as the data (so the two cannot drift apart).
_MARK = "\x00"  # stands for a format field while a layout is cut in two around it


def _around(layout: str, field: str) -> tuple[str, str]:
    """The text of ``layout`` before and after its ``{field}`` (format escapes resolved)."""
    before, after = layout.format(**{field: _MARK}).split(_MARK)
    return before, after


def _literal(text: str) -> str:
    """``text`` as a Jinja string literal."""
    return json.dumps(text, ensure_ascii=False)


def chat_template(style: str, bos: bool = False) -> str:
    """A Jinja chat template rendering a conversation as ``style``'s prompt without input.

    The system message (else axolotl's system prompt for an instruction without input) in
    the style's system line, then each user turn as the instruction of a turn; an assistant
    turn's text follows the turn's response header and ends with the EOS token. With
    ``add_generation_prompt`` the text ends where the response starts (``### Response:\\n``
    for ``instruct``), so a one-question conversation is the training prompt exactly. ``bos``:
    start with the BOS token (for a tokenizer that puts it before plain text by itself, as the
    training data then has it)."""
    layout = LAYOUTS[style]
    system_before, system_after = _around(layout.system, "system")
    user, response = _around(layout.turn_no_input, "instruction")
    lines = [
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system = messages[0]['content'] -%}",
        "{%- set turns = messages[1:] -%}",
        "{%- else -%}",
        f"{{%- set system = {_literal(WITHOUT_INPUT)} -%}}",
        "{%- set turns = messages -%}",
        "{%- endif -%}",
        *(["{{- bos_token -}}"] if bos else []),
        f"{{{{- {_literal(system_before)} + system + {_literal(system_after)} -}}}}",
        "{%- for message in turns -%}",
        "{%- if message['role'] == 'user' and loop.index0 % 2 == 0 -%}",
        f"{{{{- {_literal(user)} + message['content'] -}}}}",
        "{%- elif message['role'] == 'assistant' and loop.index0 % 2 == 1 -%}",
        f"{{{{- {_literal(response)} + message['content'] + eos_token -}}}}",
        "{%- else -%}",
        "{{- raise_exception('after an optional system message, the conversation must "
        "alternate user and assistant turns, starting with the user') -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt and turns and turns[-1]['role'] == 'user' -%}",
        f"{{{{- {_literal(response)} -}}}}",
        "{%- endif -%}",
    ]
    return "\n".join(lines) + "\n"


def prompted_style(sources: Sequence[Any]) -> tuple[str | None, str | None]:
    """The prompt style every dataset in ``sources`` (``DatasetSource`` entries) was laid out
    in, when all are ``type: alpaca_prompt``/``jeopardy`` with one ``prompt_style``; else
    None. The second value is a note for a run where only some are (its chat template is
    then the model's own), else None."""

    def prompted(source: Any) -> bool:  # as prepare.py reads it: these keys win over the type
        overridden = (
            source.format_file or source.data_template or source.field_messages
            or source.message_property_mappings
        )  # fmt: skip
        return source.type in PROMPTED_FORMATS and not overridden

    styles = sorted({s.prompt_style for s in sources if prompted(s)})
    if not styles:
        return None, None
    if len(styles) == 1 and all(prompted(s) for s in sources):
        return styles[0], None
    what = (
        f"prompt styles {' and '.join(styles)}"
        if len(styles) > 1
        else "the Alpaca prompt and other formats"
    )
    return None, (
        f"the datasets mix {what}; the saved tokenizer keeps the model's chat template, "
        "which is not the prompt all of the data was trained in"
    )
