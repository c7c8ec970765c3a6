"""Publishing through the gateway's ``POST /api/publish`` (standard library only).

::

    from wsrelay.http import HttpPublisher

    api = HttpPublisher("http://127.0.0.1:8080", token="...")   # the gateway's publish_token
    api.publish("chat", "hello", broadcast=True, users=["jane"])
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterable

__all__ = ["HttpPublisher", "PublishError"]


class PublishError(Exception):
    """The gateway did not answer 2xx, or could not be reached (``status`` 0)."""

    def __init__(self, status: int, reason: str, body: str = "") -> None:
        self.status = status
        self.reason = reason
        self.body = body
        detail = f": {body}" if body else ""
        super().__init__(f"POST /api/publish failed with {status} {reason}{detail}")


class HttpPublisher:
    """Publishes through ``url`` (the gateway's base URL, ``http://host:port``, or the
    full ``…/api/publish`` URL) with the bearer ``token`` (the gateway's
    ``publish_token``)."""

    def __init__(self, url: str, token: str, timeout: float = 5.0) -> None:
        url = url.rstrip("/")
        self.url = url if url.endswith("/api/publish") else url + "/api/publish"
        self.token = token
        self.timeout = timeout

    def publish(
        self,
        facility: str,
        message: str | bytes,
        *,
        broadcast: bool = False,
        users: Iterable[str] = (),
        groups: Iterable[str] = (),
        sessions: Iterable[str] = (),
        expire: int | None = None,
    ) -> list[str]:
        """Publishes ``message`` (UTF-8 text: the API carries it in JSON) and returns
        the Redis keys the gateway published to. ``expire``: seconds to keep it for
        late joiners (default the gateway's ``redis.expire``; 0: not kept).
        Raises :class:`PublishError` on any answer but 2xx."""
        if isinstance(message, (bytes, bytearray)):
            try:
                message = bytes(message).decode()
            except UnicodeDecodeError:
                raise ValueError(
                    "the publish API carries UTF-8 text only; publish binary "
                    "messages with wsrelay.publisher.RedisPublisher"
                ) from None
        body: dict[str, object] = {
            "facility": facility,
            "audiences": {
                "broadcast": bool(broadcast),
                "users": list(users),
                "groups": list(groups),
                "sessions": list(sessions),
            },
            "message": message,
        }
        if expire is not None:
            body["expire"] = int(expire)
        request = urllib.request.Request(
            self.url,
            data=json.dumps(body).encode(),
            method="POST",
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace").strip()
            raise PublishError(e.code, str(e.reason), text) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise PublishError(0, f"gateway unreachable: {reason}") from e
        keys = answer.get("keys", []) if isinstance(answer, dict) else []
        return [str(k) for k in keys]

    async def apublish(
        self,
        facility: str,
        message: str | bytes,
        *,
        broadcast: bool = False,
        users: Iterable[str] = (),
        groups: Iterable[str] = (),
        sessions: Iterable[str] = (),
        expire: int | None = None,
    ) -> list[str]:
        """:meth:`publish` on a worker thread, for async views."""
        import asyncio

        return await asyncio.to_thread(
            self.publish,
            facility,
            message,
            broadcast=broadcast,
            users=list(users),
            groups=list(groups),
            sessions=list(sessions),
            expire=expire,
        )
