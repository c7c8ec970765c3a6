"""Key names, name checks and RedisMessage: no Redis needed."""

from __future__ import annotations

import pytest
from django.test import override_settings
from redis.crc import key_slot

from wsrelay import SELF, KeySpace, config, validate_name
from wsrelay.publisher import RedisMessage, RedisPublisher


class NoConnection:
    """Stands for a Redis client where none is used."""


def test_key_layout_matches_the_gateway() -> None:
    keys = KeySpace("site")
    assert keys.broadcast("chat/room1") == "site:broadcast:chat/room1"
    assert keys.user("jane", "chat") == "site:user:jane:chat"
    assert keys.group("staff", "chat") == "site:group:staff:chat"
    assert keys.session("k2x8", "chat") == "site:session:k2x8:chat"
    assert keys.identity("k2x8") == "site:wsrelay:identity:k2x8"
    assert KeySpace(None).broadcast("chat") == "broadcast:chat"
    assert KeySpace("").broadcast("chat") == "broadcast:chat"


def test_history_and_id_channel_share_the_slot_of_their_key() -> None:
    """The whole key, prefix included, is the hash tag: in a Redis Cluster one script
    appends to the stream and publishes on the id channel and the key."""
    keys = KeySpace("site")
    key = keys.user("jane", "chat")
    assert keys.history(key) == "site:wsrelay:history:{site:user:jane:chat}"
    assert keys.id_channel(key) == "site:wsrelay:id:{site:user:jane:chat}"
    assert KeySpace(None).history("broadcast:f") == "wsrelay:history:{broadcast:f}"
    for k in (key, keys.broadcast("a/b"), KeySpace(None).session("k2x8", "x")):
        assert key_slot(keys.history(k).encode()) == key_slot(k.encode())
        assert key_slot(keys.id_channel(k).encode()) == key_slot(k.encode())


def test_one_topology_at_a_time() -> None:
    """As the gateway's redis.url / redis.cluster / redis.sentinel: at most one, and
    WSRELAY_REDIS_PUBSUB with a cluster only. Checked before any connection is made."""
    cluster = ["redis://127.0.0.1:1"]
    sentinel = {"master": "m", "nodes": ["redis://127.0.0.1:1"]}
    with (
        override_settings(WSRELAY_REDIS_CLUSTER=cluster),
        pytest.raises(ValueError, match="not url and cluster"),
    ):
        config.get_connection()
    with (
        override_settings(WSRELAY_REDIS_URL=None, WSRELAY_REDIS_PUBSUB="sharded"),
        pytest.raises(ValueError, match="applies to a Redis Cluster only"),
    ):
        config.get_connection()
    with (
        override_settings(WSRELAY_REDIS_URL=None, WSRELAY_REDIS_SENTINEL={"master": "m"}),
        pytest.raises(ValueError, match="at least one sentinel"),
    ):
        config.get_connection()
    with pytest.raises(ValueError, match="not cluster and sentinel"):
        config.connect(cluster=cluster, sentinel=sentinel)
    with pytest.raises(ValueError, match="unknown Sentinel settings"):
        config.connect(sentinel={**sentinel, "mater": "x"})
    with override_settings(WSRELAY_REDIS_PUBSUB="fan-out"), pytest.raises(ValueError):
        config.pubsub()
    with pytest.raises(ValueError, match="Redis Cluster connection only"):
        RedisPublisher(facility="f", connection=NoConnection(), pubsub="classic")  # type: ignore[arg-type]


def test_publisher_keys_in_ws4redis_order() -> None:
    p = RedisPublisher(
        facility="f",
        broadcast=True,
        users=["a", "b"],
        groups=["g"],
        sessions=["s"],
        connection=NoConnection(),  # type: ignore[arg-type]
        prefix="p",
    )
    assert p.keys == ["p:broadcast:f", "p:group:g:f", "p:user:a:f", "p:user:b:f", "p:session:s:f"]


def test_deprecated_forms_warn_like_ws4redis() -> None:
    with pytest.warns(DeprecationWarning):
        p = RedisPublisher(facility="f", users="jane", connection=NoConnection(), prefix="")  # type: ignore[arg-type]
    assert p.keys == ["user:jane:f"]
    with pytest.raises(ValueError, match="must be a list or tuple"):
        RedisPublisher(facility="f", users=42, connection=NoConnection())  # type: ignore[arg-type]


def test_self_without_request_is_skipped() -> None:
    p = RedisPublisher(
        facility="f",
        users=[SELF],
        groups=[SELF],
        sessions=[SELF],
        connection=NoConnection(),  # type: ignore[arg-type]
    )
    assert p.keys == []


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("facility", ""),
        ("facility", "a:b"),
        ("facility", "a//b"),
        ("facility", "../x"),
        ("facility", "x" * 257),
        ("user name", "a b"),
        ("user name", "a/b"),
        ("group name", "g*"),
        ("session key", "k\n"),
        ("user name", "{tag}"),
    ],
)
def test_names_the_gateway_refuses(kind: str, name: str) -> None:
    with pytest.raises(ValueError):
        validate_name(kind, name)  # type: ignore[arg-type]


def test_names_the_gateway_accepts() -> None:
    validate_name("facility", "chat/room1")
    validate_name("user name", "jane.doe+x@example.com")
    validate_name("user name", "jörg")
    with pytest.raises(ValueError, match="contains ':'"):
        RedisPublisher(facility="f", users=["a:b"], connection=NoConnection())  # type: ignore[arg-type]


def test_redis_message() -> None:
    assert RedisMessage("hé") == "hé".encode()
    assert isinstance(RedisMessage(b"x"), bytes)
    assert RedisMessage(None) is None
    assert RedisMessage([b"message", b"chan", b"data"]) == b"data"
    with override_settings(WS4REDIS_HEARTBEAT="--heartbeat--"):
        assert RedisMessage("--heartbeat--") is None
        assert RedisMessage(b"--heartbeat--") is None
        assert RedisMessage("hello") == b"hello"
