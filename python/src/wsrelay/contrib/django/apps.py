from __future__ import annotations

from django.apps import AppConfig


class WsrelayConfig(AppConfig):
    name = "wsrelay.contrib.django"
    label = "wsrelay"
    verbose_name = "wsrelay"

    def ready(self) -> None:
        from wsrelay.contrib.django import signals  # noqa: F401  (connects the receivers)
