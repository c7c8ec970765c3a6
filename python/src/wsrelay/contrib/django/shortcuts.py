"""One-call publishing, sync and async."""

from __future__ import annotations

from typing import Any

from wsrelay.publisher import RedisMessage, RedisPublisher


def publish_message(
    message: RedisMessage | str | bytes, *, expire: int | None = None, **audiences: Any
) -> list[str]:
    """``publish_message("hi", facility="chat", broadcast=True)``: builds a
    :class:`~wsrelay.publisher.RedisPublisher` with ``audiences`` and publishes."""
    return RedisPublisher(**audiences).publish_message(message, expire)


async def apublish_message(
    message: RedisMessage | str | bytes, *, expire: int | None = None, **audiences: Any
) -> list[str]:
    """:func:`publish_message` for async (ASGI) views: ``SELF`` is resolved on a sync
    thread (it may read the session and the groups), Redis is written on a worker
    thread."""
    publisher = await RedisPublisher.acreate(**audiences)
    return await publisher.apublish_message(message, expire)
