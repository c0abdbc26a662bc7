"""Experiment trackers (Weights & Biases, MLflow) through the Trainer's own integrations.

Before a run starts, each tracker the config asks for is checked in seconds: its package
is installed, W&B has a key, and an online service answers. Otherwise the integration
would fail only after the model has loaded (W&B after minutes of retries).
"""

from __future__ import annotations

import importlib.util
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from tunelab.config.schema import TuneConfig
from tunelab.network import unreachable
from tunelab.redact import redact

INSTALL = "pip install 'tunelab[tracking]'"
WANDB_HOST = "https://api.wandb.ai"


def trackers(config: TuneConfig) -> list[str]:
    """The trainer's own experiment-tracker integrations the config asks for."""
    out = []
    if config.wandb_project or config.wandb_mode in ("online", "offline"):
        out.append("wandb")
    if config.mlflow_tracking_uri or config.mlflow_experiment_name:
        out.append("mlflow")
    return out


def tracker_environment(config: TuneConfig, run_dir: Path) -> dict[str, str]:
    """Settings the tracker integrations read from the environment (never the secrets)."""
    pairs = {
        "WANDB_PROJECT": config.wandb_project,
        "WANDB_ENTITY": config.wandb_entity,
        "WANDB_RUN_ID": config.wandb_run_id,
        "WANDB_MODE": config.wandb_mode,
        "WANDB_DIR": str(run_dir) if "wandb" in trackers(config) else None,
        "MLFLOW_TRACKING_URI": config.mlflow_tracking_uri,
        "MLFLOW_EXPERIMENT_NAME": config.mlflow_experiment_name,
    }
    return {k: v for k, v in pairs.items() if v}


def _wandb_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:  # `wandb login` keeps the key in ~/.netrc
        return netrc.netrc().authenticators(urlparse(host).hostname or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _wandb_problems(config: TuneConfig) -> list[str]:
    if importlib.util.find_spec("wandb") is None:
        return [f"wandb_project: Weights & Biases needs the wandb package: {INSTALL}"]
    mode = config.wandb_mode or os.environ.get("WANDB_MODE", "online")
    if mode in ("offline", "disabled", "dryrun"):
        return []
    host = os.environ.get("WANDB_BASE_URL", WANDB_HOST)
    if not _wandb_key(host):
        return [
            "wandb_project: logging to Weights & Biases online needs an API key, and none is "
            "set; set WANDB_API_KEY (or run `wandb login`), or set wandb_mode: offline"
        ]
    problem = unreachable(host)
    if problem:
        return [f"wandb_project: Weights & Biases at {host} is unreachable: {problem}; "
                "set wandb_mode: offline to log locally and `wandb sync` later"]  # fmt: skip
    return []


def _mlflow_problems(config: TuneConfig) -> list[str]:
    if importlib.util.find_spec("mlflow") is None:
        return [f"mlflow_tracking_uri: MLflow needs the mlflow package: {INSTALL}"]
    uri = config.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if urlparse(uri).scheme not in ("http", "https"):
        return []  # a local store (file:, a path, sqlite:) or a provider's own scheme
    problem = unreachable(uri)
    if problem:
        return [f"mlflow_tracking_uri: the MLflow server {redact(uri)} is unreachable: {problem}"]
    return []


def tracker_problems(config: TuneConfig) -> list[str]:
    """Why a tracker the config asks for cannot log from here, checked in seconds."""
    found = trackers(config)
    return (_wandb_problems(config) if "wandb" in found else []) + (
        _mlflow_problems(config) if "mlflow" in found else []
    )
