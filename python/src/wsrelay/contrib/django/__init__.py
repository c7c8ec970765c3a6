"""The Django app: add ``"wsrelay.contrib.django"`` to ``INSTALLED_APPS``.

Settings (ws4redis's names are read when wsrelay's are not set):

===========================  =======================  ==============================================
setting                      ws4redis fallback        meaning
===========================  =======================  ==============================================
``WSRELAY_REDIS_URL``        ``WS4REDIS_CONNECTION``  the gateway's Redis
``WSRELAY_REDIS_CLUSTER``                             or: a cluster's seed URLs (``redis.cluster``)
``WSRELAY_REDIS_PUBSUB``                              ``sharded`` or ``classic`` (``redis.pubsub``)
``WSRELAY_REDIS_SENTINEL``                            or: a Sentinel master (``redis.sentinel``)
``WSRELAY_PREFIX``           ``WS4REDIS_PREFIX``      key prefix (the gateway's ``redis.prefix``)
``WSRELAY_EXPIRE``           ``WS4REDIS_EXPIRE``      seconds a message is kept (3600; 0: never)
``WSRELAY_HEARTBEAT``        ``WS4REDIS_HEARTBEAT``   the gateway's ``heartbeat`` string
``WSRELAY_URL``              ``WEBSOCKET_HOST``       the gateway's public URL, if not the site's
                                                      (``https://ws.example.com``)
``WEBSOCKET_URL``                                     the sockets' path prefix (``/ws/``)
``WSRELAY_GATEWAY_URL``                               where ``wsrelay_check`` reaches the gateway
``WSRELAY_IDENTITY_RECORD``                           also write the identity record at login
===========================  =======================  ==============================================
"""

from wsrelay.contrib.django.shortcuts import apublish_message, publish_message

__all__ = ["apublish_message", "publish_message"]
