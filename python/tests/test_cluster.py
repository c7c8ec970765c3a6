"""RedisPublisher on a Redis Cluster: sharded pub/sub (SPUBLISH, the default) and
classic (PUBLISH). Runs when ``WSRELAY_TEST_CLUSTER_SEEDS`` names the seed nodes of a
running cluster (comma-separated URLs, 3 masters); the gateway is not involved."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.test import override_settings
from redis.cluster import RedisCluster

from wsrelay import KeySpace, config
from wsrelay.publisher import RedisPublisher

SEEDS = [u.strip() for u in os.environ.get("WSRELAY_TEST_CLUSTER_SEEDS", "").split(",") if u]
PREFIX = os.environ.get("WSRELAY_TEST_PREFIX") or "site"

pytestmark = pytest.mark.skipif(
    not SEEDS, reason="no Redis Cluster: set WSRELAY_TEST_CLUSTER_SEEDS to its seed URLs"
)


@pytest.fixture
def cluster() -> Iterator[RedisCluster]:
    client = config.connect(cluster=SEEDS)
    assert isinstance(client, RedisCluster)
    yield client
    client.close()


def users_on_every_master(cluster: RedisCluster, facility: str) -> list[str]:
    """User names whose keys, together, fall on every master."""
    keys = KeySpace(PREFIX)
    masters = {n.name for n in cluster.get_primaries()}
    names: list[str] = []
    owners: set[str] = set()
    for i in range(1000):
        owner = cluster.get_node_from_key(keys.user(f"u{i}", facility)).name
        if owner not in owners:
            owners.add(owner)
            names.append(f"u{i}")
        if owners == masters:
            return names
    raise AssertionError(f"no keys on {masters - owners}")


def sharded_messages(pubsub: Any, count: int, timeout: float = 5) -> list[tuple[str, bytes]]:
    """``count`` messages from a sharded subscription, as (channel, data)."""
    got: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        # Not ignore_subscribe_messages=True: before redis-py 7 it dropped every message.
        m = pubsub.get_sharded_message(timeout=0.05)
        if m is None:
            time.sleep(0.005)  # without a target node, older redis-py does not wait
        elif m["type"] == "smessage":
            got.append((m["channel"].decode(), m["data"]))
    return got


def ssubscribe(cluster: RedisCluster, *channels: str) -> Any:
    """A sharded subscription to ``channels``, each at its owner, confirmed."""
    pubsub = cluster.pubsub()
    pubsub.ssubscribe(*channels)
    confirmed = 0
    deadline = time.monotonic() + 5
    while confirmed < len(channels):
        assert time.monotonic() < deadline, "ssubscribe was not confirmed"
        m = pubsub.get_sharded_message(timeout=0.05)
        if m is not None and m["type"] == "ssubscribe":
            confirmed += 1
    return pubsub


def classic_subscriber(cluster: RedisCluster, channel: str) -> redis.client.PubSub:
    """A plain SUBSCRIBE on a master that does not own ``channel``'s slot: a classic
    PUBLISH reaches every node, a SPUBLISH only the owner's shard."""
    owner = cluster.get_node_from_key(channel).name
    node = next(n for n in cluster.get_primaries() if n.name != owner)
    pubsub = redis.Redis(host=node.host, port=node.port).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    assert pubsub.get_message(timeout=5) is None  # the confirmation, ignored
    return pubsub


def test_sharded_publish_reaches_each_key_on_its_master(cluster: RedisCluster) -> None:
    fac = f"t{uuid.uuid4().hex[:12]}"
    names = users_on_every_master(cluster, fac)
    keys = [KeySpace(PREFIX).user(n, fac) for n in names]
    pubsub = ssubscribe(cluster, *keys)
    classic = classic_subscriber(cluster, keys[0])
    publisher = RedisPublisher(facility=fac, users=names, connection=cluster, prefix=PREFIX)
    assert publisher.publish_message("sharded", expire=30) == keys
    assert sorted(sharded_messages(pubsub, len(keys))) == sorted((k, b"sharded") for k in keys)
    for key in keys:
        assert cluster.get(key) == b"sharded"
        assert 0 < cluster.ttl(key) <= 30
    # SPUBLISH: nothing on the classic channel.
    assert classic.get_message(timeout=0.3) is None
    assert publisher.last_ids == [None] * len(keys)
    pubsub.close()
    classic.close()


def test_settings_pick_the_cluster_and_stored_messages_are_read_at_the_owner(
    cluster: RedisCluster,
) -> None:
    fac = f"t{uuid.uuid4().hex[:12]}"
    with override_settings(WSRELAY_REDIS_URL=None, WSRELAY_REDIS_CLUSTER=SEEDS):
        publisher = RedisPublisher(facility=fac, broadcast=True, users=["jane"], prefix=PREFIX)
        assert isinstance(publisher.connection, RedisCluster)
        assert "cluster " in config.describe(publisher.connection)
        key = KeySpace(PREFIX).broadcast(fac)
        pubsub = ssubscribe(cluster, key)
        publisher.publish_message("kept")
        assert sharded_messages(pubsub, 1) == [(key, b"kept")]
        assert 3500 < cluster.ttl(key) <= 3600
        assert publisher.fetch_message(None, fac) == b"kept"
        publisher.publish_message("gone", expire=0)
        assert cluster.get(KeySpace(PREFIX).user("jane", fac)) == b"kept"  # not overwritten
        pubsub.close()


def test_history_stream_and_id_channel_on_the_keys_slot(cluster: RedisCluster) -> None:
    """A facility with history (``pyfeed/*`` in the test settings): the stream gets the
    entry and the id is announced (SPUBLISH) on the id channel before the message."""
    fac = f"pyfeed/{uuid.uuid4().hex[:8]}"
    keys = KeySpace(PREFIX)
    names = users_on_every_master(cluster, fac)
    audience = [keys.user(n, fac) for n in names]
    channels = [c for k in audience for c in (keys.id_channel(k), k)]
    pubsub = ssubscribe(cluster, *channels)
    publisher = RedisPublisher(facility=fac, users=names, connection=cluster, prefix=PREFIX)
    publisher.publish_message("with id", expire=0)
    ids = publisher.last_ids
    assert len(ids) == len(audience) and all(ids)
    got = sharded_messages(pubsub, 2 * len(audience))
    for key, id_ in zip(audience, ids, strict=True):
        assert id_ is not None
        on_key = [d for c, d in got if c in (key, keys.id_channel(key))]
        assert on_key == [id_.encode(), b"with id"]
        ((stream_id, fields),) = cluster.xrange(keys.history(key))
        assert (stream_id.decode(), fields) == (id_, {b"d": b"with id"})
        assert cluster.get(key) is None
    pubsub.close()


def test_classic_mode_publishes_with_publish(cluster: RedisCluster) -> None:
    fac = f"pyfeed/{uuid.uuid4().hex[:8]}"
    keys = KeySpace(PREFIX)
    key = keys.broadcast(fac)
    classic = classic_subscriber(cluster, key)
    classic.subscribe(keys.id_channel(key))
    assert classic.get_message(timeout=5) is None
    sharded = ssubscribe(cluster, key)
    with override_settings(
        WSRELAY_REDIS_URL=None, WSRELAY_REDIS_CLUSTER=SEEDS, WSRELAY_REDIS_PUBSUB="classic"
    ):
        publisher = RedisPublisher(facility=fac, broadcast=True, prefix=PREFIX)
    publisher.publish_message("classic", expire=30)
    (id_,) = publisher.last_ids
    assert id_ is not None
    first, second = classic.get_message(timeout=5), classic.get_message(timeout=5)
    assert first is not None and second is not None
    assert (first["channel"].decode(), first["data"]) == (keys.id_channel(key), id_.encode())
    assert (second["channel"].decode(), second["data"]) == (key, b"classic")
    assert sharded_messages(sharded, 1, timeout=0.3) == []
    assert cluster.get(key) == b"classic"
    # Without history, and the constructor's pubsub= over the settings.
    plain = f"t{uuid.uuid4().hex[:12]}"
    plain_key = keys.broadcast(plain)
    classic.subscribe(plain_key)
    assert classic.get_message(timeout=5) is None
    RedisPublisher(
        facility=plain, broadcast=True, connection=cluster, prefix=PREFIX, pubsub="classic"
    ).publish_message("plain classic", expire=0)
    message = classic.get_message(timeout=5)
    assert message is not None and message["data"] == b"plain classic"
    assert cluster.get(plain_key) is None
    classic.close()
    sharded.close()
