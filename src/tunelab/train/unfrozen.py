"""unfrozen_parameters: train only the parameters whose names match, as axolotl does.

A pattern is a regular expression matched from the start of a parameter's name, in which a
'.' not followed by '+' is a literal dot (axolotl's rule). With an adapter the names are
the base model's, so only the adapter weights inside matching modules stay trainable.
"""

from __future__ import annotations

import re
from typing import Any

# axolotl's "name[start:end]": train only those rows of a parameter
_RANGE = re.compile(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$")
# peft's parts of a parameter's name: "q_proj.lora_A.default.weight" is in q_proj's "weight"
_PEFT_PART = re.compile(r"\.(lora_[A-Za-z_]+|modules_to_save)\.[^.]+")
_PEFT_PREFIX = "base_model.model."


def name_pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\.(?!\+)", r"\\.", pattern))


def base_name(name: str) -> str:
    """The base model's name for a parameter of a peft model (unchanged for others)."""
    return _PEFT_PART.sub("", name.removeprefix(_PEFT_PREFIX))


def pattern_problems(patterns: list[str]) -> list[str]:
    """What is wrong with each pattern: a row range (not supported yet), or not a regular
    expression."""
    problems = []
    for i, pattern in enumerate(patterns):
        where = f"unfrozen_parameters.{i}: '{pattern}'"
        if _RANGE.match(pattern):
            problems.append(
                f"{where}: a row range like [:32000] (training part of a parameter) is not "
                "supported yet; give the pattern without it to train the whole parameter"
            )
            continue
        try:
            name_pattern(pattern)
        except re.error as exc:
            problems.append(f"{where} is not a regular expression: {exc}")
    return problems


def example_name(names: list[str]) -> str:
    """A parameter name to show how ``names`` are written (one of the first layer's)."""
    return next((n for n in names if ".0." in n), names[0] if names else "")


def unmatched_patterns(patterns: list[str], names: list[str]) -> list[str]:
    """A line for each pattern (valid ones only) that matches none of ``names`` (the base
    model's parameter names)."""
    return [
        f"unfrozen_parameters.{i}: '{pattern}' matches no parameter of the model (matched "
        f"from the start of the name, like '{example_name(names)}')"
        for i, pattern in enumerate(patterns)
        if not any(name_pattern(pattern).match(name) for name in names)
    ]


def parameter_names_and(model: Any) -> list[tuple[str, Any]]:
    """(name, parameter) for every name of every parameter, a tied output head's included."""
    return list(model.named_parameters(remove_duplicate=False))


def parameter_names(model: Any) -> list[str]:
    return [name for name, _ in parameter_names_and(model)]


def train_only(model: Any, patterns: list[str], adapter: bool) -> None:
    """Freeze every parameter whose name matches none of ``patterns``; with an ``adapter``,
    freeze only adapter weights (the base is frozen already), judged by the base's names."""
    regexes = [name_pattern(p) for p in patterns]
    named = [(base_name(n) if adapter else n, p) for n, p in parameter_names_and(model)]
    keep = {id(p) for name, p in named if any(r.match(name) for r in regexes)}
    for param in model.parameters():
        if adapter and not param.requires_grad:
            continue
        param.requires_grad = id(param) in keep
