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

from tunelab.infer.generate import Sampling, context_limit, reply
from tunelab.infer.load import Loaded

HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (and start over); /system alone removes it
  /quit, /exit    leave (Ctrl-D too)
  /help           this list"""


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
            ids = tokenizer.apply_chat_template(self.messages(label), add_generation_prompt=True)
            if hasattr(ids, "keys"):  # newer tokenizers return a mapping
                ids = ids["input_ids"]
            if len(ids) + self.sampling.max_new_tokens <= limit:
                return
            del self.history[label][:2]
            print("(the conversation is longer than the model's context: dropped the oldest "
                  "exchange)", file=self.out)  # fmt: skip

    def ask(self, text: str) -> dict[str, str]:
        """Answer ``text`` with every model, streaming each answer; returns label -> answer."""
        answers = {}
        for label in self.labels:
            self.history[label].append({"role": "user", "content": text})
            with self.loaded.use(label) as model:
                self._fit(label, model)
                if len(self.labels) > 1:
                    print(f"[{label}]", file=self.out, flush=True)
                streamer = _streamer(self.loaded.tokenizer, self.out)
                answer = reply(model, self.loaded.tokenizer, self.messages(label),
                               self.sampling, streamer)  # fmt: skip
            self.history[label].append({"role": "assistant", "content": answer})
            answers[label] = answer
        return answers

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
    """Read messages until /quit or end of input: from ``lines``, else with ``prompt``."""
    source = iter(lines) if lines is not None else None
    while True:
        try:
            line = next(source) if source is not None else prompt("you> ")
        except (EOFError, StopIteration):
            print(file=chat.out)
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line):
                return
            continue
        chat.ask(line)
