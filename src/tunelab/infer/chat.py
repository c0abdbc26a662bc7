"""`tunelab chat`: a conversation in the terminal, streamed token by token.

Lines starting with ``/`` are commands (``/help`` lists them); anything else is the
user's next message. With ``compare`` each turn is answered by the base model and by
the trained one, each keeping its own history.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from tunelab.infer.load import Loaded
from tunelab.model.generate import Sampling, context_limit, encode, reply

HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (and start over); /system alone removes it
  /quit, /exit    leave (Ctrl-D too)
  /help           this list
Ctrl-C stops an answer (and forgets that turn)."""


@dataclass
class Chat:
    """One conversation per model label, sharing a system prompt."""

    loaded: Loaded
    labels: list[str]
    sampling: Sampling = Sampling()
    system: str | None = None
    out: TextIO = field(default_factory=lambda: sys.stdout)  # the stdout of the time of use
    history: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.history = {label: [] for label in self.labels}

    def messages(self, label: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history[label]

    def _fit(self, label: str, model: Any) -> None:
        """Drop the oldest exchanges until prompt and answer fit the model's context."""
        limit = context_limit(model)
        if not limit:
            return
        tokenizer = self.loaded.tokenizer
        while len(self.history[label]) > 1:
            length = encode(tokenizer, self.messages(label))["input_ids"].shape[1]
            if length + self.sampling.max_new_tokens <= limit:
                return
            del self.history[label][:2]
            print("(the conversation is longer than the model's context: dropped the oldest "
                  "exchange)", file=self.out)  # fmt: skip

    def ask(self, text: str) -> dict[str, str]:
        """Answer ``text`` with every model, streaming each answer; returns label -> answer.

        Ctrl-C during an answer stops it and forgets the whole turn, for every model.
        """
        answers = {}
        before = {label: len(turns) for label, turns in self.history.items()}
        try:
            for label in self.labels:
                answers[label] = self._answer(label, text)
        except KeyboardInterrupt:
            for label, length in before.items():
                del self.history[label][length:]
            raise
        return answers

    def _answer(self, label: str, text: str) -> str:
        self.history[label].append({"role": "user", "content": text})
        with self.loaded.use(label) as model:
            self._fit(label, model)
            if len(self.labels) > 1:
                print(f"[{label}]", file=self.out, flush=True)
            streamer = _streamer(self.loaded.tokenizer, self.out)
            answer = reply(model, self.loaded.tokenizer, self.messages(label), self.sampling,
                           streamer)  # fmt: skip
        self.history[label].append({"role": "assistant", "content": answer})
        return answer

    def command(self, line: str) -> bool:
        """Carry out a ``/`` command; False when the user asked to leave."""
        name, _, rest = line.strip().partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.reset()
            print("(conversation cleared)", file=self.out)
        elif name == "/system":
            self.system = rest.strip() or None
            self.reset()
            print(f"(system prompt {'set' if self.system else 'removed'}; conversation cleared)",
                  file=self.out)  # fmt: skip
        else:
            print(HELP if name == "/help" else f"unknown command {name}\n{HELP}", file=self.out)
        return True


def _streamer(tokenizer: Any, out: TextIO) -> Any:
    """transformers' TextStreamer (which decodes token by token), writing to ``out``."""
    from transformers import TextStreamer

    class ToOut(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return ToOut(tokenizer, skip_prompt=True, skip_special_tokens=True)


def run_chat(chat: Chat, lines: Iterable[str] | None = None, prompt: Callable = input) -> None:
    """Read messages until /quit or end of input: from ``lines`` (each echoed after ``> ``,
    so the output reads as a transcript), else with ``prompt``."""
    source = iter(lines) if lines is not None else None
    while True:
        try:
            line = next(source) if source is not None else prompt("you> ")
        except (EOFError, StopIteration, KeyboardInterrupt):
            print(file=chat.out)
            return
        line = line.strip()
        if not line:
            continue
        if source is not None:
            print(f"> {line}", file=chat.out, flush=True)
        if line.startswith("/"):
            if not chat.command(line):
                return
            continue
        try:
            chat.ask(line)
        except KeyboardInterrupt:
            print("\n(stopped; that turn is forgotten. /quit leaves)", file=chat.out, flush=True)
