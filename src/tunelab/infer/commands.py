"""The after-training commands of `tunelab`: chat, generate, eval, merge, export, push, runs.

Each ``cmd_*`` is thin: it reads its arguments, calls the module that does the work and
prints the result. ``add_arguments`` declares each command's options.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.textfile import read_text


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _sampling(args: argparse.Namespace):
    from tunelab.model.generate import Sampling

    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def _bits(args: argparse.Namespace) -> int | None:
    return 4 if args.load_in_4bit else 8 if args.load_in_8bit else None


def _session(args: argparse.Namespace, run: str | None):
    """Load what a chat or generate command points at; returns (loaded, labels to answer)."""
    from tunelab.infer.load import BASE, latest_run, load, resolve_target

    targets = []
    if run and args.adapter:
        raise TunelabError("both a run and --adapter given", "give one of them")
    if run or args.adapter:
        targets = [resolve_target(run or args.adapter, args.checkpoint)]
    elif not args.model and (latest := latest_run()):
        _log(f"using the latest finished run, {latest} (--model M for a base model instead)")
        targets = [resolve_target(latest, args.checkpoint)]
    elif args.checkpoint:
        raise TunelabError("--checkpoint needs a run", "give the run directory too")
    if args.compare and not targets:
        raise TunelabError("--compare needs a trained run or --adapter to compare with the base")
    loaded = load(targets, args.model, with_base=args.compare, bits=_bits(args), log=_log)
    what = targets[0].label if targets else f"{loaded.base_name} (base model)"
    _log(f"loaded {what}")
    return loaded, ([BASE] if args.compare else []) + [t.label for t in targets] or [BASE]


def cmd_chat(args: argparse.Namespace) -> int:
    from tunelab.infer.chat import Chat, run_chat

    loaded, labels = _session(args, args.run_dir)
    chat = Chat(loaded, labels, _sampling(args), args.system)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print("Type a message; /help lists commands, /quit (or Ctrl-D) leaves.")
        run_chat(chat)
    else:
        run_chat(chat, sys.stdin)
    return 0


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise TunelabError(f"--file {path}: no such file")
        prompts += [line for line in read_text(path).splitlines() if line.strip()]
    if not prompts and not sys.stdin.isatty():
        prompts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not prompts:
        raise TunelabError("no prompt", "give prompts as arguments, with --file, or on stdin")
    return prompts


def _names_a_run(text: str) -> bool:
    """Whether a positional argument is a run directory (or RUN@CHECKPOINT), not a prompt."""
    head = text.rpartition("@")[0] if "@" in text else ""
    return Path(text).expanduser().is_dir() or bool(head and Path(head).expanduser().is_dir())


def cmd_generate(args: argparse.Namespace) -> int:
    from tunelab.model.generate import prompt_messages, reply

    if not args.run_dir and args.prompt and _names_a_run(args.prompt[0]):
        args.run_dir = args.prompt.pop(0)  # `generate RUN PROMPT...`, as chat, eval and merge
    prompts = _prompts(args)
    loaded, labels = _session(args, args.run_dir)
    results = []
    for prompt in prompts:
        answers = {}
        for label in labels:
            with loaded.use(label) as model:
                messages = prompt_messages(prompt, args.system)
                answers[label] = reply(model, loaded.tokenizer, messages, _sampling(args))
        results.append((prompt, answers))
        if args.json:
            record = {"prompt": prompt, "completion": answers[labels[-1]]}
            if args.compare:
                record["base"] = answers[labels[0]]
            print(json.dumps(record, ensure_ascii=False), flush=True)
        elif not args.compare:
            print(f"> {prompt}\n{answers[labels[-1]]}\n", flush=True)
    if args.compare and not args.json:
        _side_by_side(results, labels)
    return 0


def _side_by_side(results: list[tuple[str, dict[str, str]]], labels: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(show_lines=True)
    table.add_column("prompt")
    for label in labels:
        table.add_column(Text(label))
    for prompt, answers in results:  # Text: model output is never read as markup
        table.add_row(Text(prompt), *(Text(answers[label]) for label in labels))
    Console().print(table)


def cmd_eval_perplexity(args: argparse.Namespace) -> int:
    from tunelab.infer import perplexity as px
    from tunelab.infer.load import BASE, load, resolve_target
    from tunelab.model.generate import context_limit

    targets = [resolve_target(t, args.checkpoint) for t in args.targets]
    if args.checkpoint and len(targets) != 1:
        raise TunelabError("--checkpoint picks one run's checkpoint", "write RUN@CHECKPOINT")
    loaded = load(targets, args.model, with_base=args.base, bits=_bits(args), log=_log)
    stream = px.token_stream(args.data, loaded.tokenizer, args.dataset_format)
    rows = []
    for label in loaded.labels:
        with loaded.use(label) as model:
            context = context_limit(model)
            if args.max_length and context and args.max_length > context:
                raise TunelabError(
                    f"--max-length {args.max_length}: the model reads at most {context} tokens",
                    f"use --max-length {context} or less",
                )
            max_length = args.max_length or min(context or px.DEFAULT_MAX_LENGTH,
                                                px.DEFAULT_MAX_LENGTH)  # fmt: skip
            stride = args.stride or max(1, min(512, max_length // 2))
            _log(f"scoring {label} on {args.data} ({stream.scored} tokens) ...")
            ppl, tokens = px.perplexity(model, stream, max_length, stride)
        adapter = "-" if label == BASE else label
        row = px.result_row(loaded.base_name, adapter, args.data, ppl, tokens, stride, max_length)
        rows.append({**row, "comment": args.comment or ""})
    table = px.table_path(args.table, [t.run for t in targets if t.run])
    everything = px.append_rows(table, rows)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        px.print_table(everything, len(rows), f"perplexity ({table})")
    return 0


def _check_push(args: argparse.Namespace) -> None:
    """Before a long merge or export: can the result be pushed at all?"""
    if args.push_to_hub:
        from tunelab.infer.hub import check_reachable, hub_token

        hub_token()
        check_reachable()


def cmd_merge(args: argparse.Namespace) -> int:
    from tunelab.infer.merge import merge

    _check_push(args)
    out = merge(args.run_dir, args.output, args.checkpoint)
    print(f"merged model saved in {out} (loads with AutoModelForCausalLM.from_pretrained)")
    return _push_after(args, out)


def cmd_export(args: argparse.Namespace) -> int:
    from tunelab.infer.export import export_gguf

    _check_push(args)
    done = export_gguf(args.run_dir, args.output, args.quant, args.checkpoint, log=_log)
    print(f"GGUF ({args.quant}, {done.tensors} tensors, {done.size_mb:.1f} MB): {done.gguf}")
    print(f"Ollama: cd {done.gguf.parent} && ollama create {done.gguf.stem} -f Modelfile")
    return _push_after(args, done.gguf.parent)


def _push_after(args: argparse.Namespace, folder: Path) -> int:
    if not args.push_to_hub:
        return 0
    from tunelab.infer.hub import push

    print(f"pushed to {push(folder, args.push_to_hub, args.private, log=_log)}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from tunelab.infer.hub import push

    print(f"pushed to {push(args.dir, args.repo, args.private, log=_log)}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from tunelab.rundir import list_runs

    runs = list_runs(Path(args.dir))
    if args.json:
        print(json.dumps(runs, indent=1))
        return 0
    if not runs:
        print(f"no runs under {args.dir}")
    for r in runs:
        best = f"{r['best_eval_loss']:.4f}" if r["best_eval_loss"] is not None else "-"
        print(
            f"{r['run']}\n  {r['state']}, {r['date']}, {r['steps']} steps, base {r['base_model']}, "
            f"data {r['data']}, best val loss {best}\n  resumable: {r['resumable']}"
        )
        if r["problem"]:
            print(f"  problem: {r['problem']}")
    return 0


def _model_options(p: argparse.ArgumentParser, run_flag: bool) -> None:
    if run_flag:
        p.add_argument("--run", dest="run_dir", help="a trained run directory")
    else:
        p.add_argument("run_dir", nargs="?", help="a trained run directory (default: the latest)")
    p.add_argument("--checkpoint", help="a checkpoint of the run instead: best, last or N")
    p.add_argument("--model", help="a base model (default: the run's, else the built-in one)")
    p.add_argument("--adapter", help="an adapter directory to apply to --model")
    p.add_argument("--compare", action="store_true", help="answer with the base model too")
    _quant_options(p)
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with temperature)")
    p.add_argument("--seed", type=int, help="seed for sampling")


def _quant_options(p: argparse.ArgumentParser) -> None:
    bits = p.add_mutually_exclusive_group()
    bits.add_argument("--load-in-4bit", action="store_true", help="4-bit base (CUDA GPU)")
    bits.add_argument("--load-in-8bit", action="store_true", help="8-bit base (CUDA GPU)")


def _push_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--push-to-hub", metavar="REPO", help="then upload it to this Hub repository")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")


def add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    """The options of the after-training command ``name``."""
    if name == "serve-model":
        p.add_argument("run_dir", nargs="?", help="a trained run directory (default: the latest)")
        p.add_argument("--checkpoint", help="a checkpoint of the run instead: best, last or N")
        p.add_argument("--model", help="a base model (default: the run's)")
        p.add_argument("--adapter", help="an adapter directory to apply to --model")
        p.add_argument("--compare", action="store_true",
                       help="serve the base model too, as model 'base'")  # fmt: skip
        _quant_options(p)
        p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
        p.add_argument("--port", type=int, default=8001, help="port (8001)")
        p.add_argument("--token", help="the token clients give as their API key (default: "
                       "$TUNELAB_TOKEN); required on any address but loopback")  # fmt: skip
        return
    if name == "chat":
        _model_options(p, run_flag=False)
    elif name == "generate":
        p.add_argument(
            "prompt", nargs="*", metavar="[RUN] PROMPT",
            help="a run directory (or --run), then prompts (or --file, or lines on stdin)",
        )  # fmt: skip
        _model_options(p, run_flag=True)
        p.add_argument("--file", help="a file with one prompt per line")
        p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    elif name == "eval perplexity":
        p.add_argument("targets", nargs="*", metavar="RUN",
                       help="runs, checkpoints (RUN@best, RUN@N) or adapters to score")  # fmt: skip
        p.add_argument("--data", required=True, help="a .txt file or any supported dataset")
        p.add_argument("--dataset-format", help="format of --data (default: auto; .txt is raw)")
        p.add_argument("--checkpoint", help="with one RUN: score this checkpoint of it")
        p.add_argument("--model", help="the base model (default: the runs')")
        p.add_argument("--base", action="store_true", help="score the base model too")
        p.add_argument("--stride", type=int, help="window step in tokens (512, or half a window)")
        p.add_argument("--max-length", type=int, help="window length (the model's, up to 2048)")
        p.add_argument("--comment", help="a note kept with the results")
        p.add_argument("--table", help="results table (default: RUN/evaluations.csv)")
        p.add_argument("--json", action="store_true", help="print this evaluation's rows")
        _quant_options(p)
    elif name in ("merge", "export"):
        p.add_argument("run_dir", help="a finished run directory")
        p.add_argument("--checkpoint", help="use this checkpoint of the run: best, last or N")
        p.add_argument("--output", required=True, help="a new directory for the result")
        _push_option(p)
        if name == "export":
            p.add_argument("--format", default="gguf", choices=["gguf"], help="file format")
            p.add_argument("--quant", default="f16", help="f16 (default), q8_0, bf16 or f32")
    elif name == "push":
        p.add_argument("dir", help="a run, merged model or export directory")
        p.add_argument("--repo", required=True, help="the Hub repository, user/name")
        p.add_argument("--private", action="store_true", help="create it private")
    elif name == "runs":
        p.add_argument("dir", nargs="?", default="outputs", help="folder of runs (default outputs)")
        p.add_argument("--json", action="store_true", help="print one JSON list")


def cmd_serve_model(args: argparse.Namespace) -> int:

    import uvicorn

    from tunelab.access import Access, server_token
    from tunelab.infer.openai_api import create_model_app

    token = server_token(args.host, args.token)
    loaded, labels = _session(args, args.run_dir)
    app = create_model_app(loaded, labels[-1], Access(token))
    _log(f"OpenAI chat completions on http://{args.host}:{args.port}/v1 "
         f"(models: {', '.join(loaded.labels)})")  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


COMMANDS: dict[str, tuple[Any, str]] = {
    "chat": (cmd_chat, "chat with a trained run (or a base model) in the terminal"),
    "generate": (cmd_generate, "answer prompts with a trained run or a base model"),
    "eval perplexity": (cmd_eval_perplexity, "perplexity of base models, runs and checkpoints"),
    "merge": (cmd_merge, "merge a run's adapter into its base model as a standard model"),
    "export": (cmd_export, "export a run as a GGUF file with an Ollama Modelfile"),
    "push": (cmd_push, "upload a run, merged model or export to the Hugging Face Hub"),
    "runs": (cmd_runs, "list trained runs and whether each can be resumed"),
    "serve-model": (cmd_serve_model, "serve a run over the OpenAI chat-completions protocol"),
}
