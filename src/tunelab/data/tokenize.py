"""Messages -> tokens and labels: the one place where rendering and loss masking happen.

A conversation is rendered with the tokenizer's chat template into segments, each
marked trained or not. Response segments are found by rendering growing prefixes of
the conversation, so this works for templates that have no generation markers.
``type: chat_template`` samples are masked as axolotl masks them instead: the content of
chosen roles' turns and the end-of-turn tokens after them (:func:`turn_segments`). Each
segment is tokenized on its own and the ids concatenated, so the segments' texts joined
are exactly the decoded training text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.data.chat_render import render_chat, template_text
from tunelab.data.formats import Message, Sample, TextSample, TurnRules
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
    if messages[-1]["role"] == "assistant" and done:  # rendered whole by the last turn
        whole = done
    else:
        whole = _render(tokenizer, renderer, messages, generation_prompt=False)
    if not whole.startswith(done):
        raise TemplateError("the rendered conversation does not continue its turns")
    segments.append(Segment(whole[len(done) :], train_on_inputs))
    return [s for s in segments if s.text]


# Two placeholders that share no first or last character: a template that glues a character
# onto a turn's content hides it from one of them but not from the other.
_PLACEHOLDERS = ("[[tunelab placeholder]]", "zz tunelab placeholder zz")
_EOT_REACH = 3  # tokens allowed between a turn's content and its end token (as axolotl)


def _common_prefix(a: str, b: str, limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b`` (at most ``limit``); the comparisons
    of whole slices run in C."""
    low, high = 0, limit
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def _turn_span(tokenizer: Any, messages: list[Message], k: int, whole: str) -> tuple[int, int]:
    """Where turn ``k``'s own text (its content, and its reasoning where the template shows
    it) lies in ``whole``: the part that changes when only that turn is replaced by a
    placeholder. The other turns stay where they are, so templates that treat turns by
    position render them the same."""
    start, end = len(whole), 0
    for placeholder in _PLACEHOLDERS:
        stand_in = {"role": messages[k]["role"], "content": placeholder}
        other = _render(tokenizer, tokenizer, [*messages[:k], stand_in, *messages[k + 1 :]], False)
        limit = min(len(whole), len(other))
        head = _common_prefix(whole, other, limit)
        tail = _common_prefix(whole[::-1], other[::-1], limit - head)
        start, end = min(start, head), max(end, len(whole) - tail)
    return start, end


def _end_token(whole: str, after: int, tokens: list[str], tokenizer: Any) -> tuple[int, int]:
    """The first of ``tokens`` in ``whole`` from ``after`` on, if it follows within
    :data:`_EOT_REACH` tokens; else (-1, -1)."""
    found = [(whole.find(t, after), t) for t in tokens if t]
    found = [(at, t) for at, t in found if at >= 0]
    if not found:
        return -1, -1
    at, token = min(found)
    gap = tokenizer(whole[after:at], add_special_tokens=False)["input_ids"] if at > after else []
    return (at, at + len(token)) if len(gap) <= _EOT_REACH else (-1, -1)


def _split_at(whole: str, trained: list[tuple[int, int]]) -> list[Segment]:
    """``whole`` cut into segments, the character spans in ``trained`` trained."""
    segments, done = [], 0
    for start, end in sorted(trained):
        start = max(start, done)
        if end <= start:
            continue
        segments += [Segment(whole[done:start], False), Segment(whole[start:end], True)]
        done = end
    segments.append(Segment(whole[done:], False))
    return [s for s in segments if s.text]


def turn_segments(
    messages: list[Message],
    tokenizer: Any,
    rules: TurnRules,
    train_on_inputs: bool,
    eot_tokens: list[str] | None = None,
) -> list[Segment]:
    """axolotl's ``chat_template`` loss mask over the conversation rendered once.

    Only the content of turns whose role is in ``rules.roles`` (every turn with
    ``train_on_inputs``) is trained, not the template's markup around it. After each turn
    the first end-of-turn token (``eot_tokens``, default the EOS token) and the first EOS
    token that follow within three tokens are trained by ``rules.eot`` and ``rules.eos``:
    'turn' after trained turns, 'all' after every turn, 'last' after the last turn looked
    at (the last trained one, unless another rule is 'all'), 'none' never.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise TemplateError("the tokenizer has no chat template")
    whole = _render(tokenizer, tokenizer, messages, generation_prompt=False)
    eos = tokenizer.eos_token
    ends = {
        "eot": (list(eot_tokens) if eot_tokens is not None else [eos] if eos else [], rules.eot),
        "eos": ([eos] if eos else [], rules.eos),
    }
    trained: list[tuple[int, int]] = []
    last: dict[str, tuple[int, int]] = {}
    for k, message in enumerate(messages):
        train = train_on_inputs or message["role"] in rules.roles
        if not train and "all" not in (rules.eot, rules.eos):
            continue
        start, end = _turn_span(tokenizer, messages, k, whole)
        if end <= start:  # the template does not show this turn
            continue
        if train:
            trained.append((start, end))
        for kind, (tokens, rule) in ends.items():
            span = _end_token(whole, end, tokens, tokenizer)
            if span[0] < 0:
                continue
            last[kind] = span
            if rule == "all" or (rule == "turn" and train):
                trained.append(span)
    trained += [last[kind] for kind, (_, rule) in ends.items() if rule == "last" and kind in last]
    return _split_at(whole, trained)


def end_of_turn_tokens(tokenizer: Any, eot_tokens: list[str] | None) -> tuple[list[str], list[str]]:
    """The end-of-turn tokens ``type: chat_template`` looks for, and notes for the user.

    By default the EOS token. Given tokens that the chat template never writes are left out
    (with a note); one that the tokenizer splits into several tokens is an error, as in axolotl.
    """
    if eot_tokens is None:
        return ([tokenizer.eos_token] if tokenizer.eos_token else []), []
    template = template_text(tokenizer)
    kept, notes = [], []
    for token in eot_tokens:
        if token not in template:
            notes.append(f"eot_tokens: '{token}' does not occur in the chat template; not used")
            continue
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise DataError(
                f"eot_tokens: '{token}' is {len(ids)} tokens to this tokenizer, not one",
                "add it to the vocabulary with the config's tokens: list, or give another token",
            )
        kept.append(token)
    return kept, notes


def sample_segments(
    sample: Sample,
    tokenizer: Any,
    train_on_inputs: bool,
    rules: TurnRules | None = None,
    eot_tokens: list[str] | None = None,
) -> list[Segment]:
    """Segments of a conversation (via the chat template) or of plain text.

    A conversation with ``rules`` (``type: chat_template``) is masked by them, looking for
    ``eot_tokens`` (see :func:`turn_segments`); one without by tunelab's response rule."""
    if rules is not None and isinstance(sample, list):
        return turn_segments(sample, tokenizer, rules, train_on_inputs, eot_tokens)
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
