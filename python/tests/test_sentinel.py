"""RedisPublisher on a master watched by Redis Sentinel: the client asks the sentinels
where the master is (and again after a failover) and publishes as to one Redis (one
MULTI/EXEC, PUBLISH). Runs when ``WSRELAY_TEST_SENTINEL_NODES`` (comma-separated
sentinel URLs) and ``WSRELAY_TEST_SENTINEL_MASTER`` (the master's name) are set."""

from __future__ import annotations

import os
import uuid

import pytest
import redis
from django.test import override_settings

from wsrelay import KeySpace, config
from wsrelay.publisher import RedisPublisher

NODES = [u.strip() for u in os.environ.get("WSRELAY_TEST_SENTINEL_NODES", "").split(",") if u]
MASTER = os.environ.get("WSRELAY_TEST_SENTINEL_MASTER", "")
PREFIX = os.environ.get("WSRELAY_TEST_PREFIX") or "site"

pytestmark = pytest.mark.skipif(
    not (NODES and MASTER),
    reason="no Sentinel: set WSRELAY_TEST_SENTINEL_NODES and WSRELAY_TEST_SENTINEL_MASTER",
)


def test_publish_through_the_sentinels_master() -> None:
    fac = f"pyfeed/{uuid.uuid4().hex[:8]}"
    keys = KeySpace(PREFIX)
    key = keys.user("jane", fac)
    sentinel = {"master": MASTER, "nodes": NODES}
    with override_settings(WSRELAY_REDIS_URL=None, WSRELAY_REDIS_SENTINEL=sentinel):
        publisher = RedisPublisher(facility=fac, users=["jane"], prefix=PREFIX)
    master = publisher.connection
    assert isinstance(master, redis.Redis)
    assert config.describe(master) == f"sentinel master {MASTER}/0"
    pubsub = master.pubsub()
    pubsub.subscribe(keys.id_channel(key), key)
    for _ in range(2):
        confirmation = pubsub.get_message(timeout=5)
        assert confirmation is not None and confirmation["type"] == "subscribe"
    publisher.publish_message("via sentinel", expire=30)
    (id_,) = publisher.last_ids
    assert id_ is not None
    got = [pubsub.get_message(timeout=5) for _ in range(2)]
    assert [(m["channel"].decode(), m["data"]) for m in got if m] == [
        (keys.id_channel(key), id_.encode()),
        (key, b"via sentinel"),
    ]
    assert master.get(key) == b"via sentinel"
    assert [i.decode() for i, _ in master.xrange(keys.history(key))] == [id_]
    # Plain facility: the MULTI/EXEC path of one Redis.
    plain = f"t{uuid.uuid4().hex[:12]}"
    RedisPublisher(
        facility=plain, broadcast=True, connection=master, prefix=PREFIX
    ).publish_message("plain", expire=30)
    assert master.get(keys.broadcast(plain)) == b"plain"
    pubsub.close()
