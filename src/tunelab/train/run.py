"""A training run, top to bottom.

prepare data -> load model -> build adapter -> build trainer -> train -> save artifacts.
Every check on the user's input (config, data rows, model, output directory) happens
before the run directory is touched.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from tunelab.config import LoadedConfig, TuneConfig, resolved_dict
from tunelab.config.locations import resolve_model, same_model
from tunelab.data.prepare import PreparedData, load_examples, prepare_data
from tunelab.errors import (
    ConfigError,
    RunDirError,
    RunInterrupted,
    TrainingFailed,
    TunelabError,
)
from tunelab.files import write_atomic
from tunelab.train import artifacts
from tunelab.train.auto import choose, family_of
from tunelab.train.checkpoints import MARKER, CheckpointCallback, EpochSeedCallback, StopOnSignal
from tunelab.train.models import load_model, load_tokenizer_and_processor, model_location
from tunelab.train.preflight import Plan, detect_hardware, preflight
from tunelab.train.resume import (
    check_resumable,
    checkpoint_step,
    fingerprint,
    resume_point,
    truncate_metrics,
)
from tunelab.train.rundir import (
    RunDir,
    RunLayout,
    check_output_dir,
    move_into,
    read_json,
    write_json,
)
from tunelab.train.stopping import StoppingRules, thresholds
from tunelab.train.trainer import (
    build_adapter,
    build_trainer,
    count_parameters,
    quantization,
    steps_per_epoch,
    torch_dtype,
    total_steps,
    tracker_environment,
    training_arguments,
)

USER = ("file", "flag", "--set")


class RunLog:
    """Prints a line and keeps it for the run's ``train.log`` (once the run dir exists)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.lines: list[str] = []
        self.path: Path | None = None

    def __call__(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)
        self.write(line)

    def write(self, line: str) -> None:
        """Keep ``line`` for the log file without printing it."""
        if self.path is None:
            self.lines.append(line)
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")

    def attach(self, path: Path, append: bool = False) -> None:
        self.path = path
        with path.open("a" if append else "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in self.lines))


@dataclass
class Sample:
    prompt: str
    before: str
    after: str = ""


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    losses: dict[str, Any]
    duration_s: float
    samples: list[Sample] = field(default_factory=list)
    model: Any = field(default=None, repr=False)  # the trained model, still in memory
    tokenizer: Any = field(default=None, repr=False)


def default_output_dir() -> Path:
    return Path("outputs") / datetime.now().strftime("run-%Y%m%d-%H%M%S")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _describe_data(log: RunLog, data: PreparedData) -> None:
    for note in data.notes:
        log(f"note: {note}")
    for s in data.sources:
        log(f"data: {s.path} ({s.format}, {s.rows} rows)")
    st = data.stats
    extra = [
        f"{st[key]} {label}"
        for key, label in (
            ("duplicates", "duplicates removed"), ("truncated", "truncated"),
            ("dropped", "dropped (too long, or nothing left to train after the cut)"),
        )
        if st[key]
    ]  # fmt: skip
    if "packed_rows" in st:
        extra.append(
            f"packed into {st['packed_rows']} rows ({st['packing_efficiency']:.1%} filled)"
        )
    log(
        f"data: {st['train_samples']} training / {st['eval_samples']} validation samples, "
        f"{st['trained_tokens']} of {st['train_tokens']} tokens trained, longest {st['max_length']}"
        + "".join(f", {e}" for e in extra)
    )


def _save_weights(model: Any, tokenizer: Any, layout: RunLayout) -> None:
    """Adapter (or full model) and tokenizer, moved into the run dir file by file."""
    staging = layout.root / ".weights-staging"
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    move_into(staging, layout.root)


def _info(config: TuneConfig, plan: Plan, data: PreparedData, model: Any, **extra: Any) -> dict:
    trainable, total = count_parameters(model)
    return {
        "base_model": config.base_model,
        "adapter": config.adapter,
        "datasets": [s.__dict__ for s in data.sources],
        "data": data.stats,
        "config": resolved_dict(config),
        "effective": {
            "learning_rate": config.learning_rate_value,
            "lora_alpha": config.lora_alpha_value if config.adapter != "full" else None,
            "lora_target_modules": config.lora_targets if config.adapter != "full" else None,
            "micro_batch_size": plan.micro_batch_size,
            "precision": plan.precision,
            "gradient_checkpointing": plan.gradient_checkpointing,
            "device": plan.hardware.name,
        },
        "parameters": {"trainable": trainable, "total": total},
        "versions": artifacts.library_versions(),
        **extra,
    }


@dataclass
class Prepared:
    """Everything checked and loaded, before the run directory exists."""

    config: TuneConfig
    plan: Plan
    data: PreparedData
    tokenizer: Any
    model: Any
    steps: int
    per_epoch: int
    samples: list[Sample]
    processor: Any = None  # for image-text models
    origins: dict[str, str] = field(default_factory=dict)  # setting -> where its value came from


def _check_adapter_base(adapter_dir: Path, location: str) -> None:
    """An adapter continues only on the base model it was trained on."""
    recorded = read_json(adapter_dir / "adapter_config.json").get("base_model_name_or_path")
    if not (recorded and same_model(recorded, location)):
        raise RunDirError(
            f"{adapter_dir}: this adapter was trained on '{recorded}', not on '{location}'",
            "set base_model to the model the adapter was trained on",
        )


def _fit_plan(plan: Plan, config: Any, model: Any, n_params: int, data: Any, origins: dict) -> Plan:
    """On a GPU, without a given micro_batch_size: the largest batch the memory estimate fits."""
    import dataclasses

    from tunelab.train.dryrun import estimate, fitting_batch

    if plan.hardware.device != "cuda" or config.micro_batch_size or config.sample_packing:
        return plan
    text = getattr(model.config, "text_config", model.config)
    trainable = n_params if config.adapter == "full" else n_params // 100

    def peak(batch: int) -> float:
        trial = dataclasses.replace(plan, micro_batch_size=batch)
        return estimate(
            trial, config, n_params, trainable, 0, getattr(text, "hidden_size", 1024),
            getattr(text, "num_hidden_layers", 24), data.stats["max_length"],
        )["memory_gib"]  # fmt: skip

    batch = fitting_batch(plan.hardware.memory_gb or 0.0, peak)
    origins["micro_batch_size"] = f"fits {plan.hardware.memory_gb:.0f} GiB"
    return dataclasses.replace(plan, micro_batch_size=batch)


def prepare(
    loaded: LoadedConfig, overwrite: bool, sample_prompts: Sequence[str], log: RunLog,
    resume: bool = False,
) -> Prepared:  # fmt: skip
    """Check the config, output dir, hardware and data; load the model; add the adapter."""
    from transformers import set_seed

    from tunelab.infer.generate import generate

    output_dir = Path(loaded.config.output_dir or default_output_dir())
    config = loaded.config.model_copy(update={"output_dir": str(output_dir)})
    for note in loaded.notes:
        log(f"note: {note}")
    if resume:
        check_resumable(RunLayout(output_dir))
    else:
        check_output_dir(output_dir, overwrite)
    plan = preflight(config, detect_hardware())
    loaded_data = load_examples(config)

    ref = resolve_model(config.base_model)
    log(f"model: {ref.describe()}")
    location = model_location(ref, log)
    if config.lora_model_dir:
        _check_adapter_base(Path(config.lora_model_dir).expanduser(), location)
    tokenizer, processor = load_tokenizer_and_processor(location, ref)
    data = prepare_data(config, tokenizer, loaded_data, processor)
    _describe_data(log, data)
    model = load_model(
        location, ref, torch_dtype(plan, config), quantization(config, plan), bool(processor)
    )
    samples = [Sample(p, generate(model, tokenizer, p)) for p in sample_prompts]

    n_params = model.num_parameters()  # counts 4-bit weights at their true size
    model_type = getattr(model.config, "model_type", None)
    config, origins = choose(loaded, config, model_type, n_params)
    plan = _fit_plan(plan, config, model, n_params, data, origins)
    if family_of(model_type).name == "gemma" and plan.precision == "fp16":
        raise ConfigError(["fp16: gemma models overflow in float16; use bf16 (or fp32)"])
    effective = {"micro_batch_size": plan.micro_batch_size}
    chosen = [
        f"{k} {effective.get(k, getattr(config, k))} ({why})"
        for k, why in origins.items()
        if why not in USER
    ]
    if chosen:
        log(f"chosen automatically: {'; '.join(chosen)}")
    if config.lr_scheduler == "reduce_lr_on_plateau" and not data.eval:
        raise ConfigError(
            ["lr_scheduler: reduce_lr_on_plateau (mode adaptive) needs a validation set; "
             "set val_set_size above 0 or choose another mode"]
        )  # fmt: skip
    set_seed(config.seed)
    model = build_adapter(model, config, plan)
    steps = total_steps(config, plan, len(data.train))
    per_epoch = steps_per_epoch(config, plan, len(data.train))
    trainable, total = count_parameters(model)
    log(
        f"plan: {config.adapter} on {plan.hardware.name}, {plan.precision}, {steps} steps, "
        f"batch {plan.micro_batch_size}x{config.gradient_accumulation_steps}, "
        f"lr {config.learning_rate_value:g}, {trainable:,} of {total:,} parameters trained"
    )
    if plan.reasons:
        log(f"chosen for this machine: {'; '.join(plan.reasons)}")
    return Prepared(
        config, plan, data, tokenizer, model, steps, per_epoch, samples, processor, origins
    )


def fit(
    prep: Prepared, layout: RunLayout, log: RunLog, quiet: bool, resume_from: Path | None = None
) -> tuple[Any, StopOnSignal, StoppingRules]:
    """Train with transformers' Trainer; returns the trainer after its last step, the
    signal watcher and the stopping rules (which say whether and why the run ended early)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    from tunelab.train.callbacks import (
        ConsoleProgressCallback,
        MetricsFileCallback,
        PlotCallback,
        ThroughputCallback,
    )

    writer = SummaryWriter(log_dir=str(layout.tensorboard))
    stopper = StopOnSignal()
    console = ConsoleProgressCallback(log.write, quiet=quiet)
    rules = StoppingRules(
        thresholds(prep.config, [s.format for s in prep.data.sources]), console.say
    )
    callbacks = [
        ThroughputCallback(),
        TensorBoardCallback(tb_writer=writer),
        MetricsFileCallback(layout.metrics),
        console,
        rules,
        PlotCallback(layout.metrics, layout.plot),
        CheckpointCallback(layout.checkpoints),
        stopper,
    ]
    cycles = None
    if prep.config.circular:
        from tunelab.train.circular import cycle_end_callback, schedule

        cycles, ends = schedule(
            len(prep.data.train), prep.plan.micro_batch_size, prep.config.max_circular_epochs,
            prep.config.seed,
        )  # fmt: skip
        cycles = cycles[: prep.steps]
        if prep.data.eval:
            callbacks.append(cycle_end_callback(ends))
    elif prep.config.group_by_length:
        callbacks.append(EpochSeedCallback())
    images = bool(prep.data.train) and "images" in prep.data.train[0]
    args = training_arguments(
        prep.config, prep.plan, layout, prep.steps, prep.per_epoch, bool(prep.data.eval), images
    )
    trainer = build_trainer(
        prep.model, prep.tokenizer, args, prep.data.train, prep.data.eval, callbacks,
        prep.processor, cycles,
    )  # fmt: skip
    saved_env = {k: os.environ.get(k) for k in tracker_environment(prep.config, layout.root)}
    os.environ.update(tracker_environment(prep.config, layout.root))
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        step = trainer.state.global_step
        stopped = stopper.received is not None or rules.reason is not None
        if prep.data.eval and args.eval_strategy == "steps" and step % args.eval_steps:
            if not stopped:
                trainer.evaluate()  # the validation loss of the weights being saved
    finally:
        writer.close()
        for key, value in saved_env.items():  # leave the environment as it was
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return trainer, stopper, rules


def save_artifacts(prep: Prepared, trainer: Any, layout: RunLayout, started: str, clock: float):
    """Weights, tokenizer, adapter_info.json and the loss plot; returns the loss summary."""
    _save_weights(trainer.model, prep.processor or prep.tokenizer, layout)
    if layout.checkpoints.is_dir() and not any(layout.checkpoints.iterdir()):
        layout.checkpoints.rmdir()
    records = artifacts.read_metrics(layout.metrics)
    losses = artifacts.loss_summary(records)
    artifacts.plot_history(records, layout.plot)
    state = trainer.state
    info = _info(
        prep.config, prep.plan, prep.data, trainer.model, origins=prep.origins,
        steps=state.global_step, epochs=round(state.epoch or 0, 4), losses=losses,
        duration_s=round(time.perf_counter() - clock, 1), started=started, finished=_now(),
        tokens_seen=state.num_input_tokens_seen,
    )  # fmt: skip
    write_json(layout.info, info)
    return losses


def _open_run(
    prep: Prepared, overwrite: bool, resume: bool, resume_from: str | None, log: RunLog
) -> tuple[RunDir, Path | None, dict[str, Any]]:
    """The run directory (new, staged, or the one being resumed) and where to resume from."""
    output_dir = Path(prep.config.output_dir)
    current = fingerprint(prep.config, prep.data.sources, prep.plan.micro_batch_size)
    if not (resume or resume_from):
        return RunDir.create(output_dir, overwrite), None, current
    layout = RunLayout(output_dir.resolve())
    check_resumable(layout)
    point = resume_point(layout, current, resume_from)
    step = checkpoint_step(point) if (point / MARKER).is_file() else 0
    truncate_metrics(layout, step)
    log(f"resuming from {point} (step {step})")
    return RunDir(layout, layout.root), point, current


def _push(root: Path, config: TuneConfig, log: RunLog) -> None:
    """Upload the finished run to ``hub_model_id``; the run stays saved whatever happens."""
    from tunelab.infer.hub import push

    try:
        log(f"pushed to {push(root, config.hub_model_id, config.hub_private_repo, log)}")
    except TunelabError as exc:
        raise TunelabError(
            f"the run is saved in {root}, but pushing it to the Hub failed: {exc.message}",
            f"push it again with: tunelab push {root} --repo {config.hub_model_id}",
        ) from None


def train(
    loaded: LoadedConfig,
    overwrite: bool = False,
    sample_prompts: Sequence[str] = (),
    quiet: bool = False,
    resume: bool = False,
    resume_from: str | None = None,
) -> RunResult:
    """Run a whole training job; raises a :class:`~tunelab.errors.TunelabError` on bad input.

    ``resume`` continues the run in ``output_dir`` from its last complete checkpoint
    (``resume_from``: from that checkpoint), refusing if the data, base model or adapter
    shape changed.
    """
    from tunelab.infer.generate import generate

    if overwrite and (resume or resume_from):
        raise ConfigError(["--overwrite starts the run again; --resume continues it: choose one"])
    log = RunLog(quiet)
    prep = prepare(loaded, overwrite, sample_prompts, log, resume=bool(resume or resume_from))
    run, point, current = _open_run(prep, overwrite, resume, resume_from, log)
    layout = run.layout
    log.attach(layout.log, append=point is not None)
    write_atomic(layout.config, yaml.safe_dump(resolved_dict(prep.config), sort_keys=False))
    started, clock = _now(), time.perf_counter()
    status = {"started": started, "total_steps": prep.steps, "fingerprint": current}
    write_json(layout.status, {"state": "running", **status})
    try:
        trainer, stopper, rules = fit(prep, layout, log, quiet, point)
        steps = trainer.state.global_step
        if stopper.received is not None:
            if run.layout.root != run.final:  # a replacement run: the old one stays
                raise RunInterrupted(
                    f"stopped by signal {stopper.received} at step {steps}; the run in "
                    f"{run.final} was left as it was and this replacement was discarded",
                    "run again with --overwrite to replace it",
                )
            raise RunInterrupted(
                f"stopped by signal {stopper.received} at step {steps}; a checkpoint was saved",
                f"continue with the same command plus --output {run.final} --resume",
            )
        if rules.failed:
            kept = run.layout.root == run.final
            raise TrainingFailed(
                f"training failed: {rules.reason}",
                (f"the last good checkpoint (if any) is in {layout.checkpoints}; " if kept else "")
                + "try a lower learning_rate",
            )
        if rules.reason:
            log(f"stopped early, {rules.reason}; keeping the best weights")
            status["stop_reason"] = rules.reason
        losses = save_artifacts(prep, trainer, layout, started, clock)
        write_json(
            layout.status, {"state": "completed", **status, "finished": _now(), "steps": steps}
        )
    except BaseException as exc:
        interrupted = isinstance(exc, (KeyboardInterrupt, RunInterrupted))
        log.write(traceback.format_exc())
        write_json(
            layout.status,
            {"state": "interrupted" if interrupted else "failed", **status, "error": repr(exc)},
        )
        run.abandon()
        raise
    layout = run.finish()
    log.path = layout.log
    duration = time.perf_counter() - clock
    for sample in prep.samples:
        sample.after = generate(trainer.model, prep.tokenizer, sample.prompt)
    final, best = losses.get("final_loss", float("nan")), losses.get("best_eval_loss")
    # tokens of this session only (a resumed run's state counts the earlier ones too)
    tokens = trainer.state.num_input_tokens_seen - getattr(
        trainer, "_initial_num_input_tokens_seen", 0
    )
    log(
        f"done: {steps} steps in {duration:.0f}s "
        f"({tokens / duration:.0f} tokens/s), final loss {final:.4f}"
        + (f", best validation loss {best:.4f}" if best is not None else "")
    )
    log(f"saved: {layout.root}")
    if prep.config.hub_model_id:
        _push(layout.root, prep.config, log)
    return RunResult(
        layout.root, steps, losses, duration, prep.samples, trainer.model, prep.tokenizer
    )
