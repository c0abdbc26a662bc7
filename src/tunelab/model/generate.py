"""Answers from a model: one prompt, or the next turn of a conversation, optionally streamed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.data.chat_render import render_chat


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. ``temperature`` 0 is greedy decoding, and so deterministic."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature <= 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


def prompt_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """A one-question conversation, with an optional system prompt."""
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": prompt}]


def context_limit(model: Any) -> int | None:
    """How many tokens the model attends to, if its config says."""
    config = getattr(model.config, "text_config", model.config)
    return getattr(config, "max_position_embeddings", None)


def encode(tokenizer: Any, messages: list[dict[str, str]]) -> Any:
    """The prompt's token ids (a batch of one, as tensors): the conversation in the chat
    template, ready for the assistant's turn, or for a model without a chat template the
    messages' text, which it continues."""
    if getattr(tokenizer, "chat_template", None):
        # the template's text already holds its special tokens (BOS included, where it has one)
        text = render_chat(tokenizer, messages, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False, return_tensors="pt")
    return tokenizer("\n\n".join(m["content"] for m in messages), return_tensors="pt")


class _StopWhenSet:
    """A stopping criterion: stop every sequence once ``event`` is set (the reader left)."""

    def __init__(self, event: Any) -> None:
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool,
                          device=input_ids.device)  # fmt: skip


@dataclass(frozen=True)
class Completion:
    """An answer and what it took: prompt and answer lengths in tokens, and whether it
    stopped at ``max_new_tokens`` rather than at its end."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    cut_short: bool


def complete(
    model: Any, tokenizer: Any, messages: list[dict[str, str]], sampling: Sampling = Sampling(),
    streamer: Any = None, stop: Any = None,
) -> Completion:  # fmt: skip
    """The model's next assistant turn after ``messages``, rendered with its chat template
    (a model without one continues the messages' text instead).

    ``streamer`` (a transformers streamer) receives the tokens as they are generated;
    ``stop`` (a ``threading.Event``) ends the answer early once it is set.
    """
    import torch

    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    inputs = encode(tokenizer, messages).to(model.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            stopping_criteria=[_StopWhenSet(stop)] if stop is not None else None,
            **sampling.generate_kwargs(),
        )
    if was_training:
        model.train()
    prompt = inputs["input_ids"].shape[1]
    new_tokens = output[0][prompt:]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    ended = tokenizer.eos_token_id is not None and tokenizer.eos_token_id in new_tokens.tolist()
    cut = len(new_tokens) >= sampling.max_new_tokens and not ended
    return Completion(text, prompt, len(new_tokens), cut)


def reply(
    model: Any, tokenizer: Any, messages: list[dict[str, str]], sampling: Sampling = Sampling(),
    streamer: Any = None,
) -> str:  # fmt: skip
    """The text of :func:`complete`'s answer."""
    return complete(model, tokenizer, messages, sampling, streamer).text


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 64,
    system: str | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> str:
    """The model's answer to one ``prompt`` (with an optional system prompt)."""
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    return reply(model, tokenizer, prompt_messages(prompt, system), sampling)
