"""The Django app: context processor, login receiver, wsrelay_check, packaging."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import redis
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client, RequestFactory, override_settings

from wsrelay.contrib.django.context_processors import default


def test_context_processor_like_ws4redis() -> None:
    request = RequestFactory().get("/", HTTP_HOST="www.example.com")
    context = default(request)
    assert context["WEBSOCKET_URI"] == "ws://www.example.com/ws/"
    assert context["WS4REDIS_HEARTBEAT"] == "null"
    assert context["WSRELAY_JS"] == "/wsrelay.js"

    secure = RequestFactory().get("/", HTTP_HOST="www.example.com", secure=True)
    with override_settings(WS4REDIS_HEARTBEAT="--heartbeat--", WEBSOCKET_URL="/sockets/"):
        context = default(secure)
    assert context["WEBSOCKET_URI"] == "wss://www.example.com/sockets/"
    assert context["WS4REDIS_HEARTBEAT"] == '"--heartbeat--"'

    with override_settings(WSRELAY_URL="https://ws.example.com/"):
        context = default(request)
    assert context["WEBSOCKET_URI"] == "wss://ws.example.com/ws/"
    assert context["WSRELAY_JS"] == "https://ws.example.com/wsrelay.js"


@pytest.mark.django_db
def test_login_stores_the_identity_in_the_session(r: redis.Redis, prefix: str) -> None:
    user = User.objects.create_user("jörg", password="pw")
    user.groups.add(Group.objects.create(name="staff"))
    client = Client()
    with override_settings(WSRELAY_IDENTITY_RECORD=True):
        client.force_login(user)
    session = client.session
    assert session["wsrelay:username"] == "jörg"
    assert session["ws4redis:memberof"] == ["staff"]
    record = r.get(f"{prefix}wsrelay:identity:{session.session_key}")
    assert record is not None
    import json

    assert json.loads(record) == {"user": "jörg", "groups": ["staff"]}
    with override_settings(WSRELAY_IDENTITY_RECORD=True):
        client.logout()
    assert r.get(f"{prefix}wsrelay:identity:{session.session_key}") is None


def test_wsrelay_check_passes(gateway: str, prefix: str) -> None:
    out = io.StringIO()
    call_command("wsrelay_check", stdout=out)
    text = out.getvalue()
    assert "redis: ok" in text
    assert f"http://{gateway}/ready answered 200 ready" in text
    assert f"probe: published to {prefix}broadcast:wsrelay-check, received on" in text
    assert "wsrelay: ok" in text


def test_wsrelay_check_fails_on_another_prefix(gateway: str) -> None:
    with (
        override_settings(WSRELAY_PREFIX="not-the-gateways"),
        pytest.raises(CommandError, match="nothing came out of"),
    ):
        call_command("wsrelay_check", "--timeout", "1", stdout=io.StringIO())


def test_wsrelay_check_fails_without_a_gateway(gateway: str) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CommandError, match="cannot reach"):
        call_command("wsrelay_check", "--gateway", f"http://127.0.0.1:{port}", stdout=io.StringIO())
    # As a process: a non-zero exit status and the reason on stderr.
    result = subprocess.run(
        [sys.executable, "-m", "django", "wsrelay_check", "--gateway", f"http://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        env={
            **__import__("os").environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "PYTHONPATH": "src:.",
        },
        timeout=60,
    )
    assert result.returncode != 0
    assert "cannot reach" in result.stderr


def test_wheel_builds(tmp_path: Path) -> None:
    """`pip wheel` with the declared build backend (hatchling, installed beside the
    tests, so no download at build time)."""
    root = Path(__file__).parent.parent
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-q",
            str(root),
            "-w",
            str(tmp_path),
        ],
        check=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("wsrelay-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in (
        "wsrelay/py.typed",
        "wsrelay/publisher.py",
        "wsrelay/http.py",
        "wsrelay/contrib/django/management/commands/wsrelay_check.py",
    ):
        assert expected in names
    metadata = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Requires-Python: >=3.10" in text
    assert "Requires-Dist: redis>=4.1" in text
