"""Push an adapter, a merged model or a GGUF export to the Hugging Face Hub.

The token comes only from the environment (``HF_TOKEN``) or ``hf auth login``'s store;
before anything is uploaded the Hub is checked to be reachable with a short timeout,
so a machine without network gets an error in seconds instead of a hang.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from tunelab.config import BUILTIN_MODEL
from tunelab.errors import TunelabError
from tunelab.train.rundir import RunLayout, read_json

BUILTIN_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CONNECT_TIMEOUT = 10.0
# Run-directory parts that are for the machine that trained, not for a model repository.
NOT_PUSHED = frozenset({"checkpoints", "logs", "status.json", "train.log"})


def hub_token() -> str:
    """The Hub token from HF_TOKEN or the stored login; a clear error when there is none."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise TunelabError(
            "pushing to the Hugging Face Hub needs a token, and none is set",
            "set HF_TOKEN (a write token from https://huggingface.co/settings/tokens) or run "
            "`hf auth login`",
        )
    return token


def check_reachable() -> None:
    """Fail fast, with the reason, when the Hub cannot be reached or is switched off."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise TunelabError("HF_HUB_OFFLINE is set: the Hub is switched off", "unset HF_HUB_OFFLINE")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # the proxy decides; a direct connection would prove nothing
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise TunelabError(
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT}: {exc}",
            "check the network connection; the files stay here, so push again later with "
            "`tunelab push`",
        ) from None


def _pushed(relative: Path) -> bool:
    return not any(part in NOT_PUSHED or part.startswith(".") for part in relative.parts)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and _pushed(p.relative_to(folder)))


def model_card(folder: Path, repo_id: str) -> str:
    """A README.md for the repository, from what the run recorded."""
    info = read_json(RunLayout(folder).info)
    base = info.get("base_model") or read_json(folder / "config.json").get("_name_or_path", "")
    base = BUILTIN_HUB_ID if base.lower() == BUILTIN_MODEL.lower() else base
    adapter = (folder / "adapter_config.json").is_file()
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    library = "peft" if adapter else "gguf" if ggufs else "transformers"
    head = ["---", f"library_name: {library}", "tags: [tunelab]"]
    if base and "/" in base and not Path(base).exists():
        head.append(f"base_model: {base}")
    data = ", ".join(Path(d["path"]).name for d in info.get("datasets") or []) or "its own data"
    losses = info.get("losses") or {}
    lines = [*head, "---", "", f"# {repo_id.split('/')[-1]}", ""]
    if ggufs:
        lines.append(
            f"GGUF files exported by tunelab: {', '.join(ggufs)}; the Modelfile is for Ollama."
        )
    else:
        what = "A LoRA adapter" if adapter else "A fine-tuned model"
        lines.append(f"{what} for `{base or 'its base model'}`, trained with tunelab on {data}.")
    if losses:
        lines += ["", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in losses.items() if v is not None]
    return "\n".join(lines) + "\n"


def push(folder: str | Path, repo_id: str, private: bool = False, log=print) -> str:
    """Upload ``folder`` (a run's adapter, a merged model or an export) to ``repo_id`` in
    one commit; returns the repository's address."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise TunelabError(f"{folder}: no such directory", "give a run, merged or export folder")
    files = _files(folder)
    if not files:
        raise TunelabError(f"{folder}: nothing to push (the folder is empty)")
    api = HfApi(token=hub_token())
    check_reachable()
    # a run's card is made from its record (peft's template card names a local path)
    own_card = RunLayout(folder).info.is_file() or not (folder / "README.md").is_file()
    operations = [
        CommitOperationAdd(p.relative_to(folder).as_posix(), str(p))
        for p in files
        if not (own_card and p == folder / "README.md")
    ]
    if own_card:
        card = model_card(folder, repo_id).encode("utf-8")
        operations.append(CommitOperationAdd("README.md", card))
    log(f"pushing {len(files)} files from {folder} to {repo_id} ...")
    try:
        # None keeps the account's default (which may be private)
        repo = api.create_repo(repo_id, private=private or None, exist_ok=True)
        api.create_commit(repo_id, operations, commit_message="Upload from tunelab")
    except Exception as exc:  # the Hub client raises many kinds (HTTP, auth, validation)
        raise TunelabError(
            f"pushing to {repo_id} failed: {type(exc).__name__}: {exc}",
            "check the repository id (user/name) and that the token may write to it",
        ) from None
    return str(repo)
