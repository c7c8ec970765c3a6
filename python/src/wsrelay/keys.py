"""The gateway's key layout, and the names it accepts (the same rules as its
``src/channel.rs``).

==========  =====================================
audience    key
==========  =====================================
broadcast   ``{p}broadcast:{facility}``
user        ``{p}user:{username}:{facility}``
group       ``{p}group:{group}:{facility}``
session     ``{p}session:{session_key}:{facility}``
==========  =====================================

``{p}`` is ``{prefix}:`` when a prefix is set (``WS4REDIS_PREFIX`` and the
gateway's ``redis.prefix``), empty otherwise.

A facility with history adds, for each key, a stream ``{p}wsrelay:history:{<key>}``
and an id channel ``{p}wsrelay:id:{<key>}``, where ``<key>`` is the whole key
(prefix included) in braces: a Redis Cluster hash tag, so that the stream and the
id channel live on the key's own slot and one script can touch all three. The
audience keys themselves need no tag (each is independent), and no name may
contain braces, so the tag is always the whole key.
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = ["SELF", "MAX_NAME_LEN", "NameKind", "KeySpace", "validate_name"]

NameKind = Literal["facility", "user name", "group name", "session key"]

#: The longest facility, user, group or session name, in UTF-8 bytes.
MAX_NAME_LEN: Final = 256

_REFUSED: Final = frozenset(":*?[]{}\\\"'")


class _SelfType:
    """The type of :data:`SELF`."""

    _instance: _SelfType | None = None

    def __new__(cls) -> _SelfType:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "SELF"


#: Stands for the request's own user, groups or session key in ``users=``,
#: ``groups=`` and ``sessions=`` (ws4redis's ``ws4redis.redis_store.SELF``).
SELF: Final = _SelfType()


def _refused_char(c: str) -> bool:
    # Rust's char::is_whitespace / is_control, as far as Python can tell them.
    return c in _REFUSED or c.isspace() or (ord(c) < 0x20) or (0x7F <= ord(c) <= 0x9F)


def validate_name(kind: NameKind, name: str) -> None:
    """Raises ``ValueError`` when the gateway would refuse ``name`` in a key.

    Refused: empty names, names over 256 bytes, ``:`` (the separator),
    ``* ? [ ] \\`` (patterns), ``{ }`` (Cluster hash tags), quotes, whitespace
    and control characters; ``/`` is allowed in a facility only, between
    non-empty segments other than ``.`` and ``..``.
    """
    if not isinstance(name, str):
        raise TypeError(f"{kind} must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError(f"{kind} is empty")
    if len(name.encode()) > MAX_NAME_LEN:
        raise ValueError(f"{kind} is longer than {MAX_NAME_LEN} bytes")
    facility = kind == "facility"
    for c in name:
        if _refused_char(c) or (c == "/" and not facility):
            raise ValueError(
                f"{kind} {name!r} contains {c!r}; refused are : * ? [ ] {{ }} \\ \" ' "
                "spaces and control characters" + ("" if facility else ", and /")
            )
    if facility and any(s in ("", ".", "..") for s in name.split("/")):
        raise ValueError(f"facility {name!r} has an empty, '.' or '..' path segment")


class KeySpace:
    """Builds the Redis keys of one prefix."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str | None = None) -> None:
        #: ``"{prefix}:"``, or empty.
        self.prefix: str = f"{prefix}:" if prefix else ""

    def broadcast(self, facility: str) -> str:
        validate_name("facility", facility)
        return f"{self.prefix}broadcast:{facility}"

    def user(self, name: str, facility: str) -> str:
        validate_name("facility", facility)
        validate_name("user name", name)
        return f"{self.prefix}user:{name}:{facility}"

    def group(self, name: str, facility: str) -> str:
        validate_name("facility", facility)
        validate_name("group name", name)
        return f"{self.prefix}group:{name}:{facility}"

    def session(self, key: str, facility: str) -> str:
        validate_name("facility", facility)
        validate_name("session key", key)
        return f"{self.prefix}session:{key}:{facility}"

    def identity(self, session_key: str) -> str:
        """The gateway's identity record of a session (``identity.source = "record"``)."""
        validate_name("session key", session_key)
        return f"{self.prefix}wsrelay:identity:{session_key}"

    def history(self, key: str) -> str:
        """The stream that keeps ``key``'s history (a facility with history); ``key``
        is the whole key, and its hash tag puts the stream on the key's slot."""
        return f"{self.prefix}wsrelay:history:{{{key}}}"

    def id_channel(self, key: str) -> str:
        """Where a publication's id is announced, just before it goes out on ``key``
        (on the key's slot too, for ``SPUBLISH`` from the same script)."""
        return f"{self.prefix}wsrelay:id:{{{key}}}"

    def __repr__(self) -> str:
        return f"KeySpace({self.prefix[:-1]!r})" if self.prefix else "KeySpace(None)"
