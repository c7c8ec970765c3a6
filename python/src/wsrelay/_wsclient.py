"""A minimal blocking WebSocket client (RFC 6455, standard library only), enough to
check that a publication comes out of the gateway: ``ws://`` only, no extensions."""

from __future__ import annotations

import base64
import os
import socket
import struct
from urllib.parse import urlsplit

__all__ = ["WebSocket", "HandshakeError"]


class HandshakeError(Exception):
    """The server did not upgrade; ``status`` and ``body`` say why."""

    def __init__(self, status: int, body: str) -> None:
        self.status = status
        self.body = body
        super().__init__(f"handshake refused with {status}: {body}")


class WebSocket:
    """``WebSocket("ws://host:port/ws/chat?subscribe-broadcast", cookie="sessionid=…")``."""

    def __init__(self, url: str, cookie: str | None = None, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "ws":
            raise ValueError(f"only ws:// URLs are supported, not {url!r}")
        host = parts.hostname or "127.0.0.1"
        port = parts.port or 80
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        head = [
            f"GET {path} HTTP/1.1",
            f"Host: {parts.netloc}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if cookie:
            head.append(f"Cookie: {cookie}")
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        self._buf = b""
        while b"\r\n\r\n" not in self._buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise HandshakeError(0, "connection closed during the handshake")
            self._buf += chunk
        response, self._buf = self._buf.split(b"\r\n\r\n", 1)
        status_line = response.split(b"\r\n", 1)[0].decode(errors="replace")
        status = int(status_line.split()[1])
        if status != 101:
            self.sock.settimeout(1.0)
            try:
                body = self._buf + self.sock.recv(4096)
            except OSError:
                body = self._buf
            self.sock.close()
            raise HandshakeError(status, body.decode(errors="replace").strip())

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send(self, message: str | bytes) -> None:
        if isinstance(message, str):
            self._send(0x1, message.encode())
        else:
            self._send(0x2, message)

    def recv(self, timeout: float | None = None) -> str | bytes:
        """The next message (``str`` from a text frame, ``bytes`` from a binary one);
        pings are answered on the way. Raises ``TimeoutError`` (``socket.timeout``)
        when nothing arrives within ``timeout``."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        message = b""
        kind = 0
        while True:
            b0, b1 = self._read(2)
            opcode = b0 & 0x0F
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._read(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._read(8))
            payload = self._read(n)
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                raise ConnectionError(f"closed by the server ({code} {payload[2:].decode()!r})")
            if opcode in (0x1, 0x2):
                kind = opcode
            message += payload
            if b0 & 0x80:
                return message.decode() if kind == 0x1 else message

    def close(self) -> None:
        try:
            self._send(0x8, struct.pack("!H", 1000))
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> WebSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
