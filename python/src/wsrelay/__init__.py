"""Publish to the wsrelay WebSocket gateway from Python.

``wsrelay.publisher.RedisPublisher`` is a drop-in for django-websocket-redis's
publisher (same constructor, same Redis keys); ``wsrelay.http.HttpPublisher``
publishes through the gateway's ``POST /api/publish`` instead of Redis;
``wsrelay.contrib.django`` is the Django app (settings, context processor,
login receiver, ``wsrelay_check`` command).
"""

from wsrelay.keys import SELF, KeySpace, validate_name

__all__ = ["SELF", "KeySpace", "validate_name", "__version__"]

__version__ = "0.1.0"
