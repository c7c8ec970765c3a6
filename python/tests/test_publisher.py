"""RedisPublisher against the real Redis and the real gateway."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import pytest
import redis
from django.contrib.auth.models import Group, User
from django.contrib.sessions.backends.db import SessionStore
from django.test import RequestFactory, override_settings

from wsrelay import SELF
from wsrelay.contrib.django import apublish_message
from wsrelay.publisher import RedisMessage, RedisPublisher, set_identity

from .conftest import Sockets


def facility() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def jane_request(groups: list[str] | None = None) -> Any:
    """A request of a logged-in ``jane`` (in ``staff`` and ``editors``) with a saved
    session; ``groups`` puts ``ws4redis:memberof`` in the session."""
    user = User.objects.create_user("jane", password="pw")
    for name in ("staff", "editors"):
        user.groups.add(Group.objects.get_or_create(name=name)[0])
    session = SessionStore()
    if groups is not None:
        session["ws4redis:memberof"] = groups
    session.save()
    request = RequestFactory().get("/")
    request.user = user
    request.session = session
    return request


def test_broadcast_reaches_a_socket(sockets: Sockets, prefix: str) -> None:
    fac = facility()
    ws = sockets.connect(f"/ws/{fac}?subscribe-broadcast", None, f"{prefix}broadcast:{fac}")
    # Not stored (expire=0): see Sockets.connect.
    keys = RedisPublisher(facility=fac, broadcast=True).publish_message(
        RedisMessage("hello"), expire=0
    )
    assert keys == [f"{prefix}broadcast:{fac}"]
    assert ws.recv(timeout=10) == "hello"
    # Not UTF-8: a binary frame, byte for byte.
    RedisPublisher(facility=fac, broadcast=True).publish_message(b"\xff\x00bin", expire=0)
    assert ws.recv(timeout=10) == b"\xff\x00bin"


@pytest.mark.django_db
def test_self_user_group_session_reach_their_socket(
    sockets: Sockets, r: redis.Redis, prefix: str
) -> None:
    fac = facility()
    request = jane_request()
    key = request.session.session_key
    # The gateway's default identity source reads this record (the login receiver
    # writes it with WSRELAY_IDENTITY_RECORD = True).
    set_identity(key, "jane", ["staff", "editors"], ttl=60)
    user_key, staff_key = f"{prefix}user:jane:{fac}", f"{prefix}group:staff:{fac}"
    session_key = f"{prefix}session:{key}:{fac}"
    ws = sockets.connect(
        f"/ws/{fac}?subscribe-user&subscribe-group&subscribe-session",
        f"sessionid={key}",
        user_key,
        staff_key,
        session_key,
    )
    # Not stored (expire=0): a stored message published while the socket is still being
    # set up can arrive twice, live and as the stored one, as the gateway documents.
    p = RedisPublisher(facility=fac, users=[SELF], request=request)
    assert p.keys == [user_key]
    p.publish_message("to jane", expire=0)
    assert ws.recv(timeout=10) == "to jane"

    # Groups from the database when the session has no ws4redis:memberof.
    p = RedisPublisher(facility=fac, groups=[SELF], request=request)
    assert sorted(p.keys) == [f"{prefix}group:editors:{fac}", staff_key]
    RedisPublisher(facility=fac, groups=["staff"]).publish_message("to staff", expire=0)
    assert ws.recv(timeout=10) == "to staff"

    p = RedisPublisher(facility=fac, sessions=[SELF], request=request)
    assert p.keys == [session_key]
    p.publish_message("to this browser", expire=0)
    assert ws.recv(timeout=10) == "to this browser"

    # Someone else's socket hears none of it.
    other = sockets.connect(f"/ws/{fac}?subscribe-user&subscribe-session", "sessionid=otherkey1")
    RedisPublisher(facility=fac, users=[SELF], request=request).publish_message("again", expire=0)
    assert ws.recv(timeout=10) == "again"
    with pytest.raises(TimeoutError):
        other.recv(timeout=0.3)


@pytest.mark.django_db
def test_ws4redis_own_self_is_understood() -> None:
    # ws4redis.redis_store defines SELF as the one instance of a class named SELF_TYPE;
    # apps that still import it keep working.
    ws4redis_self = type("SELF_TYPE", (object,), {})()
    request = jane_request(groups=["from-session"])
    p = RedisPublisher(
        facility="f", users=[ws4redis_self], groups=[ws4redis_self], request=request, prefix=""
    )
    assert sorted(p.keys) == ["group:from-session:f", "user:jane:f"]


@pytest.mark.django_db
def test_self_groups_come_from_the_session_first() -> None:
    request = jane_request(groups=["from-session"])
    p = RedisPublisher(facility="f", groups=[SELF], request=request, prefix="")
    assert p.keys == ["group:from-session:f"]


def test_anonymous_self_is_skipped() -> None:
    from django.contrib.auth.models import AnonymousUser

    request = RequestFactory().get("/")
    request.user = AnonymousUser()
    request.session = SessionStore()  # never saved: no key
    p = RedisPublisher(facility="f", users=[SELF], groups=[SELF], sessions=[SELF], request=request)
    assert p.keys == []


def test_late_joiner_gets_the_stored_message(sockets: Sockets, r: redis.Redis, prefix: str) -> None:
    fac = facility()
    key = f"{prefix}broadcast:{fac}"
    RedisPublisher(facility=fac, broadcast=True).publish_message("kept", expire=30)
    assert r.get(key) == b"kept"
    assert 0 < r.ttl(key) <= 30
    ws = sockets.connect(f"/ws/{fac}?subscribe-broadcast")
    assert ws.recv(timeout=10) == "kept"

    other = facility()
    RedisPublisher(facility=other, broadcast=True).publish_message("not kept", expire=0)
    assert r.get(f"{prefix}broadcast:{other}") is None


def test_default_expire_comes_from_the_settings(r: redis.Redis, prefix: str) -> None:
    fac = facility()
    key = f"{prefix}broadcast:{fac}"
    RedisPublisher(facility=fac, broadcast=True).publish_message("x")
    assert 3500 < r.ttl(key) <= 3600  # ws4redis's default
    with override_settings(WS4REDIS_EXPIRE=77):
        RedisPublisher(facility=fac, broadcast=True).publish_message("x")
    assert 0 < r.ttl(key) <= 77
    r.delete(key)
    with override_settings(WS4REDIS_EXPIRE=77, WSRELAY_EXPIRE=0):
        RedisPublisher(facility=fac, broadcast=True).publish_message("x")
    assert r.get(key) is None


@pytest.mark.django_db
def test_fetch_message(r: redis.Redis, prefix: str) -> None:
    fac = facility()
    request = jane_request(groups=["staff"])
    p = RedisPublisher(facility=fac, broadcast=True)
    assert p.fetch_message(request, fac) is None
    p.publish_message("for all")
    assert p.fetch_message(request, fac) == b"for all"
    RedisPublisher(facility=fac, groups=["staff"]).publish_message("for staff")
    assert p.fetch_message(request, fac) == b"for staff"
    RedisPublisher(facility=fac, users=["jane"]).publish_message("for jane")
    assert p.fetch_message(request, fac) == b"for jane"
    RedisPublisher(facility=fac, sessions=[SELF], request=request).publish_message("for session")
    assert p.fetch_message(request, fac) == b"for session"
    assert p.fetch_message(request, fac, "broadcast") == b"for all"
    assert p.fetch_message(request, fac, "group") == b"for staff"
    assert p.fetch_message(request, fac, "user") == b"for jane"
    assert p.fetch_message(None, fac) == b"for all"


def test_publish_is_one_transaction(r: redis.Redis, prefix: str) -> None:
    """MONITOR shows MULTI, SET … EX, PUBLISH for each key, EXEC; and both effects
    happened: the value is stored and the publication was delivered."""
    fac = facility()
    seen: list[str] = []
    ready = threading.Event()

    def monitor() -> None:
        with r.monitor() as m:
            ready.set()
            for command in m.listen():
                text = command["command"]
                verb = text.split(" ", 1)[0]
                if text in ("MULTI", "EXEC") or (verb in ("SET", "PUBLISH") and fac in text):
                    seen.append(text)
                if text == "EXEC":
                    return

    thread = threading.Thread(target=monitor, daemon=True)
    thread.start()
    assert ready.wait(5)
    time.sleep(0.2)  # MONITOR is on once the server answered it
    pubsub = r.pubsub()
    pubsub.subscribe(f"{prefix}broadcast:{fac}")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    RedisPublisher(facility=fac, broadcast=True, users=["jane"]).publish_message("tx", expire=60)
    thread.join(10)
    b, u = f"{prefix}broadcast:{fac}", f"{prefix}user:jane:{fac}"
    assert seen == [
        "MULTI",
        f"SET {b} tx EX 60",
        f"PUBLISH {b} tx",
        f"SET {u} tx EX 60",
        f"PUBLISH {u} tx",
        "EXEC",
    ]
    message = pubsub.get_message(timeout=5)
    assert message is not None and message["data"] == b"tx"
    assert r.get(b) == b"tx" and r.get(u) == b"tx"
    pubsub.close()


@pytest.mark.django_db
def test_apublish_message(sockets: Sockets, prefix: str) -> None:
    fac = facility()
    request = jane_request(groups=["staff"])
    ws = sockets.connect(f"/ws/{fac}?subscribe-broadcast", None, f"{prefix}broadcast:{fac}")

    async def view() -> list[str]:
        keys = await apublish_message("async hello", facility=fac, broadcast=True)
        publisher = await RedisPublisher.acreate(facility=fac, groups=[SELF], request=request)
        keys += await publisher.apublish_message("async staff", expire=0)
        return keys

    keys = asyncio.run(view())
    assert keys == [f"{prefix}broadcast:{fac}", f"{prefix}group:staff:{fac}"]
    assert ws.recv(timeout=10) == "async hello"


def test_a_facility_with_history_gets_ids_and_resumes(
    sockets: Sockets, r: redis.Redis, prefix: str
) -> None:
    """``WSRELAY_FACILITIES`` as the gateway's ``[[facility]]``: publications are
    appended to the key's stream with ids, and a socket that resumes from the first
    id gets what came after it."""
    name = f"pyfeed/{uuid.uuid4().hex[:8]}"
    publisher = RedisPublisher(facility=name, broadcast=True)
    publisher.publish_message("first", expire=0)
    (first,) = publisher.last_ids
    publisher.publish_message("second", expire=0)
    (second,) = publisher.last_ids
    assert first is not None and second is not None and first != second
    # The whole key is the stream's hash tag (its slot in a Redis Cluster).
    stream = r.xrange(f"{prefix}wsrelay:history:{{{prefix}broadcast:{name}}}")
    assert [(i.decode(), f[b"d"]) for i, f in stream] == [(first, b"first"), (second, b"second")]
    ws = sockets.connect(f"/ws/{name}?subscribe-broadcast&last-id=broadcast:{first}")
    assert ws.recv() == "second"
    # A facility without history: no id.
    plain = RedisPublisher(facility=facility(), broadcast=True)
    plain.publish_message("x", expire=0)
    assert plain.last_ids == [None]


def test_the_history_script_is_the_gateways() -> None:
    """The gateway and this package append to histories with one script: a change to
    the gateway's must reach the package."""
    from pathlib import Path

    from wsrelay import publisher

    gateways = Path(__file__).resolve().parents[2] / "src" / "publish_with_history.lua"
    assert publisher._PUBLISH_WITH_HISTORY == gateways.read_text()
