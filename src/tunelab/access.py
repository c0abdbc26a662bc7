"""Who may use the server. On 127.0.0.1 anyone on this machine may (unless a token is set);
on any other address a token is required: a Bearer header, or the HttpOnly, SameSite
cookie the login page sets. Tokens are compared in constant time. A request that changes
state must use POST, PUT or DELETE, and one that comes from a page of another origin is
refused (a cookie alone never authorises it)."""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fastapi import HTTPException, Request

COOKIE = "tunelab_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def server_token(host: str, given: str | None) -> str | None:
    """The token a server on ``host`` requires: ``given``, else ``TUNELAB_TOKEN``; refused
    when there is none and the address lets other machines in."""
    import os

    from tunelab.errors import TunelabError

    token = given or os.environ.get("TUNELAB_TOKEN") or None
    if not is_loopback(host) and not token:
        raise TunelabError(
            f"--host {host} lets other machines in, and no token is set",
            "give --token SECRET (or TUNELAB_TOKEN), or listen on 127.0.0.1",
        )
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Access:
    token: str | None
    sessions: set[str] = field(default_factory=set)  # cookies handed out by /login

    def token_matches(self, given: str | None) -> bool:
        if self.token is None or not given:
            return False
        return hmac.compare_digest(given.encode(), self.token.encode())

    def open_session(self, given: str | None) -> str | None:
        """A new session cookie's value for the right token; None for a wrong one."""
        if not self.token_matches(given):
            return None
        session = secrets.token_urlsafe(32)
        self.sessions.add(session)
        return session

    def _session(self, value: str | None) -> bool:
        return bool(value) and any(hmac.compare_digest(value.encode(), s.encode())
                                   for s in self.sessions)  # fmt: skip

    def check_origin(self, request: Request) -> None:
        """403 for a state change sent from a page of another origin."""
        self.check_host(request)
        if request.method not in SAFE_METHODS and not _same_origin(request):
            raise HTTPException(403, "a request from another site may not change anything here")

    def check_host(self, request: Request) -> None:
        """Without a token, only requests addressed to a loopback name: a page whose own
        name was made to point at 127.0.0.1 (DNS rebinding) sends its own name as Host."""
        if self.token is not None:
            return
        host = urlsplit(f"//{request.headers.get('host', '')}").hostname or ""
        if not is_loopback(host):
            raise HTTPException(403, f"this server answers requests for 127.0.0.1 or "
                                     f"localhost only, not for {host or 'no host'}")  # fmt: skip

    def check(self, request: Request) -> None:
        """Raise 401 or 403 unless ``request`` may go on."""
        self.check_host(request)
        header = request.headers.get("authorization", "")
        bearer = header[7:].strip() if header.lower().startswith("bearer ") else None
        by_header = self.token_matches(bearer)
        if not by_header:
            self.check_origin(request)
        if self.token is None or by_header or self._session(request.cookies.get(COOKIE)):
            return
        raise HTTPException(
            401, "this server needs its token: a Bearer header, or log in at /login",
            headers={"WWW-Authenticate": "Bearer"},
        )  # fmt: skip


def _same_origin(request: Request) -> bool:
    """Whether the browser says the request comes from this server's own pages (a request
    without Origin or Referer comes from a program, not from another site's page)."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        return request.headers.get("sec-fetch-site") in (None, "same-origin", "none")
    parts = urlsplit(origin)
    return f"{parts.scheme}://{parts.netloc}" == f"{request.url.scheme}://{request.url.netloc}"
