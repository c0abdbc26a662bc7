"""Instruction rows laid out as fixed prompt text, the way axolotl's ``type: alpaca`` does.

``type: alpaca_prompt`` (axolotl's ``alpaca``) and ``type: jeopardy`` need no chat template:
the row becomes one prompt text in the dataset's ``prompt_style`` (not trained, unless
``train_on_inputs``) followed by the response (trained) and the EOS token. The texts are
axolotl's, character for character, so a config written for axolotl trains the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
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
