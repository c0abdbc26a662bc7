"""Push an adapter, a merged model or a GGUF export to the Hugging Face Hub.

The token comes only from the environment (``HF_TOKEN``) or ``hf auth login``'s store;
before anything is uploaded the Hub is checked to be reachable with a short timeout,
so a machine without network gets an error in seconds instead of a hang.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.model import card
from tunelab.rundir import RunLayout, files_to_push, read_json


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
    from tunelab.network import hub_problem

    problem = hub_problem()
    if problem:
        raise TunelabError(
            f"cannot push: {problem}",
            "check the network connection; the files stay here, so push again later with "
            "`tunelab push`",
        )


def model_card(folder: Path, repo_id: str) -> str:
    """A README.md for the repository, from what the run recorded."""
    title = repo_id.split("/")[-1]
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if ggufs:
        return "\n".join([
            "---", "library_name: gguf", "tags: [tunelab]", "---", "", f"# {title}", "",
            f"GGUF files exported by tunelab: {', '.join(ggufs)}; the Modelfile is for Ollama.",
        ]) + "\n"  # fmt: skip
    info = read_json(RunLayout(folder).info) or {
        "base_model": read_json(folder / "config.json").get("_name_or_path", "")
    }
    return card.model_card(info, title, adapter=(folder / "adapter_config.json").is_file())


def adapter_config(folder: Path) -> bytes | None:
    """The adapter_config.json to upload: naming the base by its Hub id, where the run's
    record has one, instead of a directory on this machine; None for no adapter."""
    path = folder / "adapter_config.json"
    if not path.is_file():
        return None
    config = read_json(path)
    hub_id = card.recorded_base(read_json(RunLayout(folder).info)).get("hub_id")
    if hub_id:
        config["base_model_name_or_path"] = hub_id
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def push(folder: str | Path, repo_id: str, private: bool = False, log=print) -> str:
    """Upload ``folder`` (a run's adapter, a merged model or an export) to ``repo_id`` in
    one commit; returns the repository's address."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise TunelabError(f"{folder}: no such directory", "give a run, merged or export folder")
    files = files_to_push(folder)
    if not files:
        raise TunelabError(f"{folder}: nothing to push (the folder is empty)")
    api = HfApi(token=hub_token())
    check_reachable()
    # a run's card is made from its record (peft's template card names a local path)
    own_card = RunLayout(folder).info.is_file() or not (folder / "README.md").is_file()
    rewritten = {"adapter_config.json": adapter_config(folder)}
    if own_card:
        rewritten["README.md"] = model_card(folder, repo_id).encode("utf-8")
    operations = [
        CommitOperationAdd(p.relative_to(folder).as_posix(), str(p))
        for p in files
        if p.relative_to(folder).as_posix() not in rewritten
    ]
    operations += [CommitOperationAdd(name, data) for name, data in rewritten.items() if data]
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
