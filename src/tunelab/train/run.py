"""A training run, top to bottom.

plan (config, data, model, output directory) -> open the run directory (``preparing``)
-> load model -> build adapter -> build trainer (``running``) -> train -> save artifacts.
Every check on the user's input happens in planning, before the run directory is touched;
a failure after it (damaged weights, a crash) is recorded in the run's ``status.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from tunelab.config import LoadedConfig, TuneConfig, resolved_dict
from tunelab.data.records import PreparedData
from tunelab.errors import (
    ConfigError,
    RunInterrupted,
    TrainingFailed,
    TunelabError,
)
from tunelab.files import exclusive, remove_leftovers, temporary_directory, write_atomic
from tunelab.model.card import base_record, model_card
from tunelab.model.generate import generate
from tunelab.model.loading import fit_vocabulary, load_model, use_special_tokens
from tunelab.model.ssmax import ssmax_settings, use_ssmax
from tunelab.redact import redact, redact_data, redacted_output
from tunelab.rundir import (
    RunDir,
    RunLayout,
    RunStatus,
    StatusFile,
    check_output_dir,
    checkpoint_step,
    move_into,
    read_metrics,
    recover_swap,
    write_json,
)
from tunelab.rundir.status import now
from tunelab.train import artifacts
from tunelab.train.checkpoints import CheckpointCallback, EpochSeedCallback, StopOnSignal
from tunelab.train.plan import RunPlan, plan_run
from tunelab.train.preflight import Plan
from tunelab.train.resume import (
    check_resumable,
    fingerprint,
    forget_after,
    restore_finished,
    resume_point,
    resumed_tokens,
    truncate_metrics,
)
from tunelab.train.stopping import StoppingRules, thresholds
from tunelab.train.trackers import tracker_environment
from tunelab.train.trainer import (
    build_adapter,
    build_trainer,
    count_parameters,
    quantization,
    torch_dtype,
    training_arguments,
)


class RunLog:
    """Prints a line and keeps it for the run's ``train.log`` (once the run dir exists)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.lines: list[str] = []
        self.path: Path | None = None

    def __call__(self, line: str) -> None:
        line = redact(line)
        if not self.quiet:
            print(line, flush=True)
        self.write(line)

    def write(self, line: str) -> None:
        """Keep ``line`` for the log file without printing it."""
        line = redact(line)
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


def _save_weights(
    model: Any, tokenizer: Any, layout: RunLayout, chat_template: str | None = None
) -> None:
    """Adapter (or full model) and tokenizer, moved into the run dir file by file;
    ``chat_template``, when given, is the saved tokenizer's (the one in memory keeps its own)."""
    staging = temporary_directory(layout.root, "weights")
    # Embeddings the adapter trains in full (new tokens) are saved as its own copy; peft
    # would also save the resized base layers beside it, for nothing but size.
    from peft.utils import ModulesToSaveWrapper

    if isinstance(model.get_input_embeddings(), ModulesToSaveWrapper):
        model.save_pretrained(staging, save_embedding_layers=False)
    else:
        model.save_pretrained(staging)
    holders = [tokenizer, getattr(tokenizer, "tokenizer", None)] if chat_template else []
    holders = [h for h in holders if h is not None and hasattr(h, "chat_template")]
    kept = [h.chat_template for h in holders]
    try:
        for holder in holders:
            holder.chat_template = chat_template
        tokenizer.save_pretrained(staging)
    finally:
        for holder, template in zip(holders, kept, strict=True):
            holder.chat_template = template
    move_into(staging, layout.root)


def _saved_chat_template(prep: Prepared, log: Any) -> str | None:
    """The chat template to save for a run whose every dataset is ``type: alpaca_prompt`` or
    ``jeopardy`` in one prompt style: that prompt, so chat and generate prompt the model as
    it was trained (see ``data/prompt_styles.py``); None keeps the tokenizer's own."""
    from tunelab.data.prompt_styles import chat_template, prompted_style
    from tunelab.data.tokenize import adds_bos

    style, note = prompted_style(prep.config.datasets)
    if note:
        log(f"note: {note}")
    if style is None:
        return None
    if prep.config.chat_template or prep.config.chat_template_jinja:
        log(
            f"note: the data is in the Alpaca prompt (prompt_style {style}), but the saved "
            "tokenizer keeps the configured chat template"
        )
        return None
    log(
        f"note: the run's chat template is the Alpaca prompt it was trained on (prompt_style "
        f"{style}); tunelab chat and generate prompt the model that way"
    )
    return chat_template(style, bos=adds_bos(prep.tokenizer))


def _info(config: TuneConfig, plan: Plan, data: PreparedData, model: Any, **extra: Any) -> dict:
    trainable, total = count_parameters(model)
    return {
        "base_model": config.base_model,
        "adapter": config.adapter,
        "datasets": [s.__dict__ for s in data.sources],
        "data": data.stats,
        "config": redact_data(resolved_dict(config)),
        "effective": {
            "learning_rate": config.learning_rate_value,
            "lora_alpha": config.lora_alpha_value if config.adapter != "full" else None,
            "lora_target_modules": config.lora_targets if config.adapter != "full" else None,
            "micro_batch_size": plan.micro_batch_size,
            "precision": plan.precision,
            "gradient_checkpointing": plan.checkpointing,
            "device": plan.hardware.name,
        },
        "parameters": {"trainable": trainable, "total": total},
        "versions": artifacts.library_versions(),
        **extra,
    }


@dataclass
class Prepared:
    """Everything checked and loaded: the run's model is ready to train."""

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
    fingerprint: dict[str, Any] = field(default_factory=dict)  # what a resume must match
    resume_point: Path | None = None  # the checkpoint to continue from
    base: dict[str, Any] = field(default_factory=dict)  # where the base model came from


@dataclass
class Planned:
    """A run checked and planned (config, data, model, machine, output directory), its
    weights not loaded yet: the run directory may be opened."""

    run: RunPlan
    fingerprint: dict[str, Any]  # what a resume must match
    resume_point: Path | None  # the checkpoint to continue from

    @property
    def config(self) -> TuneConfig:
        return self.run.config


def plan_training(
    loaded: LoadedConfig, overwrite: bool, log: RunLog, resume: bool = False,
    resume_from: str | None = None,
) -> Planned:  # fmt: skip
    """Check the output dir, plan the run (config, data, model, machine), and, when resuming,
    check that the run may continue. Nothing is written."""
    output_dir = Path(loaded.config.output_dir)
    for note in loaded.notes:
        log(f"note: {note}")
    if resume:
        check_resumable(RunLayout(output_dir))
    else:
        check_output_dir(output_dir, overwrite)
    rp = plan_run(loaded, log)
    current = fingerprint(rp.config, rp.data.sources, rp.plan.micro_batch_size)
    point = resume_point(RunLayout(output_dir), current, resume_from) if resume else None
    return Planned(rp, current, point)


def load(planned: Planned, sample_prompts: Sequence[str], log: RunLog) -> Prepared:
    """Load the planned run's model and add the adapter."""
    from transformers import set_seed

    rp, config = planned.run, planned.config
    plan = rp.plan
    set_seed(config.seed)  # reinit_weights draws the weights
    changed = config.overrides_of_model_config or config.reinit_weights
    model = load_model(
        rp.location, rp.ref, torch_dtype(plan, config), quantization(config, plan),
        rp.processor is not None, config.trust_remote_code, config.attn_implementation,
        config=rp.model_config if changed else None, reinit=config.reinit_weights,
    )  # fmt: skip
    multiple = 32 if config.resize_token_embeddings_to_32x else None
    if fit_vocabulary(model, rp.tokenizer, multiple=multiple):
        rows = model.get_input_embeddings().weight.shape[0]
        log(f"note: embeddings resized to {rows} rows (the tokenizer has {len(rp.tokenizer)})")
    ssmax = ssmax_settings(config)
    if ssmax:
        use_ssmax(model, *ssmax)
    if plan.padding_free and "flash" not in (config.attn_implementation or ""):
        from tunelab.model.varlen import use_per_sample_attention

        if not use_per_sample_attention(model):
            log(f"note: padding_free off: {type(model).__name__} cannot change its attention")
            plan = dataclasses.replace(plan, padding_free=False)
    if config.special_tokens:
        use_special_tokens(model, rp.tokenizer)
    samples = [Sample(p, generate(model, rp.tokenizer, p)) for p in sample_prompts]
    set_seed(config.seed)
    model = build_adapter(model, config, plan)
    if plan.fast_lora:
        from tunelab.train.fastlora import speed_up_lora

        speed_up_lora(model)
    log(
        f"plan: {config.adapter} on {plan.hardware.name}, {plan.precision}, {rp.steps} steps, "
        f"batch {plan.micro_batch_size}x{config.gradient_accumulation_steps}, "
        f"lr {config.learning_rate_value:g}, {rp.trainable:,} of {rp.total:,} parameters trained"
    )
    return Prepared(
        config, plan, rp.data, rp.tokenizer, model, rp.steps, rp.per_epoch, samples,
        rp.processor, rp.origins, planned.fingerprint, planned.resume_point, base_record(rp.ref),
    )  # fmt: skip


def fit(
    prep: Prepared, layout: RunLayout, log: RunLog, quiet: bool, resume_from: Path | None = None,
    status: StatusFile | None = None, stopper: StopOnSignal | None = None,
) -> tuple[Any, StopOnSignal, StoppingRules]:  # fmt: skip
    """Train with transformers' Trainer; returns the trainer after its last step, the
    signal watcher and the stopping rules (which say whether and why the run ended early).
    ``status``, when given, is kept current at every logged step; ``stopper``, when given,
    is the signal watcher to use (it knows the step reached, also when training raised)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    from tunelab.train.callbacks import (
        ConsoleProgressCallback,
        MetricsFileCallback,
        PlotCallback,
        ThroughputCallback,
    )

    writer = SummaryWriter(log_dir=str(layout.tensorboard))
    stopper = stopper or StopOnSignal()
    console = ConsoleProgressCallback(log.write, quiet=quiet)
    rules = StoppingRules(
        thresholds(prep.config, [s.format for s in prep.data.sources]), console.say
    )
    callbacks = [
        ThroughputCallback(),
        TensorBoardCallback(tb_writer=writer),
        MetricsFileCallback(layout.metrics, status, log.write),
        console,
        rules,
        PlotCallback(layout.metrics, layout.plot),
        *(
            [EpochSeedCallback()]
            if prep.config.group_by_length and not prep.config.circular
            else []
        ),  # before the checkpoint is marked complete: it amends the checkpoint
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
    images = bool(prep.data.train) and "images" in prep.data.train[0]
    args = training_arguments(
        prep.config, prep.plan, layout, prep.steps, prep.per_epoch, bool(prep.data.eval), images
    )
    pad_to = prep.config.sequence_len if prep.config.pad_to_sequence_len else None
    chunked = prep.plan.chunked_loss
    if chunked:
        from tunelab.train.loss import chunked_loss_problem

        problem = chunked_loss_problem(prep.model)
        if problem:
            log.write(f"note: chunked_cross_entropy off: {problem}")
            chunked = False
    trainer = build_trainer(
        prep.model, prep.tokenizer, args, prep.data.train, prep.data.eval, callbacks,
        prep.processor, cycles, pad_to, chunked, prep.plan.padding_free,
    )  # fmt: skip
    saved_env = {k: os.environ.get(k) for k in tracker_environment(prep.config, layout.root)}
    os.environ.update(tracker_environment(prep.config, layout.root))
    try:
        if resume_from and checkpoint_step(resume_from) >= prep.steps:
            # every step was trained before the run stopped; the Trainer would run one more
            restore_finished(trainer, resume_from)
            log(f"all {prep.steps} steps were trained before; finishing the run")
            return trainer, stopper, rules
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        step = trainer.state.global_step
        stopped = stopper.received is not None or rules.reason is not None
        # the validation loss of the weights being saved, when no evaluation gave it (with
        # evals_per_epoch 0 the only one)
        between = args.eval_strategy == "steps" and step % args.eval_steps
        unevaluated = between or (args.eval_strategy == "no" and not prep.config.circular)
        if prep.data.eval and unevaluated and not stopped:
            trainer.evaluate()
    finally:
        writer.close()
        for key, value in saved_env.items():  # leave the environment as it was
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return trainer, stopper, rules


def save_artifacts(
    prep: Prepared, trainer: Any, layout: RunLayout, started: str, clock: float,
    log: Any = lambda line: None,
):  # fmt: skip
    """Weights, tokenizer, adapter_info.json and the loss plot; returns the loss summary."""
    template = _saved_chat_template(prep, log)
    _save_weights(trainer.model, prep.processor or prep.tokenizer, layout, template)
    if layout.checkpoints.is_dir() and not any(layout.checkpoints.iterdir()):
        layout.checkpoints.rmdir()
    records = read_metrics(layout.metrics)
    losses = artifacts.loss_summary(records)
    artifacts.plot_history(records, layout.plot)
    state = trainer.state
    info = _info(
        prep.config, prep.plan, prep.data, trainer.model, base=prep.base, origins=prep.origins,
        steps=state.global_step, epochs=round(state.epoch or 0, 4), losses=losses,
        duration_s=round(time.perf_counter() - clock, 1), started=started, finished=now(),
        tokens_seen=state.num_input_tokens_seen,
    )  # fmt: skip
    write_json(layout.info, info)
    # the card peft writes names the base by a path on this machine; ours says what it was
    card = model_card(info, Path(prep.config.output_dir).name, prep.config.adapter != "full")
    write_atomic(layout.card, card)
    return losses


def _tidy(output_dir: Path, log: RunLog) -> None:
    """Before anything else, holding the lock: finish a swap a killed ``--overwrite`` left
    half done, and clear what killed runs left beside this output directory."""
    recovered = recover_swap(output_dir)
    if recovered:
        log(f"note: {recovered}")
    remove_leftovers(
        output_dir.parent,
        f"{output_dir.name}.new-",
        f"{output_dir.name}.old-",
        f"{output_dir.name}.previous-",
    )


def _open_run(planned: Planned, overwrite: bool, log: RunLog) -> RunDir:
    """The run directory: new, replacing a run (moved aside until this one ends), or the one
    being resumed (with what an interrupted write left there cleared, and later metrics
    forgotten)."""
    output_dir = Path(planned.config.output_dir).resolve()
    point = planned.resume_point
    if point is None:
        return RunDir.create(output_dir, overwrite)
    layout = RunLayout(output_dir)
    shutil.rmtree(layout.root / ".weights-staging", ignore_errors=True)  # older versions' name
    for folder in (layout.root, layout.checkpoints):
        for name in remove_leftovers(folder):
            log(f"note: removed {folder / name}, left by an interrupted write")
    step = checkpoint_step(point)
    truncate_metrics(layout, step)
    for name in forget_after(layout, step):
        log(f"note: removed checkpoints/{name}, saved after step {step}")
    log(f"resuming from {point} (step {step})")
    return RunDir(layout)


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
    (``resume_from``: from that checkpoint), refusing if the data, base model, adapter
    shape or training schedule changed. The output directory is held by this process
    alone until the run ends; another process writing it is refused. Pushing the saved
    run to ``hub_model_id`` is the caller's step (``tunelab train`` does it).
    """
    if overwrite and (resume or resume_from):
        raise ConfigError(["--overwrite starts the run again; --resume continues it: choose one"])
    output_dir = Path(loaded.config.output_dir or default_output_dir())
    config = loaded.config.model_copy(update={"output_dir": str(output_dir)})
    loaded = dataclasses.replace(loaded, config=config)
    with exclusive(output_dir), redacted_output():
        return _train(loaded, overwrite, sample_prompts, quiet, bool(resume or resume_from),
                      resume_from)  # fmt: skip


def _way_out(reason: str) -> str:
    """What to change after a stopping rule failed the run."""
    if reason.startswith("frozen"):
        return (
            "the loss stopped changing: a learning_rate far too high kills a model (see the "
            "loss curve), one far too small never moves it"
        )
    if reason.startswith("watchdog"):
        return "try a lower learning_rate, or check that the data suits the model"
    return "try a lower learning_rate"


def _retry_hint(run: RunDir, point: Path | None) -> str:
    """The way out of a failure while the run was preparing, when the error gave none."""
    if point is not None:
        return f"fix that, then continue with the same command (--output {run.final} --resume)"
    if run.replacing:  # a replacement run: the old one is put back
        return f"fix that, then run again with --overwrite (the run in {run.final} was kept)"
    return f"fix that, then run again with --overwrite (the failed run in {run.final} stays)"


def _failure_status(exc: BaseException) -> dict[str, Any]:
    """The state, message and way out a failed or interrupted run records (never a secret,
    never a traceback: that is in train.log)."""
    interrupted = isinstance(exc, (KeyboardInterrupt, RunInterrupted))
    if isinstance(exc, TunelabError):
        message, hint = exc.message, exc.hint
    elif isinstance(exc, KeyboardInterrupt):
        message, hint = "stopped at once by a second Ctrl-C or signal", None
    else:  # a crash: the line the CLI shows
        first = str(exc).strip().splitlines()[:1]
        message = f"{type(exc).__name__}: {first[0]}" if first else type(exc).__name__
        hint = "the traceback is in train.log; TUNELAB_DEBUG=1 shows it on the console"
    return {
        "state": "interrupted" if interrupted else "failed",
        "error": redact(message),
        "hint": redact(hint) if hint else None,
    }


def _train(
    loaded: LoadedConfig, overwrite: bool, sample_prompts: Sequence[str], quiet: bool,
    resume: bool, resume_from: str | None,
) -> RunResult:  # fmt: skip
    log = RunLog(quiet)
    _tidy(Path(loaded.config.output_dir).resolve(), log)
    planned = plan_training(loaded, overwrite, log, resume, resume_from)
    point = planned.resume_point
    run = _open_run(planned, overwrite, log)
    layout = run.layout
    log.attach(layout.log, append=point is not None)
    resolved = redact_data(resolved_dict(planned.config))
    write_atomic(layout.config, yaml.safe_dump(resolved, sort_keys=False))
    status = StatusFile(
        layout.status,
        RunStatus.begin(
            "preparing", doing="loading the model", total_steps=planned.run.steps,
            fingerprint=planned.fingerprint, step=checkpoint_step(point) if point else 0,
        ),
    )  # fmt: skip
    started = status.current.started
    tokens_before = resumed_tokens(point)
    stop_reason = None
    stopper = StopOnSignal()
    try:
        prep = load(planned, sample_prompts, log)
        status.update(state="running", doing=None)
        clock = time.perf_counter()
        trainer, stopper, rules = fit(prep, layout, log, quiet, prep.resume_point, status, stopper)
        steps = trainer.state.global_step
        if stopper.received is not None:
            stop_reason = stopper.reason
            if run.replacing:  # a replacement run: the old one is put back
                raise RunInterrupted(
                    f"stopped by signal {stopper.received} at step {steps}; the run in "
                    f"{run.final} was put back as it was and this replacement was discarded",
                    "run again with --overwrite to replace it",
                )
            raise RunInterrupted(
                f"stopped by signal {stopper.received} at step {steps}; a checkpoint was saved",
                f"continue with the same command plus --output {run.final} --resume",
            )
        if rules.failed:
            kept = not run.replacing
            stop_reason = rules.reason
            raise TrainingFailed(
                f"training failed: {rules.reason}",
                (f"the last good checkpoint (if any) is in {layout.checkpoints}; " if kept else "")
                + _way_out(rules.reason),
            )
        if rules.reason:
            log(f"stopped early, {rules.reason}; keeping the best weights")
            stop_reason = rules.reason
        losses = save_artifacts(prep, trainer, layout, started, clock, log)
        status.end("completed", step=steps, stop_reason=stop_reason)
    except BaseException as exc:
        # Record the failure; but a failure to record it (a full disk) must neither hide
        # this exception nor keep the clean-up from running.
        if status.current.state == "preparing" and isinstance(exc, TunelabError) and not exc.hint:
            exc.hint = _retry_hint(run, point)
        try:
            log.write(traceback.format_exc())
            reached = {} if stopper.step is None else {"step": stopper.step}
            status.end(**_failure_status(exc), stop_reason=stop_reason or stopper.reason,
                       **reached)  # fmt: skip
        except Exception as problem:  # noqa: BLE001
            with contextlib.suppress(Exception):
                log.write(f"warning: could not record the failure in {layout.status}: {problem}")
        finally:
            if run.replacing:  # its log goes with it: write nothing into the old run
                log.path = None
            run.abandon()
        raise
    layout = run.finish()
    log.path = layout.log
    duration = time.perf_counter() - clock
    for sample in prep.samples:
        sample.after = generate(trainer.model, prep.tokenizer, sample.prompt)
    final, best = losses.get("final_loss", float("nan")), losses.get("best_eval_loss")
    tokens = trainer.state.num_input_tokens_seen - tokens_before  # this session's only
    log(
        f"done: {steps} steps in {duration:.0f}s "
        f"({tokens / duration:.0f} tokens/s), final loss {final:.4f}"
        + (f", best validation loss {best:.4f}" if best is not None else "")
    )
    log(f"saved: {layout.root}")
    return RunResult(
        layout.root, steps, losses, duration, prep.samples, trainer.model, prep.tokenizer
    )
