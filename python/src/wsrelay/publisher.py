"""ws4redis's ``RedisPublisher``, for the wsrelay gateway.

A drop-in for ``ws4redis.publisher``: the same constructor, the same keys, the
same settings. Publishing is ``SET key message EX expire`` (when ``expire > 0``)
and ``PUBLISH key message`` for every key, in one MULTI/EXEC transaction, as
the gateway's own publisher does. In a Redis Cluster a transaction cannot span
slots, so each key is written by a script of its own (atomic for that key), with
``SPUBLISH`` (sharded pub/sub, the default) or ``PUBLISH`` (classic)::

    from wsrelay.publisher import SELF, RedisMessage, RedisPublisher

    publisher = RedisPublisher(facility="chat", broadcast=True)
    publisher.publish_message(RedisMessage("hello"))

    RedisPublisher(facility="notify", users=[SELF], request=request).publish_message("done")
"""

from __future__ import annotations

import asyncio
import json
import re
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from redis.cluster import RedisCluster

from wsrelay import config
from wsrelay.keys import SELF, KeySpace, validate_name

if TYPE_CHECKING:
    from django.http import HttpRequest

__all__ = ["SELF", "RedisMessage", "RedisPublisher", "set_identity", "clear_identity"]

Audience = Literal["broadcast", "group", "user", "session", "any"]
Names = Iterable[Any] | bool | str | None

#: The session field with the user's group names (ws4redis's; the login
#: receiver of ``wsrelay.contrib.django`` stores it).
MEMBEROF = "ws4redis:memberof"
#: The session field with the user name, read by the gateway without a database.
USERNAME = "wsrelay:username"


class RedisMessage(bytes):
    """A message as bytes, as ws4redis's ``RedisMessage``.

    Takes ``str`` (encoded as UTF-8), ``bytes``, ``bytearray`` or ``memoryview``,
    and a pub/sub reply ``[b"message", data]`` or ``[b"message", channel, data]``
    is reduced to its data. As in ws4redis, the heartbeat string
    (``WSRELAY_HEARTBEAT`` / ``WS4REDIS_HEARTBEAT``) and ``None`` give ``None``
    instead of a message.
    """

    def __new__(
        cls, value: str | bytes | bytearray | memoryview | list[Any] | None
    ) -> RedisMessage:
        beat = config.heartbeat()
        data: bytes
        if value is None:
            return None  # type: ignore[return-value]
        if isinstance(value, str):
            data = value.encode()
        elif isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
        elif isinstance(value, list):
            if len(value) >= 2 and value[0] in (b"message", "message"):
                return cls(value[-1])
            return None  # type: ignore[return-value]
        else:
            raise TypeError(f"a message is str or bytes, not {type(value).__name__}")
        if beat is not None and data == beat.encode():
            return None  # type: ignore[return-value]
        return super().__new__(cls, data)


def _is_authenticated(request: HttpRequest | None) -> bool:
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_authenticated)


def _session_key(request: HttpRequest | None) -> str | None:
    session = getattr(request, "session", None)
    if session is None:
        return None
    key: str | None = session.session_key
    return key


def _group_names(request: HttpRequest | None) -> list[str]:
    """The request user's groups: the session's ``ws4redis:memberof`` (no database
    query, as ws4redis), else the user's groups in the database."""
    if not _is_authenticated(request):
        return []
    assert request is not None
    session = getattr(request, "session", None)
    if session is not None:
        stored = session.get(MEMBEROF)
        if stored is not None:
            return [str(g) for g in stored]
    groups = getattr(request.user, "groups", None)
    if groups is None:
        return []
    return [str(name) for name in groups.values_list("name", flat=True)]


def _is_self(name: object) -> bool:
    """``SELF``, ours or ws4redis's (``ws4redis.redis_store.SELF``, an instance of a class
    named ``SELF_TYPE``), so that code written for ws4redis keeps working unchanged."""
    return name is SELF or type(name).__name__ == "SELF_TYPE"


def _expand(kind: str, names: Names, request: HttpRequest | None, own: Any) -> list[str]:
    """ws4redis's reading of ``users=`` / ``groups=`` / ``sessions=``: a list or
    tuple (``SELF`` inside stands for the request's own), ``True`` (deprecated: the
    request's own), a single ``str`` (deprecated), or ``False``/``None``."""
    if names is None or names is False:
        return []
    if names is True:
        warnings.warn(
            f"Wrap {kind}=True into a list or tuple using SELF", DeprecationWarning, stacklevel=4
        )
        names = [SELF]
    elif isinstance(names, str):
        warnings.warn(
            f"Wrap a single {kind[:-1]} into a list or tuple", DeprecationWarning, stacklevel=4
        )
        names = [names]
    elif not isinstance(names, (list, tuple, set, frozenset)):
        raise ValueError(f"Argument `{kind}` must be a list or tuple")
    result: list[str] = []
    for name in names:
        found = own(request) if _is_self(name) else [name]
        for n in found:
            if n is not None and n not in result:
                result.append(str(n))
    return result


# Appends a publication to a key's history and publishes it, in one step, exactly as
# the gateway does (the same text as its src/publish_with_history.lua; a test of the
# package checks it): XADD, trim with XDEL
# (so that the stream remembers the newest id it lost), EXPIRE, SET when expire > 0,
# the id announced on the key's id channel, then PUBLISH of the payload on the key.
# KEYS: the key, its stream. ARGV: payload, expire, history, history_ttl, id channel,
# the publish command (PUBLISH, or SPUBLISH for sharded pub/sub in a Redis Cluster:
# the stream and the id channel carry the key as hash tag, so all share its slot).
_PUBLISH_WITH_HISTORY = """\
local id = redis.call('XADD', KEYS[2], '*', 'd', ARGV[1])
local gone = {}
local excess = math.min(redis.call('XLEN', KEYS[2]) - tonumber(ARGV[3]), 1000)
if excess > 0 then
  for _, e in ipairs(redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', excess)) do
    gone[#gone + 1] = e[1]
  end
end
local now = redis.call('TIME')
local oldest = (tonumber(now[1]) - tonumber(ARGV[4])) * 1000
if oldest > 0 then
  local before = string.format('(%d-0', oldest)
  for _, e in ipairs(redis.call('XRANGE', KEYS[2], '-', before, 'COUNT', 1000)) do
    gone[#gone + 1] = e[1]
  end
end
if #gone > 0 then
  redis.call('XDEL', KEYS[2], unpack(gone))
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
redis.call(ARGV[6], ARGV[5], id)
redis.call(ARGV[6], KEYS[1], ARGV[1])
return id
"""

# One key of a publication in a Redis Cluster, where MULTI/EXEC cannot span the slots
# of several keys: SET when expire > 0, then the publish command, atomically.
# KEYS: the key. ARGV: payload, expire, PUBLISH or SPUBLISH.
_PUBLISH_ONE = """\
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
redis.call(ARGV[3], KEYS[1], ARGV[1])
"""


def _glob_match(pattern: str, text: str) -> bool:
    """``*`` matches any run of characters; everything else matches itself."""
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, text, re.S) is not None


def _history(facility: str, rules: list[dict[str, Any]]) -> tuple[int, int] | None:
    """``(history, history_ttl)`` of the first rule matching ``facility``, if it keeps
    history."""
    for rule in rules:
        if _glob_match(str(rule["pattern"]), facility):
            length = int(rule.get("history", 0))
            return (length, int(rule.get("history_ttl", 3600))) if length > 0 else None
    return None


class RedisPublisher:
    """Publishes to the keys named at construction.

    ``facility``: the facility (the rest of the socket's URL path).
    ``broadcast``: everybody on the facility. ``users``, ``groups``, ``sessions``:
    lists of user names, group names and session keys; ``SELF`` in a list stands
    for the ``request``'s user, its groups, or its session key (and is skipped
    when the request has none). ``connection``: a ``redis.Redis`` client (also a
    Sentinel master's) or a ``redis.cluster.RedisCluster`` (default: one from the
    settings, see :mod:`wsrelay.config`). ``prefix``: the key prefix (default
    ``WSRELAY_PREFIX`` / ``WS4REDIS_PREFIX``). ``pubsub``: with a Redis Cluster,
    ``"sharded"`` (``SPUBLISH``) or ``"classic"`` (``PUBLISH``), as the gateway's
    ``redis.pubsub`` (default ``WSRELAY_REDIS_PUBSUB``, else sharded). Every name is
    checked against the gateway's rules: a name it could never subscribe raises
    ``ValueError``.
    """

    def __init__(
        self,
        facility: str = "",
        broadcast: bool = False,
        users: Names = None,
        groups: Names = None,
        sessions: Names = None,
        request: HttpRequest | None = None,
        connection: config.Client | None = None,
        *,
        prefix: str | None = None,
        pubsub: config.PubSub | None = None,
    ) -> None:
        self._connection = connection if connection is not None else config.get_connection()
        self._cluster = isinstance(self._connection, RedisCluster)
        if pubsub is not None and not self._cluster:
            raise ValueError("pubsub= applies to a Redis Cluster connection only")
        #: The command that publishes: SPUBLISH for sharded pub/sub in a cluster.
        self._publish = "PUBLISH"
        if self._cluster:
            mode = config.check_pubsub(pubsub) if pubsub is not None else config.pubsub()
            self._publish = "SPUBLISH" if mode == "sharded" else "PUBLISH"
        self._keys = KeySpace(prefix if prefix is not None else config.redis_prefix())
        self._expire = config.expire()
        self.facility = facility
        publishers: list[str] = []
        if broadcast is True:
            publishers.append(self._keys.broadcast(facility))
        for g in _expand("groups", groups, request, _group_names):
            publishers.append(self._keys.group(g, facility))
        for u in _expand(
            "users",
            users,
            request,
            lambda r: [r.user.get_username()] if _is_authenticated(r) else [],
        ):
            publishers.append(self._keys.user(u, facility))
        for s in _expand("sessions", sessions, request, lambda r: [_session_key(r)]):
            publishers.append(self._keys.session(s, facility))
        #: The Redis keys this publisher publishes to.
        self.keys: list[str] = list(dict.fromkeys(publishers))
        self._history = _history(facility, config.facilities()) if facility else None
        #: The message id of each key from the last ``publish_message`` (``None``
        #: where the facility keeps no history: see ``WSRELAY_FACILITIES``).
        self.last_ids: list[str | None] = []

    @property
    def connection(self) -> config.Client:
        return self._connection

    def publish_message(
        self, message: RedisMessage | str | bytes, expire: int | None = None
    ) -> list[str]:
        """Publishes ``message`` to every key in one MULTI/EXEC transaction (in a
        Redis Cluster: atomically per key) and keeps it ``expire`` seconds for late
        joiners (default ``WSRELAY_EXPIRE``; 0: not kept). Returns the keys
        published to."""
        if message is None:
            raise ValueError("message is None (a heartbeat is never published)")
        payload = bytes(message) if isinstance(message, bytes) else RedisMessage(message)
        if expire is None:
            expire = self._expire
        if expire < 0:
            raise ValueError("expire must be 0 or more seconds")
        if not self.keys:
            return []
        # In a cluster, a pipeline without MULTI: it sends each node its keys' scripts
        # at once, and each script is atomic on its own key.
        pipe = self._connection.pipeline(transaction=not self._cluster)
        for key in self.keys:
            if self._history is not None:
                length, ttl = self._history
                # EVAL as a plain command: a cluster pipeline routes it by its keys
                # (its own eval() is something else).
                pipe.execute_command(
                    "EVAL",
                    _PUBLISH_WITH_HISTORY,
                    2,
                    key,
                    self._keys.history(key),
                    payload,
                    expire,
                    length,
                    ttl,
                    self._keys.id_channel(key),
                    self._publish,
                )
            elif self._cluster:
                pipe.execute_command("EVAL", _PUBLISH_ONE, 1, key, payload, expire, self._publish)
            else:
                if expire > 0:
                    pipe.set(key, payload, ex=expire)
                pipe.publish(key, payload)
        replies = pipe.execute()
        if self._history is not None:
            self.last_ids = [r.decode() if isinstance(r, bytes) else str(r) for r in replies]
        else:
            self.last_ids = [None] * len(self.keys)
        return list(self.keys)

    async def apublish_message(
        self, message: RedisMessage | str | bytes, expire: int | None = None
    ) -> list[str]:
        """:meth:`publish_message` for async views: runs it on a worker thread."""
        return await asyncio.to_thread(self.publish_message, message, expire)

    @classmethod
    async def acreate(cls, **kwargs: Any) -> RedisPublisher:
        """Builds a publisher from an async view: resolving ``SELF`` may read the
        session and the user's groups, which Django allows on a sync thread only."""
        try:
            from asgiref.sync import sync_to_async
        except ImportError:
            return await asyncio.to_thread(lambda: cls(**kwargs))
        return await sync_to_async(lambda: cls(**kwargs))()

    def fetch_message(
        self, request: HttpRequest | None, facility: str, audience: Audience = "any"
    ) -> RedisMessage | None:
        """The stored message of ``facility`` for the ``request``'s session, user,
        groups or broadcast (``audience`` is one of those or ``"any"``, which tries
        them in that order); the first found, or ``None``."""
        if audience not in ("broadcast", "group", "user", "session", "any"):
            raise ValueError(f"unknown audience {audience!r}")
        keys: list[str] = []
        if audience in ("session", "any"):
            key = _session_key(request)
            if key:
                keys.append(self._keys.session(key, facility))
        if audience in ("user", "any") and _is_authenticated(request):
            assert request is not None
            keys.append(self._keys.user(request.user.get_username(), facility))
        if audience in ("group", "any"):
            keys.extend(self._keys.group(g, facility) for g in _group_names(request))
        if audience in ("broadcast", "any"):
            keys.append(self._keys.broadcast(facility))
        for key in keys:
            value = self._connection.get(key)
            if value:
                return RedisMessage(value)
        return None

    async def afetch_message(
        self, request: HttpRequest | None, facility: str, audience: Audience = "any"
    ) -> RedisMessage | None:
        """:meth:`fetch_message` for async views."""
        try:
            from asgiref.sync import sync_to_async
        except ImportError:
            return await asyncio.to_thread(self.fetch_message, request, facility, audience)
        return await sync_to_async(self.fetch_message)(request, facility, audience)

    def __repr__(self) -> str:
        return f"RedisPublisher(keys={self.keys!r})"


def set_identity(
    session_key: str,
    user: str | None,
    groups: Iterable[str] = (),
    ttl: int = 14 * 86400,
    *,
    connection: config.Client | None = None,
    prefix: str | None = None,
) -> None:
    """Writes the identity record the gateway reads with ``identity.source =
    "record"`` (``{p}wsrelay:identity:{session_key}``), kept ``ttl`` seconds."""
    keys = KeySpace(prefix if prefix is not None else config.redis_prefix())
    groups = list(groups)
    if user is not None:
        validate_name("user name", user)
    for group in groups:
        validate_name("group name", group)
    record = json.dumps({"user": user, "groups": groups})
    conn = connection if connection is not None else config.get_connection()
    conn.set(keys.identity(session_key), record, ex=max(int(ttl), 1))


def clear_identity(
    session_key: str, *, connection: config.Client | None = None, prefix: str | None = None
) -> None:
    """Removes the identity record of ``session_key`` (at logout)."""
    keys = KeySpace(prefix if prefix is not None else config.redis_prefix())
    conn = connection if connection is not None else config.get_connection()
    conn.delete(keys.identity(session_key))
