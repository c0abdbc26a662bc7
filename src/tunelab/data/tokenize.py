"""Messages -> tokens and labels: the one place where rendering and loss masking happen.

A conversation is rendered with the tokenizer's chat template into segments, each
marked trained or not. Response segments are found by rendering growing prefixes of
the conversation, so this works for templates that have no generation markers. Each
segment is tokenized on its own and the ids concatenated, so the segments' texts joined
are exactly the decoded training text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.data.chat_render import render_chat
from tunelab.data.formats import Message, Sample, TextSample
from tunelab.errors import DataError

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The chat template renders a conversation in a way that cannot be split into turns
    (or breaks a bound of the sandbox); ``hint`` says what to do."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool


def _render(tokenizer: Any, renderer: Any, messages: list[Message], generation_prompt: bool) -> str:
    if renderer is tokenizer:  # the bounded sandbox; it names the template in its errors
        try:
            return render_chat(tokenizer, messages, add_generation_prompt=generation_prompt)
        except DataError as exc:  # the row is named where this is caught
            raise TemplateError(exc.message, exc.hint) from None
    try:  # a multimodal processor renders its own conversations (images in its content)
        return renderer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # jinja raises TemplateError, and templates raise their own
        raise TemplateError(f"the chat template cannot render this conversation: {exc}") from None


def _ends_with_special(text: str, tokenizer: Any) -> bool:
    stripped = text.rstrip()
    return any(stripped.endswith(tok) for tok in tokenizer.all_special_tokens if tok)


def render_segments(
    messages: list[Message], tokenizer: Any, train_on_inputs: bool, renderer: Any = None
) -> list[Segment]:
    """Split the rendered conversation into prompt and response segments.

    Every assistant turn is a trained segment that ends with the end-of-turn token (the
    tokenizer's EOS is appended where the template adds no special token), so the
    model learns to stop. With ``train_on_inputs`` every segment is trained.
    """
    renderer = renderer or tokenizer  # a multimodal processor renders its own conversations
    if getattr(renderer, "chat_template", None) is None:
        raise TemplateError("the tokenizer has no chat template")
    segments: list[Segment] = []
    done = ""  # rendered text covered by segments so far
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, renderer, messages[:k], generation_prompt=True)
        through = _render(tokenizer, renderer, messages[: k + 1], generation_prompt=False)
        if not prompt.startswith(done) or not through.startswith(prompt):
            raise TemplateError(
                f"rendering turn {k + 1} changes the text before it, so the response "
                "cannot be located"
            )
        response = through[len(prompt) :]
        if not _ends_with_special(response, tokenizer) and tokenizer.eos_token:
            response += tokenizer.eos_token
        segments.append(Segment(prompt[len(done) :], train_on_inputs))
        segments.append(Segment(response, True))
        done = through
    whole = _render(tokenizer, renderer, messages, generation_prompt=False)
    if not whole.startswith(done):
        raise TemplateError("the rendered conversation does not continue its turns")
    segments.append(Segment(whole[len(done) :], train_on_inputs))
    return [s for s in segments if s.text]


def sample_segments(sample: Sample, tokenizer: Any, train_on_inputs: bool) -> list[Segment]:
    """Segments of a conversation (via the chat template) or of plain text."""
    if not isinstance(sample, TextSample):
        return render_segments(sample, tokenizer, train_on_inputs)
    segments = [Segment(text, trained or train_on_inputs) for text, trained in sample.parts]
    if sample.eos and tokenizer.eos_token:
        segments.append(Segment(tokenizer.eos_token, True))
    return [s for s in segments if s.text]


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS token in front of plain text by itself."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def tokenize_segments(segments: list[Segment], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids and labels (``IGNORE_INDEX`` where no loss is taken); never a double BOS."""
    input_ids: list[int] = []
    labels: list[int] = []
    text = "".join(s.text for s in segments)
    if adds_bos(tokenizer) and not text.startswith(tokenizer.bos_token):
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for segment in segments:
        ids = tokenizer(segment.text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if segment.trained else [IGNORE_INDEX] * len(ids)
    return input_ids, labels
