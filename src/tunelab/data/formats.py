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
from dataclasses import dataclass, field, replace
from typing import Any

Message = dict[str, str]


@dataclass(frozen=True)
class TextSample:
    """Plain text in parts; each part is trained or not (completion prompts are not)."""

    parts: tuple[tuple[str, bool], ...]
    eos: bool = True  # end with the EOS token (complete documents); raw chunks do not


@dataclass(frozen=True)
class VisionSample:
    """A conversation whose turns show images (paths, in order of their placeholders)."""

    messages: list[dict[str, Any]]
    images: tuple[str, ...]
    column: str = field(default="image", compare=False)  # the row's key naming the images


@dataclass(frozen=True)
class TurnRules:
    """What a conversation of ``type: chat_template`` trains, as axolotl does: the content of
    turns whose role is in ``roles``, and the end-of-turn / EOS token after a turn by its
    rule: 'turn' (after trained turns), 'all', 'last' (after the last turn looked at), 'none'."""

    roles: tuple[str, ...] = ("assistant",)
    eos: str = "turn"
    eot: str = "turn"


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
    thinking: str | None = None  # turn key holding reasoning text, passed to the template
    thinking_key: str = "reasoning_content"  # the message key the template reads it from
    images: str = "images"  # image file paths, in the order of the turns' image parts


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


def response_field(row: dict[str, Any], key: str) -> str:
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


def _with_tools(messages: list[dict[str, Any]], tools: Any) -> list[dict[str, Any]]:
    """Tool definitions go into the system message, where every chat template shows them."""
    text = _tools_text(tools) if tools else ""
    if not text or text in ("[]", "{}"):
        return messages
    note = f"You can call these tools:\n{text}"
    if messages and messages[0]["role"] == "system":
        system = messages[0]["content"]
        if isinstance(system, list):  # content parts: the note is one more text part
            content: Any = [*system, {"type": "text", "text": f"\n\n{note}"}]
        else:
            content = f"{system}\n\n{note}"
        return [{**messages[0], "content": content}, *messages[1:]]
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


AUDIO_PARTS = ("audio", "input_audio")
IMAGE_FILE_KEYS = ("image", "path", "url")  # where an image part may name its own file


def _image_file(part: dict[str, Any], key: str, place: str) -> str | None:
    """The local file an image part names itself, or None (it takes the next of ``images``)."""
    for name in IMAGE_FILE_KEYS:
        value = part.get(name)
        if value is None:
            continue
        where = f"{place}image part's '{name}'"
        if not isinstance(value, str) or not value.strip():
            raise RowError(
                key,
                f"{where} must be an image file path, found {_kind(value)}; images held inside "
                "the data are not supported yet: save them as files and give their paths",
            )
        if value.startswith(("http://", "https://")):
            raise RowError(key, f"{where} is a web address; images are read from local files only")
        if value.startswith("data:"):
            raise RowError(key, f"{where} is inline data; save the image as a file, give its path")
        return value.removeprefix("file://")
    return None


def _parts(parts: list[Any], key: str, place: str) -> list[dict[str, Any]]:
    """OpenAI / Hugging Face content parts, checked: ``{type: text, text}`` and
    ``{type: image}``; an image part keeps the file it names under '_file'."""
    out: list[dict[str, Any]] = []
    for part in parts:
        kind = part.get("type", "text") if isinstance(part, dict) else None
        if kind == "text":
            text = checked_text(part.get("text"), key, f"{place}text part ")
            out.append({"type": "text", "text": text})
        elif kind == "image":
            out.append({"type": "image", "_file": _image_file(part, key, place)})
        elif kind in AUDIO_PARTS:
            raise RowError(key, f"{place}holds an '{kind}' part: audio parts are not supported yet")
        else:
            found = f"a '{kind}' part" if isinstance(kind, str) else f"a part that is {_kind(part)}"
            raise RowError(
                key,
                f"{place}holds {found}; only text parts ({{type: text, text}}) and image parts "
                "({type: image}) can be used",
            )
    return out


def _text_of(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p["type"] == "text")


def _content(item: dict[str, Any], mapping: Mapping, turn: int) -> str | list[dict[str, Any]]:
    """A turn's text, or its content parts when it is a list of them."""
    value = item.get(mapping.content)
    place = f"of turn {turn} "
    if isinstance(value, list):  # OpenAI content parts
        content: str | list[dict[str, Any]] = _parts(value, mapping.content, place)
    else:
        content = checked_text("" if value is None else value, mapping.content, place)
    calls = item.get("tool_calls")
    if calls:
        call_text = ("\n" if _text_of(content).strip() else "") + _call_text(calls)
        if isinstance(content, list):
            content = [*content, {"type": "text", "text": call_text}]
        else:
            content += call_text
    return content


def _image_paths(row: dict[str, Any], key: str) -> list[str]:
    """The row's ``images`` column: a path or a list of paths (absent or null: none)."""
    value = row.get(key)
    if value is None:
        return []
    paths = value if isinstance(value, list) else [value]
    for n, path in enumerate(paths, start=1):
        if not isinstance(path, str) or not path.strip():
            raise RowError(
                key,
                f"item {n} must be an image file path, found {_kind(path)}; images held inside "
                "the data are not supported yet: save them as files and list their paths",
            )
    return paths


def _vision_sample(
    messages: list[dict[str, Any]], listed: list[str], key: str, content_key: str
) -> VisionSample:
    """A conversation with image parts as a :class:`VisionSample`: every turn's content as
    parts (the form image-text chat templates read), image parts bare, and the image files in
    order: the one a part names itself, else the next of the ``images`` column."""
    files: list[str] = []
    unnamed = 0
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}] if content else []
        parts = []
        for part in content:
            if part["type"] == "image":
                named = part.get("_file")
                if named is None:
                    named = listed[unnamed] if unnamed < len(listed) else None
                    unnamed += 1
                files.append(named)
                part = {"type": "image"}
            parts.append(part)
        out.append({**message, "content": parts})
    if unnamed != len(listed):
        raise RowError(
            key,
            f"holds {len(listed)} image path{'s' * (len(listed) != 1)} for {unnamed} image "
            f"part{'s' * (unnamed != 1)} ({{type: image}}) in '{content_key}' that name no file; "
            "give one path for each, in order",
        )
    return VisionSample(out, tuple(files), key)


def conversation_to_messages(row: dict[str, Any], mapping: Mapping) -> list[Message] | VisionSample:
    """A list of turns (ShareGPT ``from``/``value``, OpenAI ``role``/``content``, or mapped).

    Turns whose content parts show images (``{type: image}``, their files in the ``images``
    column or named in the part) make a :class:`VisionSample`; otherwise parts are joined
    into text."""
    turns = row.get(mapping.messages)
    if not isinstance(turns, list) or not turns:
        raise RowError(mapping.messages, "must be a non-empty list of turns")
    first = turns[0] if isinstance(turns[0], dict) else {}
    if mapping.role not in first:  # the other common layout under the same column name
        for other in (SHAREGPT, OPENAI):
            if other.role in first and other.content in first:
                mapping = replace(mapping, role=other.role, content=other.content)
    names = {**ROLE_NAMES, **mapping.roles}
    messages: list[dict[str, Any]] = []
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
        if role == "assistant" and not _text_of(content).strip():
            raise RowError(mapping.content, "of an assistant turn is empty")
        message = {"role": role, "content": content}
        if mapping.thinking and turn.get(mapping.thinking) is not None:
            message[mapping.thinking_key] = checked_text(
                turn[mapping.thinking], mapping.thinking, f"of turn {number} "
            )
        messages.append(message)
    messages = _with_tools(messages, row.get(mapping.tools))
    listed = _image_paths(row, mapping.images)
    shown = any(
        isinstance(m["content"], list) and any(p["type"] == "image" for p in m["content"])
        for m in messages
    )
    if shown or listed:
        sample = _vision_sample(messages, listed, mapping.images, mapping.content)
        check_turns(sample.messages, mapping.messages)
        return sample
    for message in messages:
        message["content"] = _text_of(message["content"])
    return check_turns(messages, mapping.messages)


def alpaca_to_messages(row: dict[str, Any]) -> list[Message]:
    """``instruction`` (+ ``input``) -> user, ``output`` -> assistant.

    Optional ``system`` becomes the system message and ``history`` (a list of
    ``[instruction, response]`` pairs) becomes earlier turns.
    """
    instruction = text_field(row, "instruction", required=True)
    extra = text_field(row, "input", required=False)
    output = response_field(row, "output")
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
        {"role": "assistant", "content": response_field(row, "answer")},
    ]


def completion_to_text(row: dict[str, Any]) -> TextSample:
    """``prompt`` (not trained) followed directly by ``completion`` (trained)."""
    return TextSample(
        ((text_field(row, "prompt", True), False), (response_field(row, "completion"), True))
    )


def text_to_text(row: dict[str, Any], column: str = "text") -> TextSample:
    """A ``text`` column (or another ``column``): the whole text is trained."""
    return TextSample(((response_field(row, column), True),))


def vision_row(row: dict[str, Any]) -> VisionSample:
    """``image`` (a path, or a list of paths) + ``caption``; an optional ``prompt`` asks for it.
    Both turns' content is given as parts, the form image-text chat templates read (some, like
    SmolVLM's, render nothing of a plain string)."""
    images = row.get("image")
    paths = images if isinstance(images, list) else [images]
    if not paths or not all(isinstance(p, str) and p.strip() for p in paths):
        raise RowError("image", "must be an image file path (or a list of them)")
    prompt = text_field(row, "prompt", required=False) or "Describe the image."
    content = [{"type": "image"} for _ in paths] + [{"type": "text", "text": prompt}]
    caption = [{"type": "text", "text": response_field(row, "caption")}]
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": caption}]
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
