"""Settings, read from Django's settings when Django is configured.

==========================  ==========================================  ==========
wsrelay setting             ws4redis fallback                           default
==========================  ==========================================  ==========
``WSRELAY_REDIS_URL``       ``WS4REDIS_CONNECTION`` (a dict of           ``redis://localhost:6379/0``
                            ``redis.Redis`` arguments)
``WSRELAY_REDIS_CLUSTER``   none                                        none
``WSRELAY_REDIS_PUBSUB``    none                                        ``"sharded"``
``WSRELAY_REDIS_SENTINEL``  none                                        none
``WSRELAY_PREFIX``          ``WS4REDIS_PREFIX``                          none
``WSRELAY_EXPIRE``          ``WS4REDIS_EXPIRE``                          3600
``WSRELAY_HEARTBEAT``       ``WS4REDIS_HEARTBEAT``                       none
``WSRELAY_FACILITIES``      none                                        none
==========================  ==========================================  ==========

Redis is one of three topologies, as the gateway's ``redis.url``,
``redis.cluster`` and ``redis.sentinel`` (set at most one):

- ``WSRELAY_REDIS_URL``: one Redis.
- ``WSRELAY_REDIS_CLUSTER``: a Redis Cluster, as a list of seed URLs
  (``["redis://h1:7000", "redis://h2:7000"]``; any reachable one will do, the
  rest is discovered; credentials and TLS come from the first). Publications go
  out with ``SPUBLISH`` (``WSRELAY_REDIS_PUBSUB = "sharded"``, the default) or
  ``PUBLISH`` (``"classic"``), which must be the gateway's ``redis.pubsub``.
- ``WSRELAY_REDIS_SENTINEL``: a master watched by Redis Sentinel,
  ``{"master": "mymaster", "nodes": ["redis://h:26379", …]}`` with optional
  ``"db"`` and ``"password"`` (the master's); the client asks the sentinels for
  the master again after a failover.

``WSRELAY_FACILITIES`` repeats the gateway's ``[[facility]]`` rules that keep
history, as a list of dicts (``[{"pattern": "orders/*", "history": 100,
"history_ttl": 3600}]``), so that publications on those facilities get message
ids, as the gateway's own do.

Outside Django every setting has its default; pass ``connection=`` (for example
``connect(cluster=[…])``), ``prefix=`` and ``pubsub=`` to the publisher instead.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeAlias

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import parse_url
from redis.sentinel import Sentinel

__all__ = [
    "Client",
    "PubSub",
    "setting",
    "redis_prefix",
    "expire",
    "heartbeat",
    "facilities",
    "pubsub",
    "connect",
    "describe",
    "get_connection",
]

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_EXPIRE = 3600

#: What publishes: one Redis (also a Sentinel master) or a Redis Cluster.
Client: TypeAlias = redis.Redis | RedisCluster
#: How publications travel in a Redis Cluster (the gateway's ``redis.pubsub``).
PubSub: TypeAlias = Literal["sharded", "classic"]

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


def check_pubsub(value: object) -> PubSub:
    """``value`` as a :data:`PubSub`, or ``ValueError`` naming the two choices."""
    if value == "sharded" or value == "classic":
        return value
    raise ValueError(f'pubsub must be "sharded" or "classic", not {value!r}')


def pubsub() -> PubSub:
    """``WSRELAY_REDIS_PUBSUB``: ``"sharded"`` (``SPUBLISH``, the default) or
    ``"classic"`` (``PUBLISH``); it applies to a Redis Cluster only and must match the
    gateway's ``redis.pubsub``."""
    return check_pubsub(setting("WSRELAY_REDIS_PUBSUB") or "sharded")


def _seeds(cluster: str | Sequence[str]) -> tuple[str, ...]:
    seeds = (cluster,) if isinstance(cluster, str) else tuple(str(u) for u in cluster)
    if not seeds:
        raise ValueError("a Redis Cluster needs at least one seed URL")
    return seeds


def _sentinel_spec(sentinel: Mapping[str, Any]) -> tuple[Any, ...]:
    unknown = set(sentinel) - {"master", "nodes", "db", "password"}
    if unknown:
        raise ValueError(
            f"unknown Sentinel settings {sorted(unknown)}: master, nodes, db, password"
        )
    master = str(sentinel.get("master") or "")
    nodes = tuple(str(u) for u in sentinel.get("nodes") or ())
    if not master:
        raise ValueError('Sentinel: "master" must name the master')
    if not nodes:
        raise ValueError('Sentinel: "nodes" must list at least one sentinel URL')
    return (master, nodes, int(sentinel.get("db") or 0), sentinel.get("password"))


def _spec(
    url: str | None, cluster: str | Sequence[str] | None, sentinel: Mapping[str, Any] | None
) -> tuple[str, Any]:
    """A hashable description of one topology (so that clients can be shared), after
    checking that exactly one is given."""
    given = [n for n, v in (("url", url), ("cluster", cluster), ("sentinel", sentinel)) if v]
    if len(given) > 1:
        raise ValueError(
            "set one of the Redis URL, the cluster seeds and the Sentinel master, not "
            + " and ".join(given)
        )
    if cluster:
        return ("cluster", _seeds(cluster))
    if sentinel:
        return ("sentinel", _sentinel_spec(sentinel))
    return ("url", str(url or DEFAULT_REDIS_URL))


def _build(spec: tuple[str, Any]) -> Client:
    kind, value = spec
    if kind == "url":
        return redis.Redis.from_url(value)
    if kind == "kwargs":
        kwargs = dict(value)
        if "unix_socket_path" in kwargs:
            # ws4redis's form; redis-py takes it as is.
            kwargs.pop("host", None)
            kwargs.pop("port", None)
        return redis.Redis(**kwargs)
    if kind == "cluster":
        first, *others = value
        # The first URL carries the options (credentials, TLS); the others are more
        # ways in, should the first be down.
        nodes = [ClusterNode(o["host"], o["port"]) for o in map(parse_url, others)]  # type: ignore[no-untyped-call]
        return RedisCluster(url=first, startup_nodes=nodes)
    master, nodes, db, password = value
    addresses = [parse_url(u) for u in nodes]  # type: ignore[no-untyped-call]
    auth = {k: addresses[0][k] for k in ("username", "password") if addresses[0].get(k)}
    watcher = Sentinel(  # type: ignore[no-untyped-call]
        [(a["host"], a["port"]) for a in addresses], sentinel_kwargs=auth or None
    )
    client: redis.Redis = watcher.master_for(master, db=db, password=password)  # type: ignore[no-untyped-call]
    return client


def connect(
    *,
    url: str | None = None,
    cluster: str | Sequence[str] | None = None,
    sentinel: Mapping[str, Any] | None = None,
) -> Client:
    """A new client for one Redis (``url``), a Redis Cluster (``cluster``: seed URLs)
    or a Sentinel master (``sentinel``: ``{"master": …, "nodes": [URLs]}``), the
    forms of the settings; for ``connection=`` outside Django."""
    return _build(_spec(url, cluster, sentinel))


def _connection_spec() -> tuple[str, Any]:
    url = setting("WSRELAY_REDIS_URL")
    cluster = setting("WSRELAY_REDIS_CLUSTER")
    sentinel = setting("WSRELAY_REDIS_SENTINEL")
    if setting("WSRELAY_REDIS_PUBSUB") and not cluster:
        raise ValueError(
            "WSRELAY_REDIS_PUBSUB applies to a Redis Cluster only (WSRELAY_REDIS_CLUSTER)"
        )
    try:
        if url or cluster or sentinel:
            return _spec(url, cluster, sentinel)
    except ValueError as e:
        raise ValueError(f"WSRELAY_REDIS_URL / _CLUSTER / _SENTINEL: {e}") from None
    conn = setting("WS4REDIS_CONNECTION")
    if conn:
        return ("kwargs", tuple(sorted(dict(conn).items())))
    return ("url", DEFAULT_REDIS_URL)


_lock = threading.Lock()
_clients: dict[tuple[str, Any], Client] = {}


def get_connection() -> Client:
    """A client (with its own connection pool) for the configured Redis, shared by
    every publisher with the same settings."""
    spec = _connection_spec()
    with _lock:
        client = _clients.get(spec)
        if client is None:
            client = _build(spec)
            _clients[spec] = client
        return client


def describe(client: Client) -> str:
    """Where ``client`` goes, for messages (``wsrelay_check``): ``host:port/db``, the
    cluster's nodes, or the Sentinel master's name."""
    if isinstance(client, RedisCluster):
        nodes = sorted(n.name for n in client.get_primaries())  # type: ignore[no-untyped-call]
        return f"cluster {', '.join(nodes)}"
    pool = client.connection_pool
    service = getattr(pool, "service_name", None)
    where = pool.connection_kwargs
    if service is not None:
        return f"sentinel master {service}/{where.get('db', 0)}"
    return where.get("path") or f"{where.get('host')}:{where.get('port')}/{where.get('db', 0)}"
