"""Who may use the server. On 127.0.0.1 anyone on this machine may (unless a token is set);
on any other address a token is required: a Bearer header, or the HttpOnly, SameSite
cookie the login page sets. Tokens are compared in constant time. A request that changes
state must use POST, PUT or DELETE, and one that comes from a page of another origin is
refused (a cookie alone never authorises it)."""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import HTTPException, Request

COOKIE = "tunelab_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


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

    def token_matches(self, given: str | None) -> bool:
        if self.token is None or not given:
            return False
        return hmac.compare_digest(given.encode(), self.token.encode())

    def check(self, request: Request) -> None:
        """Raise 401 or 403 unless ``request`` may go on."""
        header = request.headers.get("authorization", "")
        bearer = header[7:].strip() if header.lower().startswith("bearer ") else None
        by_header = self.token_matches(bearer)
        if request.method not in SAFE_METHODS and not by_header and not _same_origin(request):
            raise HTTPException(403, "a request from another site may not change anything here")
        if self.token is None or by_header:
            return
        if self.token_matches(request.cookies.get(COOKIE)):
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
