"""The template form, built from the config schema: each key of ``TuneConfig`` a field with
its description as help, its choices as a select, the settings most runs change shown and
the rest folded away; and the way back, from the submitted form to a config mapping."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic.fields import FieldInfo

from tunelab.config.schema import (
    AdapterSection,
    DataSection,
    DatasetSource,
    ModelSection,
    OutputSection,
    TrackingSection,
    TrainingSection,
    TuneConfig,
)
from tunelab.errors import ConfigError

# The settings most runs set, shown open; the rest of each section sits under "Advanced".
BASIC = (
    "base_model", "adapter", "lora_r", "lora_alpha", "num_epochs", "max_steps",
    "learning_rate", "lr_scheduler", "micro_batch_size", "gradient_accumulation_steps",
    "mode", "sequence_len", "val_set_size", "seed",
)  # fmt: skip
SECTIONS = (
    ("Model", ModelSection),
    ("Adapter", AdapterSection),
    ("Training", TrainingSection),
    ("Tracking", TrackingSection),
    ("Output", OutputSection),
)
DATA_FIELDS = ("path", "type", "data_template", "format_file")  # the data tab's own
NOT_IN_FORM = {"datasets", "pretraining_dataset", "output_dir"}  # no field of their own
OTHER = "other_keys"  # any key the form has no field for, kept as YAML
DATA_MORE = "ds.more"  # the first dataset's other keys
DATA_REST = "ds.rest"  # datasets after the first


@dataclass
class Field:
    name: str  # the form's name: the config key, or ds.KEY for the first dataset's
    label: str
    help: str
    widget: Literal["select", "text", "textarea"]
    choices: list[str]
    value: str
    default: str
    basic: bool


def _args(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _choices(annotation: Any) -> list[str]:
    """The values a select offers: a Literal's, booleans'; none for free values."""
    values: list[str] = []
    for arg in _args(annotation):
        if typing.get_origin(arg) is Literal:
            values += [_shown(v) for v in typing.get_args(arg)]
        elif arg is bool:
            values += ["true", "false"]
        else:
            return []
    return values


def _is_text(annotation: Any) -> bool:
    return _args(annotation) == [str]


def _shown(value: Any) -> str:
    """A value as the form shows it; what :func:`_parsed` reads back."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1000).strip()


def _default(info: FieldInfo) -> str:
    return "" if info.is_required() else _shown(info.get_default(call_default_factory=True))


def _field(name: str, key: str, info: FieldInfo, value: Any, basic: bool) -> Field:
    choices = _choices(info.annotation)
    complex_value = not choices and not _is_text(info.annotation) and not _scalar(info)
    long_text = key in ("data_template", "chat_template_jinja", "default_system_message")
    widget = "select" if choices else "textarea" if complex_value or long_text else "text"
    return Field(name, key, info.description or "", widget, choices, _shown(value),
                 _default(info), basic)  # fmt: skip


def _scalar(info: FieldInfo) -> bool:
    return all(a in (int, float, str, bool) or typing.get_origin(a) is Literal
               for a in _args(info.annotation))  # fmt: skip


def form_sections(config: dict[str, Any]) -> list[tuple[str, list[Field]]]:
    """The form's sections of ordinary keys, filled from ``config`` (a template's given
    keys): a key not given shows empty, its default as the placeholder."""
    sections = []
    for title, model in SECTIONS:
        fields = [_field(key, key, info, config.get(key), key in BASIC)
                  for key, info in model.model_fields.items()
                  if key not in NOT_IN_FORM]  # fmt: skip
        sections.append((title, fields))
    return sections


def data_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The data tab: the first dataset's main keys, its other keys and the datasets after it
    as YAML, and the data section's keys."""
    sources = config.get("datasets") or [{}]
    first = dict(sources[0]) if isinstance(sources[0], dict) else {"path": sources[0]}
    main = [_field(f"ds.{key}", key, DatasetSource.model_fields[key], first.pop(key, None), True)
            for key in DATA_FIELDS]  # fmt: skip
    section = [_field(key, key, info, config.get(key), key in BASIC)
               for key, info in DataSection.model_fields.items()
               if key not in NOT_IN_FORM]  # fmt: skip
    return {
        "main": main,
        "more": _yaml(first),
        "rest": _yaml(sources[1:]),
        "section": section,
    }


def other_keys(config: dict[str, Any]) -> str:
    """Keys of ``config`` the form has no field for (kept, never dropped)."""
    known = set(TuneConfig.model_fields) - {"output_dir", "pretraining_dataset"}
    return _yaml({k: v for k, v in config.items() if k not in known})


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, sort_keys=False, width=1000) if value else ""


def _parsed(key: str, info: FieldInfo, text: str) -> Any:
    if _is_text(info.annotation):
        return text
    if _choices(info.annotation):
        return {"true": True, "false": False}.get(text, text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{key}: not a value tunelab can read ({_first_line(exc)})"]) from None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0]


def _yaml_field(label: str, text: str, kind: type) -> Any:
    if not text.strip():
        return kind()
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{label}: not YAML tunelab can read ({_first_line(exc)})"]) from None
    if not isinstance(value, kind):
        raise ConfigError([f"{label}: must be a YAML {kind.__name__}"])
    return value


def config_from_form(form: dict[str, str]) -> dict[str, Any]:
    """The config a submitted form describes: only the keys given a value."""
    config: dict[str, Any] = _yaml_field("other keys", form.get(OTHER, ""), dict)
    problems = []
    for key, info in TuneConfig.model_fields.items():
        text = (form.get(key) or "").strip()
        if key in NOT_IN_FORM or not text:
            continue
        try:
            config[key] = _parsed(key, info, text)
        except ConfigError as exc:
            problems += exc.problems
    first: dict[str, Any] = _yaml_field("more dataset settings", form.get(DATA_MORE, ""), dict)
    for key in DATA_FIELDS:
        text = (form.get(f"ds.{key}") or "").strip()
        if text and not (key == "type" and text == "auto"):
            first[key] = _parsed(f"datasets.0.{key}", DatasetSource.model_fields[key], text)
    rest = _yaml_field("more datasets", form.get(DATA_REST, ""), list)
    if not all(isinstance(entry, dict) for entry in rest):
        problems.append("more datasets: each entry must be a mapping, e.g. - path: more.json")
    if problems:
        raise ConfigError(problems)
    if first or rest:
        config["datasets"] = ([first] if first else []) + rest
    return config


def preview_config(config: dict[str, Any]) -> dict[str, Any]:
    """What of ``config`` decides how its data is rendered and masked: the model's keys (its
    tokenizer, special tokens) and the data section's, the datasets' included. Nothing a
    preview would write (a prepared-data cache) or need from the rest (training)."""
    keep = (set(ModelSection.model_fields) | set(DataSection.model_fields)) - {
        "dataset_prepared_path"}  # fmt: skip
    return {k: v for k, v in config.items() if k in keep}
