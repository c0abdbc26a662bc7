"""Is a service reachable? Asked once, with a short timeout, before any slow client tries.

Hub, W&B and MLflow clients retry with growing pauses when the network is down, so a
machine without network waits half a minute or more for an answer it could have had in
seconds. These checks open one TCP connection and say why it failed.
"""

from __future__ import annotations

import os
import socket
import time
from urllib.parse import urlparse

from tunelab.redact import redact

CONNECT_TIMEOUT = 5.0
_PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def unreachable(url: str, timeout: float = CONNECT_TIMEOUT) -> str | None:
    """Why ``url``'s host cannot be reached, or None when it answers (or a proxy decides)."""
    if any(os.environ.get(v) for v in _PROXIES):
        return None  # the proxy connects for us; a direct connection would prove nothing
    parts = urlparse(url)
    if not parts.hostname:
        return f"{redact(url)} names no host"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port that is not a number
        return f"{redact(url)} has no valid port number"
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except socket.gaierror:
        return f"the name {parts.hostname} cannot be resolved (no network?)"
    except TimeoutError:
        return f"{parts.hostname}:{port} did not answer within {timeout:.0f} s"
    except OSError as exc:
        return f"{parts.hostname}:{port} cannot be reached ({exc.strerror or exc})"
    return None


_HUB_ANSWER_KEPT = 60.0  # seconds: a run asks for a model and datasets one after the other
_hub_answer: tuple[float, str | None] | None = None


def hub_problem() -> str | None:
    """Why the Hugging Face Hub cannot be used now, or None (the answer is kept a minute)."""
    global _hub_answer
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set, so the Hub is switched off"
    if _hub_answer is None or time.monotonic() - _hub_answer[0] > _HUB_ANSWER_KEPT:
        problem = unreachable(constants.ENDPOINT)
        where = f"the Hugging Face Hub at {redact(constants.ENDPOINT)} is unreachable"
        _hub_answer = (time.monotonic(), f"{where}: {problem}" if problem else None)
    return _hub_answer[1]


class HubUnavailable(Exception):
    """The Hub cannot be reached and what was asked for is not in the local cache."""


def hub_or_cache(repo_id: str, repo_type: str = "model") -> tuple[str, str | None]:
    """Where to read ``repo_id`` from: the id itself while the Hub answers, else its cached
    copy (with a note saying so). Raises :class:`HubUnavailable` (the reason) when neither
    will do, in seconds rather than after the Hub client's half a minute of retries."""
    from huggingface_hub import snapshot_download

    problem = hub_problem()
    if problem is None:
        return repo_id, None
    try:
        cached = snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)
    except Exception:  # not in the cache (the client raises several kinds for that)
        raise HubUnavailable(f"{problem}, and it is not in the local cache") from None
    return cached, f"{problem}; using the cached copy of {repo_id}"
