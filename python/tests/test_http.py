"""HttpPublisher against the gateway's POST /api/publish."""

from __future__ import annotations

import uuid

import pytest
import redis

from wsrelay.http import HttpPublisher, PublishError

from .conftest import Sockets


def test_http_publish_reaches_a_socket(
    sockets: Sockets, gateway: str, token: str, r: redis.Redis, prefix: str
) -> None:
    fac = f"h{uuid.uuid4().hex[:12]}"
    ws = sockets.connect(f"/ws/{fac}?subscribe-broadcast", None, f"{prefix}broadcast:{fac}")
    api = HttpPublisher(f"http://{gateway}", token)
    keys = api.publish(fac, "över http", broadcast=True, users=["jane"], expire=40)
    assert keys == [f"{prefix}broadcast:{fac}", f"{prefix}user:jane:{fac}"]
    assert ws.recv(timeout=10) == "över http"
    assert r.get(f"{prefix}user:jane:{fac}") == "över http".encode()
    assert 0 < r.ttl(f"{prefix}user:jane:{fac}") <= 40
    api.publish(fac, b"bytes as text", sessions=["k1"], expire=0)
    assert r.get(f"{prefix}session:k1:{fac}") is None


def test_http_errors_name_status_and_reason(gateway: str, token: str) -> None:
    with pytest.raises(PublishError) as wrong_token:
        HttpPublisher(f"http://{gateway}/api/publish", "wrong-token-0123456789").publish(
            "chat", "x", broadcast=True
        )
    assert wrong_token.value.status == 401
    assert "401 Unauthorized" in str(wrong_token.value)

    api = HttpPublisher(f"http://{gateway}", token)
    with pytest.raises(PublishError) as bad_name:
        api.publish("bad:facility", "x", broadcast=True)
    assert bad_name.value.status == 400
    assert "facility" in bad_name.value.body

    with pytest.raises(PublishError) as nobody:
        api.publish("chat", "x")
    assert nobody.value.status == 400
    assert "at least one audience" in str(nobody.value)

    with pytest.raises(ValueError, match="UTF-8"):
        api.publish("chat", b"\xff", broadcast=True)


def test_http_unreachable_gateway() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PublishError) as e:
        HttpPublisher(f"http://127.0.0.1:{port}", "t" * 20, timeout=2).publish(
            "chat", "x", broadcast=True
        )
    assert e.value.status == 0
