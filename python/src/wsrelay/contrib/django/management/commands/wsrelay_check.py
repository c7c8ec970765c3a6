"""``manage.py wsrelay_check``: is the gateway reachable, on the same Redis and prefix?

1. connects to Redis (``WSRELAY_REDIS_URL`` / ``WS4REDIS_CONNECTION``, or the cluster
   or Sentinel master of ``WSRELAY_REDIS_CLUSTER`` / ``WSRELAY_REDIS_SENTINEL``) and
   PINGs it;
2. asks the gateway's ``/ready`` (``WSRELAY_GATEWAY_URL`` or ``--gateway``);
3. opens a socket on ``/ws/<facility>?subscribe-broadcast``, publishes a probe with
   :class:`~wsrelay.publisher.RedisPublisher` (not stored) and waits for it on the
   socket: that proves the gateway reads the keys this site writes.

Prints one line per step; exits non-zero at the first failure.
"""

from __future__ import annotations

import secrets
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from django.core.management.base import BaseCommand, CommandError, CommandParser

from wsrelay import config
from wsrelay._wsclient import HandshakeError, WebSocket
from wsrelay.contrib.django import settings
from wsrelay.publisher import RedisPublisher


class Command(BaseCommand):
    help = "Checks Redis, the gateway's /ready, and a probe published through Redis to a socket."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--gateway", help="the gateway's URL (default WSRELAY_GATEWAY_URL)")
        parser.add_argument("--facility", default="wsrelay-check", help="facility of the probe")
        parser.add_argument("--timeout", type=float, default=5.0, help="seconds per step")

    def handle(self, *args: Any, **options: Any) -> None:
        timeout: float = options["timeout"]
        facility: str = options["facility"]
        gateway = (options["gateway"] or settings.gateway_url() or "").rstrip("/")
        if not gateway:
            raise CommandError("set WSRELAY_GATEWAY_URL (or pass --gateway http://host:port)")
        if urlsplit(gateway).scheme != "http":
            raise CommandError(f"the gateway URL must be http://host:port, not {gateway!r}")

        conn = config.get_connection()
        prefix = config.redis_prefix()
        try:
            target = config.describe(conn)
            conn.ping()
        except Exception as e:
            raise CommandError(f"redis: cannot reach {target}: {e}") from e
        self.stdout.write(f"redis: ok ({target}, prefix {prefix!r})")

        try:
            with urllib.request.urlopen(gateway + "/ready", timeout=timeout) as r:
                status, body = r.status, r.read().decode(errors="replace").strip()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read().decode(errors="replace").strip()
        except OSError as e:
            raise CommandError(f"gateway: cannot reach {gateway}/ready: {e}") from e
        if status != 200:
            raise CommandError(f"gateway: {gateway}/ready answered {status} {body}")
        self.stdout.write(f"gateway: {gateway}/ready answered {status} {body}")

        ws_url = "ws://" + urlsplit(gateway).netloc + settings.websocket_url()
        ws_url += f"{facility}?subscribe-broadcast"
        try:
            socket = WebSocket(ws_url, timeout=timeout)
        except HandshakeError as e:
            raise CommandError(f"socket: {ws_url} refused with {e.status}: {e.body}") from e
        except OSError as e:
            raise CommandError(f"socket: cannot open {ws_url}: {e}") from e
        probe = f"wsrelay-check {secrets.token_hex(8)}"
        publisher = RedisPublisher(facility=facility, broadcast=True)
        started = time.monotonic()
        deadline = started + timeout
        received = False
        try:
            # The gateway subscribes right after the upgrade: publish until it hears.
            while not received and time.monotonic() < deadline:
                publisher.publish_message(probe, expire=0)
                try:
                    while True:
                        message = socket.recv(timeout=0.25)
                        if message == probe:
                            received = True
                            break
                except TimeoutError:
                    pass
        except ConnectionError as e:
            raise CommandError(f"socket: {e}") from e
        finally:
            socket.close()
        if not received:
            raise CommandError(
                f"probe: published to {publisher.keys[0]} but nothing came out of {ws_url} "
                f"within {timeout}s: is the gateway on the same Redis and prefix "
                f"({prefix!r})?"
            )
        took = (time.monotonic() - started) * 1000
        self.stdout.write(
            f"probe: published to {publisher.keys[0]}, received on {ws_url} in {took:.0f} ms"
        )
        self.stdout.write(self.style.SUCCESS("wsrelay: ok"))
