"""Fixtures: the Redis and the gateway the Rust harness started (see settings.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import redis

from wsrelay._wsclient import WebSocket

GATEWAY = os.environ.get("WSRELAY_TEST_GATEWAY", "")
TOKEN = os.environ.get("WSRELAY_TEST_TOKEN", "")
PREFIX = os.environ.get("WSRELAY_TEST_PREFIX", "")


@pytest.fixture
def gateway() -> str:
    """``host:port`` of the running gateway."""
    if not GATEWAY:
        pytest.skip("no gateway: run through `cargo test --test gateway python`")
    return GATEWAY


@pytest.fixture
def token() -> str:
    return TOKEN


@pytest.fixture
def prefix() -> str:
    """The gateway's ``redis.prefix`` with its ``:``, as keys start."""
    return f"{PREFIX}:" if PREFIX else ""


@pytest.fixture
def r(gateway: str) -> Iterator[redis.Redis]:
    from django.conf import settings

    client = redis.Redis.from_url(settings.WSRELAY_REDIS_URL)
    yield client
    client.close()


class Sockets:
    def __init__(self, gateway: str, r: redis.Redis) -> None:
        self.gateway = gateway
        self.r = r
        self.open: list[WebSocket] = []

    def connect(self, path: str, cookie: str | None = None, *keys: str) -> WebSocket:
        """Opens ``ws://gateway{path}`` and waits until the gateway subscribed to
        ``keys`` (so that a publication that follows cannot be missed). The socket may
        still be reading its stored messages then: a publication that is also stored
        (expire > 0) can arrive twice, so tests that publish at once use expire=0."""
        ws = WebSocket(f"ws://{self.gateway}{path}", cookie=cookie)
        self.open.append(ws)
        for key in keys:
            self.wait_subscribed(key)
        return ws

    def wait_subscribed(self, key: str) -> None:
        deadline = time.monotonic() + 10
        while True:
            ((_, n),) = self.r.pubsub_numsub(key)
            if n >= 1:
                return
            assert time.monotonic() < deadline, f"the gateway did not subscribe to {key}"
            time.sleep(0.01)


@pytest.fixture
def sockets(gateway: str, r: redis.Redis) -> Iterator[Sockets]:
    s = Sockets(gateway, r)
    yield s
    for ws in s.open:
        ws.close()
