"""The Django-only settings (the Redis ones are in :mod:`wsrelay.config`)."""

from __future__ import annotations

from urllib.parse import urlsplit

from wsrelay.config import setting


def websocket_url() -> str:
    """``WEBSOCKET_URL``: the sockets' path prefix, ``/ws/`` by default."""
    return str(setting("WEBSOCKET_URL", default="/ws/"))


def public_url() -> str | None:
    """``WSRELAY_URL``: the gateway's public base URL, if it is not the site's host.
    ``WEBSOCKET_HOST`` (a bare host, ws4redis's) is read when it is not set."""
    url = setting("WSRELAY_URL")
    if url:
        return str(url).rstrip("/")
    return None


def websocket_host() -> str | None:
    url = public_url()
    if url:
        return urlsplit(url).netloc
    host = setting("WEBSOCKET_HOST")
    return str(host) if host else None


def gateway_url() -> str | None:
    """``WSRELAY_GATEWAY_URL``: how this host reaches the gateway (``http://127.0.0.1:8080``)."""
    url = setting("WSRELAY_GATEWAY_URL")
    return str(url).rstrip("/") if url else None
