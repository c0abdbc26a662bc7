"""Turn a config file plus command-line settings into a validated :class:`TuneConfig`.

Every problem is collected and raised at once as a :class:`ConfigError`, each line
starting with the dotted path of the key it is about.
"""

from __future__ import annotations

import copy
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tunelab.config.dialects import FILLED, dialect_note, drop_empty, recognise, translate
from tunelab.config.keys import (
    ALIASES,
    ENVELOPE_KEYS,
    IGNORED,
    IGNORED_DATASET_KEYS,
    REFUSED_HINTS,
    SECRETS,
    axolotl_keys,
    axolotl_top_keys,
    is_empty,
)
from tunelab.config.locations import data_path_problem, model_problem
from tunelab.config.schema import DatasetSource, TuneConfig
from tunelab.config.trainer_keys import translate_trainer_keys
from tunelab.errors import ConfigError, DataError
from tunelab.redact import MASK, is_masked
from tunelab.textfile import loads_json, read_text


@dataclass
class LoadedConfig:
    """A validated config and what loading it noticed (ignored keys, hints)."""

    config: TuneConfig
    notes: list[str] = field(default_factory=list)
    source: str | None = None
    origins: dict[str, str] = field(default_factory=dict)  # top-level key -> file, flag, --set
    dialect: str = "tunelab"  # whose keys the file was written in: tunelab, axolotl, llamafactory

    def given(self, key: str) -> bool:
        """Whether the user wrote ``key`` (in the file, a flag or --set)."""
        return key in self.origins


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML or JSON file into a mapping; syntax errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: no such config file"])
    try:
        text = read_text(path)
        if path.suffix.lower() == ".json":
            data = loads_json(text, str(path)) if text.strip() else {}
        else:
            data = yaml.safe_load(text) or {}
    except DataError as exc:  # not UTF-8 text, or JSON too deep: the file, and the fix
        raise ConfigError([f"{exc.message}; {exc.hint}" if exc.hint else exc.message]) from None
    except RecursionError:  # YAML's parser recurses once per level of nesting
        raise ConfigError(
            [f"{path}: nested too deeply to read (too many levels of [ or {{)"]
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{path}:{exc.lineno}: invalid JSON: {exc.msg}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}{line}: invalid YAML: {problem}"]) from None
    except ValueError as exc:  # Python refuses integers of more than 4300 digits
        raise ConfigError(
            [f"{path}: a number is too long to read ({str(exc).split(';')[0]})"]
        ) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping of keys to values at the top level"])
    return data


def unwrap_request(data: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Take the ``args`` out of a RunPod-style ``{"input": {"args": {...}}}`` request."""
    if set(data) != {"input"} or not isinstance(data["input"], dict):
        return data
    request = data["input"]
    if "args" not in request or not isinstance(request["args"], dict):
        raise ConfigError(["input.args: a request needs its config as a mapping under input.args"])
    unknown = sorted(set(request) - ENVELOPE_KEYS - {"args"})
    if unknown:
        raise ConfigError([f"input.{k}: unknown request key" for k in unknown])
    given = [k for k in ("user_id", "model_id", "run_id") if not is_empty(request.get(k))]
    if given:
        notes.append(
            f"not supported, ignored: request keys {', '.join('input.' + k for k in given)}"
        )
    creds = request.get("credentials") or {}
    if not isinstance(creds, dict) or any(not is_empty(v) for v in creds.values()):
        notes.append(
            "input.credentials are ignored and never saved: set HF_TOKEN or WANDB_API_KEY "
            "in the environment instead"
        )
    return dict(request["args"])


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` inside nested dicts and lists, creating what is missing."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        nxt: Any = value if last else ([] if parts[i + 1].isdigit() else {})
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                raise ConfigError(
                    [f"{dotted}: '{part}' is not a valid position in a list of {len(node)}"]
                )
            index = int(part)
            if index == len(node):
                node.append(nxt)
            elif last:
                node[index] = value
            node = node[index]
        elif isinstance(node, dict):
            if last or not isinstance(node.get(part), (dict, list)):
                node[part] = nxt
            node = node[part]
        else:
            raise ConfigError([f"{dotted}: '{'.'.join(parts[:i])}' is a value, not a mapping"])


def add_set_option(parser: Any, help_text: str) -> None:
    """The ``--set KEY=VALUE`` option (repeatable) of the commands that take a config."""
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )


def parse_set(item: str) -> tuple[str, Any]:
    """``key=value`` from ``--set``; the value is read as YAML (numbers, true, lists)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {item}: expected key=value"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _rename_aliases(data: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    out = dict(data)
    for alias, name in ALIASES.items():
        if alias in out:
            if name in out and out[name] != out[alias]:
                problems.append(f"{alias}: same setting as {name}; give only one of them")
            out.setdefault(name, out[alias])
            out.pop(alias)
    return out


def _refused(key: str, value: Any) -> str:
    hint = REFUSED_HINTS.get(key.rsplit(".", 1)[-1], "remove it to train without it")
    return (
        f"{key}: axolotl's '{key}' (set to {json.dumps(value, default=str)}) is not supported "
        f"yet, and training without it would train something else; {hint}"
    )


def _split_unknown(data: dict[str, Any], notes: list[str], problems: list[str]) -> dict[str, Any]:
    """Take out the keys of axolotl's schema that tunelab does not implement: those that do
    not change what is trained are named in notes, the others are refused when set. Keys
    nobody knows stay in, for the schema to name (with a 'did you mean')."""
    ours = set(TuneConfig.model_fields)
    known = axolotl_top_keys()
    kept: dict[str, Any] = {}
    ignored: dict[str, list[str]] = {}
    for key, value in data.items():
        if key in ours or key not in known:
            kept[key] = value
        elif key in IGNORED:
            if not is_empty(value):
                ignored.setdefault(IGNORED[key], []).append(key)
        elif not is_empty(value):
            problems.append(_refused(key, value))
    known_entry = axolotl_keys()["dataset"]
    entry_fields = set(DatasetSource.model_fields)
    for name in ("datasets", "pretraining_dataset"):
        entries = kept.get(name)
        if not isinstance(entries, list):
            continue
        cleaned = []
        for i, entry in enumerate(entries):
            if isinstance(entry, dict):
                for key in sorted(set(entry) - entry_fields):
                    value = entry[key]
                    if key in IGNORED_DATASET_KEYS:
                        if not is_empty(value):
                            ignored.setdefault(IGNORED_DATASET_KEYS[key], []).append(
                                f"{name}.{i}.{key}"
                            )
                    elif key in known_entry and not is_empty(value):
                        problems.append(_refused(f"{name}.{i}.{key}", value))
                entry = {
                    k: v for k, v in entry.items() if k in entry_fields or k not in known_entry
                }
            cleaned.append(entry)
        kept[name] = cleaned
    for why, keys in ignored.items():
        notes.append(f"not supported yet, ignored: {', '.join(keys)} ({why})")
    return kept


_TYPE_TAGS = {"bool", "int", "float", "str", "list", "dict", "none", "function-after"}


def _loc(parts: tuple[Any, ...]) -> str:
    kept = [str(p) for p in parts if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    return ".".join(kept)


def _did_you_mean(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _pydantic_problems(exc: ValidationError, dialect: str = "tunelab") -> list[str]:
    grouped: dict[str, list[str]] = {}
    for err in exc.errors():
        loc = _loc(err["loc"])
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            in_dataset = len(err["loc"]) > 1 and err["loc"][0] == "datasets"
            choices = (
                list(DatasetSource.model_fields)
                if in_dataset
                else [*TuneConfig.model_fields, *ALIASES]
            )
            message = "unknown key" + _did_you_mean(key, choices)
            if dialect == "llamafactory" and message == "unknown key":
                message = "LLaMA-Factory's key has no meaning in tunelab yet; remove it"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            message = f"{msg} (got {json.dumps(err.get('input'), default=str)})"
        grouped.setdefault(loc, [])
        if message not in grouped[loc]:
            grouped[loc].append(message)
    return [f"{loc}: {' or '.join(msgs)}" for loc, msgs in grouped.items()]


def _location_problems(data: dict[str, Any], source_dir: Path | None) -> list[str]:
    """Files and models the raw config names that cannot be found (checked before the schema,
    so that they are reported together with every other problem)."""
    problems = []
    datasets = data.get("datasets")
    for i, entry in enumerate(datasets if isinstance(datasets, list) else []):
        path = entry.get("path") if isinstance(entry, dict) else None
        problem = data_path_problem(path) if isinstance(path, str) else None
        if problem:
            if source_dir and not Path(path).is_absolute() and (source_dir / path).exists():
                problem += (
                    " (relative paths are read from the current directory;"
                    f" did you mean '{source_dir / path}'?)"
                )
            problems.append(f"datasets.{i}.path: {problem}")
    adapter_dir = data.get("lora_model_dir")
    if isinstance(adapter_dir, str) and adapter_dir.strip():
        if not (Path(adapter_dir).expanduser() / "adapter_config.json").is_file():
            problems.append(
                f"lora_model_dir: '{adapter_dir}' holds no adapter (no adapter_config.json)"
            )
    base_model = data.get("base_model")
    problem = model_problem(base_model) if isinstance(base_model, str) else None
    if problem:
        problems.append(f"base_model: {problem}")
    return problems


def _masked_passwords(data: dict[str, Any]) -> list[str]:
    """URLs whose password a saved config masked: used as they are, they would log in with
    '***'. (A run's config.yaml never holds a password; see tunelab.redact.)"""
    return [
        f"{key}: the password in this URL was masked ({MASK}) when the config was saved; "
        f"give the whole URL again (--set {key}=...), or put the credentials in the environment"
        for key, value in data.items()
        if isinstance(value, str) and is_masked(value)
    ]


def _cross_checks(config: TuneConfig) -> tuple[list[str], list[str]]:
    """Rules between fields: (problems, notes)."""
    problems: list[str] = []
    notes: list[str] = []
    if not config.datasets and not config.pretraining_dataset:
        problems.append("datasets: no training data; give --data FILE or a datasets list")
    if config.pretraining_dataset and config.max_steps is None:
        problems.append(
            "max_steps: pretraining_dataset is streamed, so the run needs max_steps "
            "(how many updates to read text for)"
        )
    if config.bf16 is True and config.fp16:
        problems.append("fp16: cannot train in both bf16 and fp16; set one of them to false")
    if config.circular and config.gradient_accumulation_steps != 1:
        problems.append(
            "gradient_accumulation_steps: circular training grows its own batch; leave it at 1"
        )
    if config.load_in_8bit and config.adapter != "lora":
        problems.append("load_in_8bit: works with adapter: lora (qlora is 4-bit already)")
    if config.save_steps is not None and config.saves_per_epoch is not None:
        problems.append("saves_per_epoch: give save_steps or saves_per_epoch, not both")
    if config.warmup_steps is not None and config.warmup_ratio is not None:
        problems.append("warmup_ratio: give warmup_steps or warmup_ratio, not both")
    for i, ds in enumerate(config.datasets):
        cutoff = ds.cutoff_len or config.sequence_len
        if ds.overlap_len >= cutoff:
            problems.append(
                f"datasets.{i}.overlap_len: {ds.overlap_len} must be smaller than the chunk "
                f"length ({cutoff}, cutoff_len or sequence_len)"
            )
    if config.lora_target_modules == []:
        problems.append("lora_target_modules: empty list; leave it out to adapt all linear layers")
    lora_keys = sorted(
        k for k in config.model_fields_set if k.startswith("lora_") and config.adapter == "full"
    )
    if lora_keys:
        notes.append(
            f"adapter is 'full', so these LoRA settings are not used: {', '.join(lora_keys)}"
        )
    return problems, notes


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    *,
    data: dict[str, Any] | None = None,
    source_dir: Path | None = None,
    source: str | None = None,
) -> LoadedConfig:
    """Read ``path`` (optional), apply ``overrides`` then ``--set`` items, and validate.

    ``overrides`` maps dotted keys to values (from named CLI flags); ``sets`` are
    ``key=value`` strings. Both win over the file, ``sets`` last. Without a ``path``,
    ``data`` is the config as a mapping (read from ``source``, in ``source_dir``, if given).
    """
    notes: list[str] = []
    problems: list[str] = []
    raw = read_config_file(path) if path else copy.deepcopy(data or {})
    source_dir = Path(path).parent if path else source_dir
    data = unwrap_request(raw, notes)
    request = data is not raw
    data = translate_trainer_keys(data, notes, problems)
    dialect = recognise(data, request=request)
    note = dialect_note(data, dialect, request=request)
    if note:
        notes.append(note)
    data = drop_empty(data)
    data = translate(data, dialect, notes, problems, source_dir)
    filled = data.pop(FILLED, {})
    data = _rename_aliases(data, problems)
    origins = {key: filled.get(key, "file") for key in data}
    flagged = [(k, v, "flag") for k, v in (overrides or {}).items()]
    for key, value, origin in flagged + [(*parse_set(s), "--set") for s in sets or []]:
        head, _, rest = key.partition(".")
        head = ALIASES.get(head, head)
        set_dotted(data, head + (f".{rest}" if rest else ""), value)
        origins[head] = origin
    for key in sorted(set(data) & set(SECRETS)):
        data.pop(key)  # the value is never echoed
        problems.append(
            f"{key}: secrets do not belong in a config, which is saved with the run; "
            f"set {SECRETS[key]} in the environment instead"
        )
    data = _split_unknown(data, notes, problems)
    source = str(path) if path else source
    problems += _location_problems(data, source_dir)
    problems += _masked_passwords(data)
    try:
        config = TuneConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems + _pydantic_problems(exc, dialect), source) from None
    more, cross_notes = _cross_checks(config)
    if problems or more:
        raise ConfigError(problems + more, source)
    if origins.get("adapter") != "file":  # a flag chose the adapter, not the dialect's default
        notes = [n for n in notes if not n.startswith("axolotl config without an adapter")]
    origins = {
        k: v
        for k, v in origins.items()
        if k in TuneConfig.model_fields and getattr(config, k) is not None  # null is "not given"
    }
    return LoadedConfig(config, notes + cross_notes, source, origins, dialect)


def resolved_dict(config: TuneConfig) -> dict[str, Any]:
    """The whole config with every default filled in, as plain data."""
    return config.model_dump(mode="json")
