"""The benchmark: tunelab against what users would run instead, on the same work.

    python benchmarks/run.py [--quick] [--out DIR] [--model DIR] [--examples N]

Each contender trains one epoch of LoRA (rank 16, all linear layers) over the same
generated alpaca-style examples in a process of its own, one after another: tunelab with
its defaults for the hardware, TRL's SFTTrainer with its defaults, and transformers'
Trainer + peft padding each batch to its longest sample (unsloth on a GPU only). The
table (Markdown and JSON) goes to --out; benchmarks/README.md says what each column means.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONTENDERS = ("tunelab", "trl", "plain")
HELDOUT = 24  # examples every trained model is scored on, the same for all
LABELS = {
    "tunelab": "tunelab (defaults)",
    "trl": "TRL SFTTrainer (defaults)",
    "plain": "transformers Trainer + peft",
    "unsloth": "unsloth",
}

WORDS = (
    "the model data train time value system water people number world market energy "
    "report answer question example result table step change light power sound field "
    "country city river history science language music paper letter story plant animal "
    "simple quick careful important different small large early recent common general "
    "explain describe compare write list summarize translate classify rewrite suggest "
    "because while although however therefore often usually always rarely sometimes "
    "measure build follow improve reduce increase create remove choose keep show find "
    "student teacher doctor engineer farmer writer customer manager player artist"
).split()
TASKS = (
    "Explain", "Summarize", "Write a short story about", "List three facts about",
    "Compare", "Describe", "Give advice on", "Translate into plain words:", "Classify",
    "Rewrite the following text about",
)  # fmt: skip


def _sentence(rng: random.Random, words: int) -> str:
    picked = [rng.choice(WORDS) for _ in range(max(words, 1))]
    return " ".join(picked).capitalize() + rng.choice(".....?!")


def _text(rng: random.Random, words: int) -> str:
    parts, left = [], words
    while left > 0:
        n = min(left, rng.randint(6, 18))
        parts.append(_sentence(rng, n))
        left -= n
    return " ".join(parts)


def _log_uniform(rng: random.Random, low: float, high: float) -> int:
    return round(math.exp(rng.uniform(math.log(low), math.log(high))))


def make_examples(n: int, seed: int = 0, scale: float = 1.0) -> list[dict[str, str]]:
    """``n`` alpaca rows with a realistic spread of lengths, the same for the same seed:
    instructions of 4-30 words, an input on about half of them (8-150 words) and outputs
    of about 10-400 tokens (log-uniform, so short answers are common and long ones occur).
    ``scale`` shrinks every length (for tiny test models)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        instruction = f"{rng.choice(TASKS)} {topic}. " + _text(
            rng, max(1, round(scale * rng.randint(2, 26)))
        )
        extra = _text(rng, round(scale * _log_uniform(rng, 8, 150))) if rng.random() < 0.5 else ""
        # about 1.3 tokens per word with SmolLM2's tokenizer
        output = _text(rng, max(2, round(scale * _log_uniform(rng, 10, 400) / 1.3)))
        rows.append({"instruction": f"[{i}] {instruction}", "input": extra, "output": output})
    return rows


def sample_lengths(model: str, rows: list[dict[str, str]], sequence_len: int) -> list[int]:
    """Tokens per sample (the chat template applied, cut at sequence_len), for the FLOPs."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(HERE))
    from probe import user_text

    tokenizer = AutoTokenizer.from_pretrained(model)
    lengths = []
    for row in rows:
        messages = [
            {"role": "user", "content": user_text(row)},
            {"role": "assistant", "content": row["output"]},
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        lengths.append(
            min(len(tokenizer(text, add_special_tokens=False)["input_ids"]), sequence_len)
        )
    return lengths


def matmul_peak(device: str, n: int | None = None) -> dict[str, Any]:
    """The best of several large square matmuls: fp32 on a CPU, bf16 on a GPU (FLOP/s).
    On this 2-core CPU 2048x2048 reaches about 55% of what 4096x4096 does, so 4096."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = n or (8192 if device == "cuda" else 4096)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = math.inf
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return {
        "dtype": str(dtype).removeprefix("torch."), "size": n, "threads": torch.get_num_threads(),
        "flops": 2 * n**3 / best,
    }  # fmt: skip


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def builtin_model_dir() -> str:
    """The built-in model (SmolLM2-135M-Instruct) as a transformers checkpoint: the one
    tunelab itself converts from the GGUF file once and keeps in its cache."""
    from tunelab.model.loading import builtin_gguf, convert_gguf

    return str(convert_gguf(builtin_gguf()))


def tunelab_config(
    path: Path, spec: dict[str, Any], micro_batch_size: int | None, settings: list[str] = ()
) -> None:
    """tunelab's config for the work: the workload only, plus ``settings`` ('key=value',
    the value read as YAML) to compare a setting against tunelab's own choice."""
    import yaml

    config = {
        "base_model": spec["model"],
        "datasets": [{"path": spec["data"], "type": "alpaca"}],
        "adapter": "lora",
        "lora_r": spec["lora_r"],
        "lora_target_linear": True,
        "sequence_len": spec["sequence_len"],
        "num_epochs": 1,
        "val_set_size": 0,
        "force_epochs": True,
        "logging_steps": 1,
        "seed": spec["seed"],
    }
    if micro_batch_size:
        config["micro_batch_size"] = micro_batch_size
    for item in settings:
        key, _, value = item.partition("=")
        config[key.strip()] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def run_contender(name: str, spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Start ``child.py NAME`` and wait for it; its probe record plus its peak RSS."""
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    probe_path = work / f"{name}.probe.json"
    probe_path.unlink(missing_ok=True)
    log_path = work / f"{name}.log"
    env = {**os.environ, "BENCH_PROBE": str(probe_path), "TOKENIZERS_PARALLELISM": "false",
           "BENCH_HELDOUT": spec["heldout"], "BENCH_MODEL": spec["model"],
           "BENCH_SEQUENCE_LEN": str(spec["sequence_len"])}  # fmt: skip
    print(f"== {LABELS[name]} (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        env["BENCH_T0"] = repr(time.time())
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "child.py"), name, str(spec_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
    if proc.returncode != 0 or not probe_path.is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        print(tail, file=sys.stderr)
        return {"name": name, "error": f"exit status {proc.returncode}; see {log_path}"}
    record = json.loads(probe_path.read_text())
    record.update(name=name, wall_s=wall, peak_rss_mb=usage.ru_maxrss / 1024)
    return record


def summarize(record: dict[str, Any], flops_per_token: float, attention_flops: float,
              peak: float) -> dict[str, Any]:  # fmt: skip
    if "error" in record:
        return {"contender": LABELS[record["name"]], "name": record["name"], **record}
    steps = record["steps"]
    epoch_s = steps[-1][0] - record["train_begin_s"]
    tokens = record["tokens"]
    flops = flops_per_token * tokens + attention_flops
    losses = record["losses"]
    return {
        "contender": LABELS[record["name"]],
        "name": record["name"],
        "tokens": tokens,
        "tokens_per_s": tokens / epoch_s,
        "epoch_s": epoch_s,
        "first_step_s": steps[0][0],
        "total_s": record["wall_s"],
        "peak_memory_mb": record["peak_rss_mb"],
        "mfu": flops / epoch_s / peak,
        "loss_mean": sum(losses) / len(losses) if losses else math.nan,
        "loss_last": losses[-1] if losses else math.nan,
        "heldout_loss": record.get("heldout_loss") or math.nan,
        "steps": len(steps),
        "micro_batch_size": record["micro_batch_size"],
        "gradient_accumulation_steps": record["gradient_accumulation_steps"],
        "learning_rate": record["learning_rate"],
        "gradient_checkpointing": record["gradient_checkpointing"],
        "bf16": record["bf16"],
    }


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = (
        "| contender | tokens/s | s/epoch | first step (s) | peak RSS (MiB) | MFU | "
        "loss (epoch mean) | held-out loss | tokens | batch | grad. ckpt | bf16 |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|\n"
    )
    lines = []
    for r in rows:
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or r.get("error")
            lines.append(f"| {r['contender']} | {why} |" + " |" * 11)
            continue
        lines.append(
            f"| {r['contender']} | {r['tokens_per_s']:.1f} | {r['epoch_s']:.1f} | "
            f"{r['first_step_s']:.1f} | {r['peak_memory_mb']:.0f} | {100 * r['mfu']:.1f}% | "
            f"{r['loss_mean']:.4f} | {r['heldout_loss']:.4f} | {r['tokens']} | "
            f"{r['micro_batch_size']}x{r['gradient_accumulation_steps']} | "
            f"{'yes' if r['gradient_checkpointing'] else 'no'} | {'yes' if r['bf16'] else 'no'} |"
        )
    peak = meta["peak"]
    notes = (
        f"\nMatmul peak: {peak['flops'] / 1e9:.1f} GFLOP/s ({peak['dtype']}, "
        f"{peak['size']}x{peak['size']}, {peak['threads']} threads). Model: {meta['model']} "
        f"({meta['parameters'] / 1e6:.1f} M parameters), {meta['examples']} examples, "
        f"sequence length {meta['sequence_len']}, LoRA r{meta['lora_r']} on all linear layers.\n"
        f"Machine: {meta['machine']}; load average (1 min) {meta['load_average']['start'][0]:.1f}"
        f" at the start, {meta['load_average']['end'][0]:.1f} at the end.\n"
    )
    ratios = "".join(f"\n{line}" for line in meta["ratios"])
    return head + "\n".join(lines) + "\n" + notes + ratios + "\n"


def ratio_lines(rows: list[dict[str, Any]]) -> list[str]:
    by = {r["name"]: r for r in rows if "tokens_per_s" in r}
    if "tunelab" not in by:
        return []
    lines = []
    for other in ("trl", "plain"):
        if other in by:
            t, o = by["tunelab"], by[other]
            lines.append(
                f"tunelab/{other}: {t['tokens_per_s'] / o['tokens_per_s']:.2f}x tokens/s, "
                f"{t['peak_memory_mb'] / o['peak_memory_mb']:.2f}x peak memory, "
                f"{t['first_step_s'] / o['first_step_s']:.2f}x time to first step"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 examples instead of 256")
    parser.add_argument("--out", default="benchmarks/results", help="where the table goes")
    parser.add_argument("--model", help="a transformers model directory (default: built-in)")
    parser.add_argument("--examples", type=int, help="how many examples (default 256)")
    parser.add_argument("--sequence-len", type=int, default=512)
    parser.add_argument("--length-scale", type=float, default=1.0, help="shrink the examples")
    parser.add_argument("--micro-batch-size", type=int, help="default: tunelab's choice")
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a tunelab setting over its own choice (e.g. bf16=false)",
    )
    parser.add_argument("--matmul-size", type=int, help="the peak's matmul (default 4096 on CPU)")
    args = parser.parse_args(argv)
    if args.set:
        LABELS["tunelab"] = f"tunelab ({', '.join(args.set)})"

    import torch

    started = time.perf_counter()
    load_before = os.getloadavg()
    out = Path(args.out).resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = args.examples or (64 if args.quick else 256)
    model = str(Path(args.model).resolve()) if args.model else builtin_model_dir()
    rows = make_examples(n, seed=0, scale=args.length_scale)
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    heldout = work / "heldout.jsonl"  # every contender's model is scored on these after training
    held = make_examples(HELDOUT, seed=1, scale=args.length_scale)
    heldout.write_text("".join(json.dumps(r) + "\n" for r in held))
    spec = {
        "model": model, "data": str(data), "sequence_len": args.sequence_len, "seed": args.seed,
        "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "heldout": str(heldout),
    }  # fmt: skip
    peak = matmul_peak(device, args.matmul_size)
    print(f"matmul peak: {peak['flops'] / 1e9:.1f} GFLOP/s ({peak['dtype']}, {device})")

    records = {}
    batch = (args.micro_batch_size, 1, None)
    for name in ["tunelab", *[c for c in args.only if c != "tunelab"]]:
        if name not in args.only:
            continue
        s = {**spec, "run_dir": str(work / name)}
        if name == "tunelab":
            config = work / "tunelab.yaml"
            tunelab_config(config, s, args.micro_batch_size, args.set)
            s["config"] = str(config)
        else:
            mbs, ga, lr = batch
            s.update(micro_batch_size=mbs or 4, gradient_accumulation_steps=ga,
                     learning_rate=lr or 2e-4)  # fmt: skip
        records[name] = run_contender(name, s, work)
        if name == "tunelab" and "error" not in records[name]:
            r = records[name]
            # the same effective batch and peak learning rate for the others
            batch = (r["micro_batch_size"], r["gradient_accumulation_steps"], r["learning_rate"])

    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(model)
    mc = getattr(mc, "text_config", mc)
    lengths = sample_lengths(model, rows, args.sequence_len)
    # causal attention: QK^T and AV, forward 2*s^2*d per layer, backward twice that
    attention = 6 * mc.num_hidden_layers * mc.hidden_size * sum(s * s for s in lengths)
    params = next((r["base_parameters"] for r in records.values() if "base_parameters" in r), 0)
    table = [summarize(records[c], 4 * params, attention, peak["flops"]) for c in records]
    if device == "cpu":
        table.append({"contender": LABELS["unsloth"], "name": "unsloth", "skipped": "GPU only"})
    else:
        table.append({"contender": LABELS["unsloth"], "name": "unsloth",
                      "skipped": "not yet in the harness"})  # fmt: skip
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, {platform.machine()}",
        "load_average": {"start": load_before, "end": os.getloadavg()},
        "device": device, "torch": torch.__version__, "model": model, "parameters": params,
        "examples": n, "sample_tokens": sum(lengths), "sequence_len": args.sequence_len,
        "lora_r": 16, "peak": peak, "harness_s": None, "ratios": ratio_lines(table),
    }  # fmt: skip
    meta["harness_s"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": table}, indent=1))
    (out / "results.md").write_text(markdown(table, meta))
    print()
    print(markdown(table, meta), end="")
    print(f"harness took {meta['harness_s']:.0f} s; table in {out}/results.md and results.json")
    return 0 if all("error" not in r for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
