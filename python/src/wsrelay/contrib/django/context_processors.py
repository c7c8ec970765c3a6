"""``"wsrelay.contrib.django.context_processors.default"``: ws4redis's context
processor, with the helper script's URL.

Gives ``WEBSOCKET_URI`` (``wss://host/ws/``: append the facility and flags),
``WS4REDIS_HEARTBEAT`` (the heartbeat as a JavaScript literal, or ``null``) and
``WSRELAY_JS`` (``/wsrelay.js``, served by the gateway, or under ``WSRELAY_URL``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from django.utils.safestring import SafeString, mark_safe

from wsrelay import config
from wsrelay.contrib.django import settings

if TYPE_CHECKING:
    from django.http import HttpRequest


def default(request: HttpRequest) -> dict[str, str | SafeString]:
    public = settings.public_url()
    if public:
        parts = urlsplit(public)
        secure = parts.scheme in ("https", "wss")
        host = parts.netloc
        script = f"{public}/wsrelay.js"
    else:
        secure = request.is_secure()
        host = settings.websocket_host() or request.get_host()
        script = "/wsrelay.js"
    beat = config.heartbeat()
    # json.dumps of a str is a valid JavaScript string literal; "</" is escaped so it
    # cannot end a <script> element.
    literal = json.dumps(beat).replace("</", "<\\/") if beat else "null"
    return {
        "WEBSOCKET_URI": ("wss://" if secure else "ws://") + host + settings.websocket_url(),
        "WS4REDIS_HEARTBEAT": mark_safe(literal),
        "WSRELAY_JS": script,
    }
