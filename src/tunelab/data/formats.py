"""Input formats: each is a pure function from one row to a sample.

A sample is either a conversation (a list of messages with roles system, user,
assistant and tool) or a :class:`TextSample` for plain text. Nothing after this module
knows which format a row came in. ``auto`` picks a format from a file's columns, trying
the entries of :data:`FORMATS` in order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]


@dataclass(frozen=True)
class TextSample:
    """Plain text in parts; each part is trained or not (completion prompts are not)."""

    parts: tuple[tuple[str, bool], ...]
    eos: bool = True  # end with the EOS token (complete documents); raw chunks do not


@dataclass(frozen=True)
class VisionSample:
    """A conversation whose user turn shows images (paths, in order of their placeholders)."""

    messages: list[dict[str, Any]]
    images: tuple[str, ...]


Sample = list[Message] | TextSample | VisionSample


class RowError(ValueError):
    """A row that does not fit its format; ``key`` names the field at fault."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"'{key}' {problem}")
        self.key = key


@dataclass(frozen=True)
class Mapping:
    """How a conversation column is laid out (ShareGPT, OpenAI or a user's own names)."""

    messages: str = "conversations"
    role: str = "from"
    content: str = "value"
    system: str = "system"
    tools: str = "tools"
    roles: dict[str, str] = field(default_factory=dict)  # extra role names -> ours


ROLE_NAMES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "function_call": "function_call",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
}

SHAREGPT = Mapping()
OPENAI = Mapping(messages="messages", role="role", content="content")


def _kind(value: Any) -> str:
    """What a value that should be text is, in the words of the JSON it likely came from."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, float) and math.isnan(value):
        return "a number (NaN)"
    if isinstance(value, float) and math.isinf(value):
        return f"a number ({'-' if value < 0 else ''}Infinity)"
    if isinstance(value, (int, float)):
        return "a number"  # the value itself is left out so one problem reads as one line
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def checked_text(value: Any, key: str, place: str = "") -> str:
    """``value`` if it is text a tokenizer can take; else a :class:`RowError` naming ``key``
    (``place`` says where under it, e.g. 'of turn 2 ')."""
    if not isinstance(value, str):
        raise RowError(key, f"{place}must be text, found {_kind(value)}; write it as a string")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate, from a "\ud800" escape in JSON
            bad = f"\\u{ord(value[exc.start]):04x}"
            raise RowError(
                key, f"{place}holds {bad}, half of a UTF-16 surrogate pair, which is not text"
            ) from None
    return value


def text_field(row: dict[str, Any], key: str, required: bool) -> str:
    """The text under ``key``. Absent or null is an error when ``required`` and empty text
    otherwise; anything but text (numbers, NaN, booleans, lists) is an error."""
    value = row.get(key)
    if value is None or (value == "" and not required):
        if required:
            raise RowError(key, "is missing")
        return ""
    return checked_text(value, key)


def _response(row: dict[str, Any], key: str) -> str:
    text = text_field(row, key, required=True)
    if not text.strip():
        raise RowError(key, "is empty: there is no response to train on")
    return text


def check_turns(messages: list[Message], key: str) -> list[Message]:
    """Roles must alternate: [system] user assistant (user assistant)...; a tool result
    follows an assistant tool call and precedes an assistant turn; it ends with the assistant."""
    allowed = {
        None: {"system", "user"},
        "system": {"user"},
        "user": {"assistant"},
        "assistant": {"user", "tool"},
        "tool": {"assistant", "tool"},
    }
    previous = None
    for i, m in enumerate(messages, start=1):
        if m["role"] not in allowed[previous]:
            after = f"after '{previous}'" if previous else "at the start"
            raise RowError(key, f"turn {i} is '{m['role']}' {after}: roles must alternate")
        previous = m["role"]
    if previous != "assistant":
        raise RowError(key, "must end with an assistant turn (nothing to train on otherwise)")
    return messages


def _tools_text(tools: Any) -> str:
    if isinstance(tools, str):
        return checked_text(tools, "tools").strip()
    if not isinstance(tools, (list, dict)):
        raise RowError(
            "tools", f"must be a list of tool definitions (or its JSON text), found {_kind(tools)}"
        )
    return json.dumps(tools, ensure_ascii=False)


def _with_tools(messages: list[Message], tools: Any) -> list[Message]:
    """Tool definitions go into the system message, where every chat template shows them."""
    text = _tools_text(tools) if tools else ""
    if not text or text in ("[]", "{}"):
        return messages
    note = f"You can call these tools:\n{text}"
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{note}"}, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


def _call_text(calls: list[Any]) -> str:
    out = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or "name" not in fn:
            raise RowError("tool_calls", "each call needs a function name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        out.append(json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False))
    return "\n".join(out)


def _parts_text(parts: list[Any], key: str, place: str) -> str:
    """OpenAI content parts joined; only text parts can be trained on in a conversation."""
    texts = []
    for part in parts:
        kind = part.get("type", "text") if isinstance(part, dict) else None
        if kind != "text":
            found = f"a '{kind}' part" if isinstance(kind, str) else f"a part that is {_kind(part)}"
            raise RowError(
                key, f"{place}holds {found}; only text parts ({{type: text, text}}) can be used"
            )
        texts.append(checked_text(part.get("text"), key, f"{place}text part "))
    return "".join(texts)


def _content(item: dict[str, Any], mapping: Mapping, turn: int) -> str:
    value = item.get(mapping.content)
    place = f"of turn {turn} "
    if isinstance(value, list):  # OpenAI content parts
        value = _parts_text(value, mapping.content, place)
    value = checked_text("" if value is None else value, mapping.content, place)
    calls = item.get("tool_calls")
    if calls:
        value = (value + "\n" if value.strip() else "") + _call_text(calls)
    return value


def conversation_to_messages(row: dict[str, Any], mapping: Mapping) -> list[Message]:
    """A list of turns (ShareGPT ``from``/``value``, OpenAI ``role``/``content``, or mapped)."""
    turns = row.get(mapping.messages)
    if not isinstance(turns, list) or not turns:
        raise RowError(mapping.messages, "must be a non-empty list of turns")
    first = turns[0] if isinstance(turns[0], dict) else {}
    if mapping.role not in first:  # the other common layout under the same column name
        for other in (SHAREGPT, OPENAI):
            if other.role in first and other.content in first:
                mapping = Mapping(mapping.messages, other.role, other.content, mapping.system,
                                  mapping.tools, mapping.roles)  # fmt: skip
    names = {**ROLE_NAMES, **mapping.roles}
    messages: list[Message] = []
    system = text_field(row, mapping.system, required=False)
    if system.strip():
        messages.append({"role": "system", "content": system})
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise RowError(mapping.messages, "must be a list of objects")
        raw_role = turn.get(mapping.role)
        role = names.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise RowError(
                mapping.role, f"has an unknown role {raw_role!r}; known: {sorted(names)}"
            )
        content = _content(turn, mapping, number)
        if role == "function_call":  # an assistant turn that calls a tool
            role = "assistant"
        if role == "assistant" and not content.strip():
            raise RowError(mapping.content, "of an assistant turn is empty")
        messages.append({"role": role, "content": content})
    return check_turns(_with_tools(messages, row.get(mapping.tools)), mapping.messages)


def alpaca_to_messages(row: dict[str, Any]) -> list[Message]:
    """``instruction`` (+ ``input``) -> user, ``output`` -> assistant.

    Optional ``system`` becomes the system message and ``history`` (a list of
    ``[instruction, response]`` pairs) becomes earlier turns.
    """
    instruction = text_field(row, "instruction", required=True)
    extra = text_field(row, "input", required=False)
    output = _response(row, "output")
    if not instruction.strip() and not extra.strip():
        raise RowError("instruction", "is empty")
    messages: list[Message] = []
    system = text_field(row, "system", required=False)
    if system.strip():
        messages.append({"role": "system", "content": system})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise RowError("history", "must be a list of [instruction, response] pairs")
    for number, turn in enumerate(history, start=1):
        if not (isinstance(turn, list) and len(turn) == 2):
            raise RowError("history", "must be a list of [instruction, response] pairs")
        asked, answered = (checked_text(t, "history", f"pair {number}: ") for t in turn)
        messages += [
            {"role": "user", "content": asked},
            {"role": "assistant", "content": answered},
        ]
    prompt = "\n\n".join(p for p in (instruction, extra) if p.strip())
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return messages


def qa_to_messages(row: dict[str, Any]) -> list[Message]:
    """``question`` (after ``context`` if given) -> user, ``answer`` -> assistant."""
    question = text_field(row, "question", required=True)
    context = text_field(row, "context", required=False)
    prompt = f"{context}\n\n{question}" if context.strip() else question
    return [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": _response(row, "answer")},
    ]


def completion_to_text(row: dict[str, Any]) -> TextSample:
    """``prompt`` (not trained) followed directly by ``completion`` (trained)."""
    return TextSample(
        ((text_field(row, "prompt", True), False), (_response(row, "completion"), True))
    )


def text_to_text(row: dict[str, Any]) -> TextSample:
    """A ``text`` column: the whole text is trained."""
    return TextSample(((_response(row, "text"), True),))


def vision_row(row: dict[str, Any]) -> VisionSample:
    """``image`` (a path, or a list of paths) + ``caption``; an optional ``prompt`` asks for it."""
    images = row.get("image")
    paths = images if isinstance(images, list) else [images]
    if not paths or not all(isinstance(p, str) and p.strip() for p in paths):
        raise RowError("image", "must be an image file path (or a list of them)")
    prompt = text_field(row, "prompt", required=False) or "Describe the image."
    content = [{"type": "image"} for _ in paths] + [{"type": "text", "text": prompt}]
    messages = [
        {"role": "user", "content": content},
        {"role": "assistant", "content": _response(row, "caption")},
    ]
    return VisionSample(messages, tuple(paths))


@dataclass(frozen=True)
class Format:
    """A named format: the columns that identify it and its row converter."""

    name: str
    required: tuple[str, ...]
    convert: Callable[[dict[str, Any]], Sample]
    description: str


# Detection order for ``type: auto``: the first format whose required columns are all
# present in a file wins.
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("openai", ("messages",), lambda r: conversation_to_messages(r, OPENAI),
               "messages: [{role, content}], tool_calls and tool turns"),
        Format("sharegpt", ("conversations",), lambda r: conversation_to_messages(r, SHAREGPT),
               "conversations: [{from, value}], human/gpt/system/function_call/observation"),
        Format("alpaca", ("instruction", "output"), alpaca_to_messages,
               "instruction, input, output (+ system, history)"),
        Format("qa", ("question", "answer"), qa_to_messages, "question, answer (+ context)"),
        Format("completion", ("prompt", "completion"), completion_to_text,
               "prompt (not trained), completion (trained)"),
        Format("vision", ("image", "caption"), vision_row,
               "image, caption (+ prompt); needs a multimodal base model"),
        Format("text", ("text",), text_to_text, "text: the whole text is trained"),
    )
}  # fmt: skip


def detect_format(columns: Iterable[str]) -> Format | None:
    """The first format (in :data:`FORMATS` order) whose required columns are present."""
    present = set(columns)
    for fmt in FORMATS.values():
        if set(fmt.required) <= present:
            return fmt
    return None


def describe_formats() -> str:
    return "; ".join(f"{f.name} ({', '.join(f.required)})" for f in FORMATS.values())
