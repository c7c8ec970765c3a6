"""Settings, read from Django's settings when Django is configured.

=====================  ==========================================  ==========
wsrelay setting        ws4redis fallback                           default
=====================  ==========================================  ==========
``WSRELAY_REDIS_URL``  ``WS4REDIS_CONNECTION`` (a dict of           ``redis://localhost:6379/0``
                       ``redis.Redis`` arguments)
``WSRELAY_PREFIX``     ``WS4REDIS_PREFIX``                          none
``WSRELAY_EXPIRE``     ``WS4REDIS_EXPIRE``                          3600
``WSRELAY_HEARTBEAT``  ``WS4REDIS_HEARTBEAT``                       none
``WSRELAY_FACILITIES`` none                                        none
=====================  ==========================================  ==========

``WSRELAY_FACILITIES`` repeats the gateway's ``[[facility]]`` rules that keep
history, as a list of dicts (``[{"pattern": "orders/*", "history": 100,
"history_ttl": 3600}]``), so that publications on those facilities get message
ids, as the gateway's own do.

Outside Django every setting has its default; pass ``connection=``,
``prefix=`` and ``expire=`` to the publisher instead.
"""

from __future__ import annotations

import threading
from typing import Any

import redis

__all__ = [
    "setting",
    "redis_prefix",
    "expire",
    "heartbeat",
    "facilities",
    "get_connection",
]

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_EXPIRE = 3600

_UNSET: Any = object()


def setting(name: str, *fallbacks: str, default: Any = None) -> Any:
    """The first of ``name`` and ``fallbacks`` set in Django's settings, else ``default``."""
    try:
        from django.conf import settings
    except ImportError:  # Django is optional
        return default
    if not settings.configured:
        return default
    for candidate in (name, *fallbacks):
        value = getattr(settings, candidate, _UNSET)
        if value is not _UNSET:
            return value
    return default


def redis_prefix() -> str | None:
    """``WSRELAY_PREFIX``, else ``WS4REDIS_PREFIX``; ``None`` or ``""``: no prefix."""
    return setting("WSRELAY_PREFIX", "WS4REDIS_PREFIX") or None


def expire() -> int:
    """``WSRELAY_EXPIRE``, else ``WS4REDIS_EXPIRE``, else 3600 seconds (0: not stored)."""
    return int(setting("WSRELAY_EXPIRE", "WS4REDIS_EXPIRE", default=DEFAULT_EXPIRE))


def facilities() -> list[dict[str, Any]]:
    """``WSRELAY_FACILITIES``: the gateway's ``[[facility]]`` rules, first match wins."""
    return list(setting("WSRELAY_FACILITIES", default=None) or [])


def heartbeat() -> str | None:
    """``WSRELAY_HEARTBEAT``, else ``WS4REDIS_HEARTBEAT``."""
    value = setting("WSRELAY_HEARTBEAT", "WS4REDIS_HEARTBEAT")
    return str(value) if value else None


def _connection_spec() -> tuple[str, Any]:
    url = setting("WSRELAY_REDIS_URL")
    if url:
        return ("url", str(url))
    conn = setting("WS4REDIS_CONNECTION")
    if conn:
        return ("kwargs", tuple(sorted(dict(conn).items())))
    return ("url", DEFAULT_REDIS_URL)


_lock = threading.Lock()
_clients: dict[tuple[str, Any], redis.Redis] = {}


def get_connection() -> redis.Redis:
    """A client (with its own connection pool) for the configured Redis, shared by
    every publisher with the same settings."""
    spec = _connection_spec()
    with _lock:
        client = _clients.get(spec)
        if client is None:
            kind, value = spec
            if kind == "url":
                client = redis.Redis.from_url(value)
            else:
                kwargs = dict(value)
                if "unix_socket_path" in kwargs:
                    # ws4redis's form; redis-py takes it as is.
                    kwargs.pop("host", None)
                    kwargs.pop("port", None)
                client = redis.Redis(**kwargs)
            _clients[spec] = client
        return client
