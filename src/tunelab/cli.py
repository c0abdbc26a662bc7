"""The ``tunelab`` command: one explicit table of subcommands, each a thin call."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tunelab import __version__
from tunelab.config import BUILTIN_MODEL, TuneConfig, load_config, resolved_dict
from tunelab.config.load import add_set_option
from tunelab.errors import TunelabError
from tunelab.infer import commands as after
from tunelab.jobs import commands as queue
from tunelab.redact import redact, redact_data, redacted_output
from tunelab.server import commands as server

EXAMPLES = Path(__file__).parent / "examples"
DEMO_PROMPT = "What is your name?"

# Named flags of `train` and `validate`: (flag, config key, type).
CONFIG_FLAGS: list[tuple[str, str, Callable[[str], Any]]] = [
    ("--base-model", "base_model", str),
    ("--model", "base_model", str),
    ("--output", "output_dir", str),
    ("--epochs", "num_epochs", float),
    ("--max-steps", "max_steps", int),
    ("--learning-rate", "learning_rate", float),
    ("--batch-size", "micro_batch_size", int),
    ("--gradient-accumulation-steps", "gradient_accumulation_steps", int),
    ("--lora-r", "lora_r", int),
    ("--lora-alpha", "lora_alpha", int),
    ("--sequence-len", "sequence_len", int),
    ("--validation-split", "val_set_size", float),
    ("--max-examples", "max_examples", int),
    ("--chat-template", "chat_template", str),
    ("--optimizer", "optimizer", str),
    ("--seed", "seed", int),
    ("--save-steps", "save_steps", int),
    ("--patience", "early_stopping_patience", int),
    ("--mode", "mode", str),
    ("--continue-from", "lora_model_dir", str),
    ("--max-circular-epochs", "max_circular_epochs", int),
    ("--method", "adapter", str),
    ("--overfitting-threshold", "overfitting_threshold", float),
    ("--push-to-hub", "hub_model_id", str),
]


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML or JSON config file (axolotl keys)")
    p.add_argument("--data", help="data file(s), comma-separated; replaces the config's datasets")
    p.add_argument("--dataset-format", help="format of the --data files (default: auto)")
    p.add_argument("--format-file", help="text-generation-webui format file for the --data files")
    p.add_argument(
        "--data-template", help="Jinja data template, e.g. 'Q: {{question}}\\nA: {{answer}}'"
    )
    fields = TuneConfig.model_fields
    for flag, key, kind in CONFIG_FLAGS:
        help_text = (
            f"{fields[key].description} [{key}]" if flag != "--model" else "same as --base-model"
        )
        p.add_argument(flag, dest=key, type=kind, help=help_text)
    add_set_option(
        p, "set any config key (dotted for nested, e.g. datasets.0.type=alpaca); repeatable"
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {
        key: getattr(args, key) for _, key, _ in CONFIG_FLAGS if getattr(args, key) is not None
    }
    if getattr(args, "force_epochs", None):
        overrides["force_epochs"] = True
    if getattr(args, "use_8bit", None):
        overrides["load_in_8bit"] = True
    if getattr(args, "circular", None):
        overrides["circular"] = True
    per_source = {
        key: value
        for key, value in (
            ("type", args.dataset_format),
            ("format_file", args.format_file),
            ("data_template", args.data_template),
        )
        if value is not None
    }
    if args.data:
        overrides["datasets"] = [{"path": args.data, **per_source}]
    else:
        overrides.update({f"datasets.0.{k}": v for k, v in per_source.items()})
    return overrides


def _load(args: argparse.Namespace):
    return load_config(args.config, _overrides(args), args.sets)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _plan_log(line: str) -> None:
    """What planning says, less the summaries `data inspect` and `preprocess` print themselves."""
    if not line.startswith(("data:", "chosen", "model:", "note:")):
        _stderr(line)


def cmd_validate(args: argparse.Namespace) -> int:
    from tunelab.errors import RunDirError
    from tunelab.rundir import check_output_dir
    from tunelab.train.plan import plan_run

    loaded = _load(args)
    print(yaml.safe_dump(redact_data(resolved_dict(loaded.config)), sort_keys=False), end="")
    for note in loaded.notes:
        _stderr(f"note: {note}")
    rp = plan_run(loaded, _stderr, strict=False)
    for problem in rp.warnings:
        _stderr(f"warning: valid, but this machine cannot run it: {problem}")
    if loaded.config.output_dir:
        try:
            check_output_dir(Path(loaded.config.output_dir), overwrite=False)
        except RunDirError as exc:
            _stderr(f"warning: {exc.message} (train with --overwrite, or another --output)")
    st = rp.data.stats
    _stderr(
        f"ok: the configuration is valid ({st['examples']} rows checked); training would "
        f"start with {st['train_samples']} samples ({st['train_tokens']} tokens), {rp.steps} steps"
    )
    return 0


def _prepared(args: argparse.Namespace):
    """Config, tokenizer and tokenized data as training would make them, without weights."""
    from tunelab.train.plan import plan_run

    loaded = _load(args)
    for note in loaded.notes:
        _stderr(f"note: {note}")
    rp = plan_run(loaded, _plan_log, strict=False, machine=False)
    return rp.config, rp.tokenizer, rp.data


def _inspection(args: argparse.Namespace) -> dict[str, Any]:
    """What `data inspect` shows, as data: the CLI prints it, the preview process sends it."""
    from tunelab.data import inspect

    _, tokenizer, data = _prepared(args)
    return inspect.report(data, tokenizer, args.n)


def cmd_inspect(args: argparse.Namespace) -> int:
    from tunelab.data import inspect

    if args.serve:  # the server's preview process: many inspections, one process
        from tunelab.server import preview_service

        return preview_service.serve(inspect_answer)
    rep = _inspection(args)
    if args.json:
        print(inspect.dump_json(rep))
    else:
        inspect.print_report(rep)
    return 0


def inspect_answer(argv: list[str]) -> dict[str, Any]:
    """``tunelab data inspect ARGV --json`` answered in this process: ``{"stdout": TEXT}``
    with what the command prints, or ``{"failure": RECORD}`` with what it writes to
    ``TUNELAB_RESULT_FILE`` (a bad argument as the server reads it from a failed command)."""
    from tunelab.data import inspect

    usage = io.StringIO()
    try:
        with contextlib.redirect_stderr(usage):
            args = build_parser().parse_args(["data", "inspect", *argv])
    except SystemExit:
        tail = usage.getvalue().strip().splitlines()[-1:] or ["no output"]
        return {"failure": _record(2, f"tunelab data failed: {tail[0]}")}
    try:
        return {"stdout": redact(inspect.dump_json(_inspection(args))) + "\n"}
    except TunelabError as exc:  # as main() reports it; the process stays up for the next one
        _stderr(f"error: {redact(str(exc))}")
        return {"failure": _error_record(exc, args.command)}
    except Exception as exc:  # a crash: its traceback in the log (stderr)
        traceback.print_exc()
        return {"failure": _error_record(exc, args.command)}


def cmd_preprocess(args: argparse.Namespace) -> int:
    given = any(s.startswith("dataset_prepared_path=") for s in args.sets)
    if args.prepared_path and not given:
        args.sets.append(f"dataset_prepared_path={args.prepared_path}")
    elif not given and not (args.config and _load(args).config.dataset_prepared_path):
        args.sets.append("dataset_prepared_path=last_run_prepared")
    _, _, data = _prepared(args)
    for note in data.notes:
        _stderr(f"note: {note}")
    st = data.stats
    print(
        f"prepared {st['train_samples']} training and {st['eval_samples']} validation samples "
        f"({st['train_tokens']} tokens); train with the same settings to reuse them"
    )
    return 0


def _print_samples(result) -> None:
    for s in result.samples:
        print(f"\nprompt: {s.prompt}\n  before training: {s.before}\n  after training:  {s.after}")


def _push_run(run_dir: Path, config: TuneConfig) -> None:
    """Upload a finished run to ``hub_model_id`` (the step after training), logged in its
    train.log as well; the run stays saved whatever happens."""
    from tunelab.infer.hub import push
    from tunelab.rundir import RunLayout
    from tunelab.train.run import RunLog

    log = RunLog()
    log.path = RunLayout(run_dir).log
    try:
        log(f"pushed to {push(run_dir, config.hub_model_id, config.hub_private_repo, log)}")
    except TunelabError as exc:
        raise TunelabError(
            f"the run is saved in {run_dir}, but pushing it to the Hub failed: {exc.message}",
            f"push it again with: tunelab push {run_dir} --repo {config.hub_model_id}",
        ) from None


def cmd_train(args: argparse.Namespace) -> int:
    from tunelab.train.run import train

    if args.dry_run:
        from tunelab.train import dryrun

        report = dryrun.dry_run(_load(args), _stderr)
        print(json.dumps(report, indent=1, default=str) if args.json else dryrun.describe(report))
        return 0

    loaded = _load(args)
    board = None
    wanted = args.tensorboard_port is not None or (sys.stderr.isatty() and not args.no_tensorboard)
    if wanted and not args.no_tensorboard:
        from tunelab.train import board as tb

        logs = Path(loaded.config.output_dir or "outputs/run").resolve().parent
        board, port = tb.start(logs, args.tensorboard_port or 6006)
        print(f"TensorBoard: http://127.0.0.1:{port}/ (while training)", flush=True)
    try:
        result = train(
            loaded, overwrite=args.overwrite, sample_prompts=args.sample or (),
            resume=args.resume, resume_from=args.resume_from,
        )  # fmt: skip
    finally:
        if board is not None:
            tb.stop(board)
    if loaded.config.hub_model_id:
        _push_run(result.run_dir, loaded.config)
    _print_samples(result)
    print(f"\nadapter saved in {result.run_dir}")
    print(f"past runs' curves: tunelab tensorboard {result.run_dir.parent}")
    return 0


def cmd_tensorboard(args: argparse.Namespace) -> int:
    from tunelab.train import board

    return board.serve(Path(args.dir), args.port)


def cmd_demo(args: argparse.Namespace) -> int:
    from tunelab.train.run import train

    overrides = {"datasets.0.path": str(EXAMPLES / "demo_alpaca.json"), "output_dir": args.output}
    loaded = load_config(EXAMPLES / "demo.yaml", overrides)
    print(f"tunelab demo: LoRA on the built-in model, {EXAMPLES / 'demo_alpaca.json'}")
    result = train(loaded, overwrite=True, sample_prompts=[DEMO_PROMPT])
    _print_samples(result)
    print(f"\nThe trained adapter is in {result.run_dir}")
    print(f"Loss curves: {result.run_dir / 'training_history.png'}")
    return 0


def _model_status(model) -> dict[str, Any]:
    from tunelab.model.builtin import existing_gguf
    from tunelab.model.loading import cache_root, converted_path, is_converted

    gguf = existing_gguf(model, cache_root())
    converted = str(converted_path(gguf)) if gguf and is_converted(gguf) else None
    return {
        "name": model.name, "default": model.name == BUILTIN_MODEL, "summary": model.summary,
        "made_from": model.hub_id, "quantization": model.quantization,
        "installed": model.installed(), "install": model.install, "converted": converted,
    }  # fmt: skip


def cmd_models(args: argparse.Namespace) -> int:
    from tunelab.model.builtin import BUILTINS

    records = [_model_status(m) for m in BUILTINS.values()]
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    print("Built-in models (base_model: NAME); any local model directory, .gguf file or Hub")
    print("id works too.\n")
    for r in records:
        state = "installed" if r["installed"] else f"not installed: {r['install']}"
        if r["installed"]:
            state += f", converted in {r['converted']}" if r["converted"] else (
                ", converted on first use")  # fmt: skip
        print(f"{r['name']}{' (default)' if r['default'] else ''}\n  {r['summary']}")
        print(f"  {r['made_from']} as a {r['quantization']} GGUF, dequantized\n  {state}\n")
    return 0


def cmd_help(args: argparse.Namespace) -> int:
    parser = build_parser()
    try:
        parser.parse_args([*args.topic, "--help"])
    except SystemExit as done:  # argparse exits once it has printed the help (or an error)
        return int(done.code or 0)
    return 0


# "group name" entries are subcommands of a group (`tunelab data inspect`).
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "train": (cmd_train, "fine-tune a model on your data"),
    "validate": (cmd_validate, "check a config and its data without training"),
    "data inspect": (cmd_inspect, "show what tunelab makes of a dataset, tokens and all"),
    "preprocess": (cmd_preprocess, "tokenize the data once and keep it for training to reuse"),
    "demo": (cmd_demo, "train the built-in model on the bundled demo data"),
    "tensorboard": (cmd_tensorboard, "show the training curves of past runs in TensorBoard"),
    "models": (cmd_models, "list the built-in models and whether each is installed"),
    **after.COMMANDS,
    **queue.COMMANDS,
    **server.COMMANDS,
    "help": (cmd_help, "show the help of tunelab or of one command: tunelab help train"),
}
CONFIG_COMMANDS = ("train", "validate", "data inspect", "preprocess")
# Commands that read only run directories: they must not load torch or transformers (a
# queue or a page lists runs without them).
LIGHT_COMMANDS = ("runs", "help", *queue.LIGHT, *server.LIGHT)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description="Fine-tune open language models.")
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    sub = parser.add_subparsers(dest="group", required=True)
    groups: dict[str, Any] = {}
    for name, (_, help_text) in COMMANDS.items():
        group, _, leaf = name.partition(" ")
        if leaf:
            if group not in groups:
                holder = sub.add_parser(group, help=f"{group} commands")
                groups[group] = holder.add_subparsers(dest="leaf", required=True)
            p = groups[group].add_parser(leaf, help=help_text, description=help_text)
        else:
            p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(command=name)
        if name in CONFIG_COMMANDS:
            _add_config_options(p)
        if name in after.COMMANDS:
            after.add_arguments(name, p)
        if name in queue.COMMANDS:
            queue.add_arguments(name, p)
        if name in server.COMMANDS:
            server.add_arguments(name, p)
        if name == "preprocess":
            p.add_argument("--prepared-path", help="where to keep it (default: the config's "
                           "dataset_prepared_path, else last_run_prepared)")  # fmt: skip
        if name == "data inspect":
            p.add_argument("-n", type=int, default=3, help="how many examples to show (default 3)")
            p.add_argument("--json", action="store_true", help="print one JSON object")
            p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
        if name == "train":
            p.add_argument(
                "--overwrite", action="store_true", help="replace a finished run in --output"
            )
            p.add_argument(
                "--resume", action="store_true",
                help="continue the run in --output from its last complete checkpoint",
            )  # fmt: skip
            p.add_argument(
                "--resume-from", metavar="CHECKPOINT", help="continue from this checkpoint"
            )
            p.add_argument("--dry-run", action="store_true", help="print the plan; train nothing")
            p.add_argument(
                "--circular",
                action="store_true",
                help="cycle a small dataset with a growing batch size [circular]",
            )
            p.add_argument(
                "--use-8bit", action="store_true",
                help="load the base model in 8-bit (CUDA GPU, bitsandbytes) [load_in_8bit]",
            )  # fmt: skip
            p.add_argument(
                "--no-tensorboard",
                action="store_true",
                help="do not start TensorBoard (it starts with training on a terminal)",
            )
            p.add_argument("--tensorboard-port", type=int, help="start TensorBoard on this port")
            p.add_argument("--json", action="store_true", help="with --dry-run: one JSON object")
            p.add_argument(
                "--force-epochs", action="store_const", const=True, dest="force_epochs",
                help="train exactly the epochs asked for: no automatic stops [force_epochs]",
            )  # fmt: skip
            p.add_argument(
                "--sample", action="append", metavar="PROMPT",
                help="print the model's answer to PROMPT before and after training; repeatable",
            )  # fmt: skip
        if name == "tensorboard":
            p.add_argument("dir", nargs="?", default="outputs", help="a run or a folder of runs")
            p.add_argument(
                "--port", type=int, default=6006, help="port (default 6006, or the next free)"
            )
        if name == "demo":
            p.add_argument("--output", default="outputs/demo", help="where to put the demo run")
        if name == "models":
            p.add_argument("--json", action="store_true", help="print one JSON list")
        if name == "help":
            p.add_argument("topic", nargs="*", metavar="COMMAND", help="e.g. train, data inspect")
    return parser


def _quiet_libraries() -> None:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - a declared dependency
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in LIGHT_COMMANDS:
        _quiet_libraries()
    handler = COMMANDS[args.command][0]
    try:
        with redacted_output():  # whatever any library prints, a password in a URL is masked
            return handler(args)
    except TunelabError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        _report(_error_record(exc, args.command))
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        _report(_record(130, "interrupted"))
        return 130
    except Exception as exc:  # a crash, not bad input: say what, keep the details in the log
        if os.environ.get("TUNELAB_DEBUG"):
            raise
        print(f"error: {type(exc).__name__}: {redact(str(exc))}", file=sys.stderr)
        where = "the run's train.log; " if args.command in ("train", "demo") else ""
        print(f"  (the traceback: {where}TUNELAB_DEBUG=1 shows it here)", file=sys.stderr)
        _report(_error_record(exc, args.command))
        return 1


def _error_record(exc: Exception, command: str) -> dict[str, Any]:
    """A failed command's error as data: a TunelabError as raised, else a crash named by its
    type (the traceback is in the log)."""
    if isinstance(exc, TunelabError):
        return _record(exc.exit_code, exc.message, exc.hint, getattr(exc, "problems", None))
    where = "the run's train.log; " if command in ("train", "demo") else ""
    return _record(1, f"{type(exc).__name__}: {str(exc).strip()}",
                   f"the traceback: {where}TUNELAB_DEBUG=1 shows it")  # fmt: skip


def _record(
    code: int, message: str, hint: str | None = None, problems: list[str] | None = None
) -> dict[str, Any]:
    """The error as data, not console text (credentials masked); a config's problems one by
    one."""
    return {"exit_code": code, "error": redact(message), "hint": redact(hint or "") or None,
            "problems": [redact(p) for p in problems] if problems else None}  # fmt: skip


def _report(record: dict[str, Any]) -> None:
    """For a job's worker or the server (``TUNELAB_RESULT_FILE``): the error ``record``."""
    target = os.environ.get("TUNELAB_RESULT_FILE")
    if target:
        Path(target).write_text(json.dumps(record), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
