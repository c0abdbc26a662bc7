"""Is a service reachable? Asked once, with a short timeout, before any slow client tries.

Hub, W&B and MLflow clients retry with growing pauses when the network is down, so a
machine without network waits half a minute or more for an answer it could have had in
seconds. These checks open one TCP connection and say why it failed.
"""

from __future__ import annotations

import os
import socket
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
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except socket.gaierror:
        return f"the name {parts.hostname} cannot be resolved (no network?)"
    except TimeoutError:
        return f"{parts.hostname}:{port} did not answer within {timeout:.0f} s"
    except OSError as exc:
        return f"{parts.hostname}:{port} cannot be reached ({exc.strerror or exc})"
    return None


def hub_problem() -> str | None:
    """Why the Hugging Face Hub cannot be used now, or None."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set, so the Hub is switched off"
    problem = unreachable(constants.ENDPOINT)
    if problem:
        return f"the Hugging Face Hub at {constants.ENDPOINT} is unreachable: {problem}"
    return None
