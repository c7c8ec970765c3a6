"""At login, store the user name and the groups in the session, where the gateway
reads them (``identity.source = "django"`` without a database), and where
``SELF`` finds the groups without a database query (ws4redis's
``ws4redis:memberof``). With ``WSRELAY_IDENTITY_RECORD = True`` the gateway's
identity record (``identity.source = "record"``) is written too, and removed at
logout."""

from __future__ import annotations

import logging
from typing import Any

from django.contrib.auth.signals import user_logged_in, user_logged_out
from django.dispatch import receiver

from wsrelay.config import setting
from wsrelay.publisher import MEMBEROF, USERNAME, clear_identity, set_identity

log = logging.getLogger(__name__)


@receiver(user_logged_in, dispatch_uid="wsrelay.store_identity")
def store_identity(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    session = getattr(request, "session", None)
    if session is None:
        return
    name = user.get_username()
    groups = list(user.groups.values_list("name", flat=True)) if hasattr(user, "groups") else []
    session[USERNAME] = name
    session[MEMBEROF] = groups
    if setting("WSRELAY_IDENTITY_RECORD", default=False):
        if session.session_key is None:
            session.save()
        if session.session_key:
            try:
                set_identity(session.session_key, name, groups, ttl=session.get_expiry_age())
            except Exception:  # a login must not fail because Redis does
                log.exception("wsrelay: cannot write the identity record")


@receiver(user_logged_out, dispatch_uid="wsrelay.clear_identity")
def remove_identity(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    if not setting("WSRELAY_IDENTITY_RECORD", default=False):
        return
    session = getattr(request, "session", None)
    key = getattr(session, "session_key", None)
    if key:
        try:
            clear_identity(key)
        except Exception:
            log.exception("wsrelay: cannot remove the identity record")
