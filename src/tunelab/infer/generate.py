"""Answer prompts with a base model or a trained run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.config.locations import resolve_model
from tunelab.errors import TunelabError
from tunelab.train.models import is_multimodal, load_model, load_tokenizer, model_location
from tunelab.train.rundir import RunLayout, read_json


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
    """The model's answer to ``prompt``, rendered with its chat template.

    ``temperature`` 0 is greedy decoding (deterministic); above 0 samples, with ``top_p``
    and ``seed``.
    """
    import torch

    sampling: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if seed is not None:
            torch.manual_seed(seed)

    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    if was_training:
        model.train()
    new_tokens = output[0][inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def load_base(name: str, adapter: str | None = None) -> tuple[Any, Any]:
    """A base model (by any ``base_model`` name), optionally with an adapter directory."""
    from tunelab.config.locations import model_problem

    problem = model_problem(name)
    if problem:
        raise TunelabError(f"--model: {problem}")
    ref = resolve_model(name)
    location = model_location(ref)
    model = load_model(location, ref, multimodal=is_multimodal(location, ref))
    tokenizer = load_tokenizer(location, ref)
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise TunelabError(f"--adapter {adapter}: no adapter_config.json there")
        model = PeftModel.from_pretrained(model, adapter)
    return model, tokenizer


def load_run(run_dir: str | Path) -> tuple[Any, Any]:
    """The base model with a run's adapter applied (or its fully fine-tuned weights)."""
    layout = RunLayout(Path(run_dir))
    info = read_json(layout.info)
    if layout.full_weights.exists():
        ref = resolve_model(str(layout.root))
        return load_model(str(layout.root), ref), load_tokenizer(str(layout.root), ref)
    if not layout.adapter_config.exists():
        raise TunelabError(
            f"{run_dir}: no adapter here (adapter_config.json is missing)",
            "give the output_dir of a finished `tunelab train` run",
        )
    from peft import PeftModel

    recorded = read_json(layout.adapter_config).get("base_model_name_or_path")
    name = recorded if recorded and Path(recorded).is_dir() else info.get("base_model")
    if not name:
        raise TunelabError(f"{run_dir}: the adapter does not say which base model it belongs to")
    ref = resolve_model(name)
    location = model_location(ref)
    base = load_model(location, ref, multimodal=is_multimodal(location, ref))
    tokenizer = load_tokenizer(str(layout.root), ref)
    return PeftModel.from_pretrained(base, str(layout.root)), tokenizer
