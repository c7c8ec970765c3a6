"""A real Django site for the gateway's tests, driven one JSON line at a time.

The Rust tests start it (tests/gateway/django_site.rs) with the interpreter of
a virtual environment holding Django 5.2, django-redis, psycopg and PyMySQL
(`bash .ci/run` makes one under target/django-venv). Its settings come from
environment variables:

    WSRELAY_DJANGO_DATABASE_URL        postgres://user@host:port/name,
                                       mysql://user:password@host:port/name
                                       or sqlite:///absolute/path
    WSRELAY_DJANGO_REDIS_URL           the cache (django-redis); empty: Django's
                                       local-memory cache, seen by nobody else
    WSRELAY_DJANGO_CACHE_KEY_PREFIX    the cache's KEY_PREFIX
    WSRELAY_DJANGO_SECRET_KEY          SECRET_KEY
    WSRELAY_DJANGO_SECRET_KEY_FALLBACKS  SECRET_KEY_FALLBACKS, a JSON list

On start it applies the migrations of contenttypes, auth and sessions and
writes one line, {"ready": {...}}. Then each line read from standard input is
a request, {"cmd": NAME, ...arguments}, answered by one line on standard
output: {"ok": RESULT} or {"error": MESSAGE, "traceback": TEXT}. Everything
else the site prints goes to standard error. It exits when standard input
closes.

Sessions are made the way a site makes them: django.contrib.auth.login through
Django's test client, with no field of the gateway's own added. The engine is
chosen per request: "db", "cached_db", "cache" or "signed_cookies".
"""

import json
import os
import sys
import traceback
from contextlib import contextmanager
from datetime import timedelta
from importlib import import_module
from urllib.parse import unquote, urlsplit

# Answers go to the real standard output; anything Django or a library prints
# goes to standard error so that it cannot be read as an answer.
ANSWERS = sys.stdout
sys.stdout = sys.stderr

ENGINES = ("db", "cached_db", "cache", "signed_cookies")
MODEL_BACKEND = "django.contrib.auth.backends.ModelBackend"


def database(url):
    """Django's DATABASES["default"] for a database URL."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        # sqlite:///absolute/path (the form sqlx reads too); a query is sqlx's.
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": parts.path}
    common = {
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
    }
    if parts.scheme in ("postgres", "postgresql"):
        return {"ENGINE": "django.db.backends.postgresql", **common}
    if parts.scheme in ("mysql", "mariadb"):
        # PyMySQL stands in for mysqlclient, so that nothing has to be compiled.
        import pymysql

        pymysql.install_as_MySQLdb()
        return {
            "ENGINE": "django.db.backends.mysql",
            "OPTIONS": {"charset": "utf8mb4"},
            **common,
        }
    raise SystemExit(f"unsupported database URL scheme: {parts.scheme!r}")


def configure():
    from django.conf import settings

    env = os.environ
    redis_url = env.get("WSRELAY_DJANGO_REDIS_URL", "")
    if redis_url:
        cache = {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": redis_url,
            "KEY_PREFIX": env.get("WSRELAY_DJANGO_CACHE_KEY_PREFIX", ""),
        }
    else:
        cache = {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    settings.configure(
        DEBUG=False,
        SECRET_KEY=env["WSRELAY_DJANGO_SECRET_KEY"],
        SECRET_KEY_FALLBACKS=json.loads(
            env.get("WSRELAY_DJANGO_SECRET_KEY_FALLBACKS") or "[]"
        ),
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "django.contrib.sessions",
        ],
        DATABASES={"default": database(env["WSRELAY_DJANGO_DATABASE_URL"])},
        CACHES={"default": cache},
        SESSION_ENGINE="django.contrib.sessions.backends.db",
        SESSION_COOKIE_NAME="sessionid",
        # JSONSerializer is Django's default; named here because the gateway relies on it.
        SESSION_SERIALIZER="django.contrib.sessions.serializers.JSONSerializer",
        AUTHENTICATION_BACKENDS=[MODEL_BACKEND],
        # A test site: the fastest hasher. Only the hash's value matters to the
        # gateway (it keys _auth_user_hash), not how it was computed.
        PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],
        USE_TZ=True,
        TIME_ZONE="UTC",
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        ALLOWED_HOSTS=["*"],
    )


def engine_module(engine):
    if engine not in ENGINES:
        raise ValueError(f"unknown session engine {engine!r}, expected one of {ENGINES}")
    return f"django.contrib.sessions.backends.{engine}"


@contextmanager
def engine_settings(engine, secret_key=None):
    from django.test import override_settings

    changes = {"SESSION_ENGINE": engine_module(engine)}
    if secret_key is not None:
        changes["SECRET_KEY"] = secret_key
    with override_settings(**changes):
        yield import_module(changes["SESSION_ENGINE"]).SessionStore


def user(name):
    from django.contrib.auth.models import User

    return User.objects.get(username=name)


def log_in(name, engine, secret_key=None, memberof=None):
    """Logs `name` in through the test client; returns the sessionid cookie value.

    With `memberof`, a receiver of user_logged_in stores it under
    ws4redis:memberof during the login, as a stock ws4redis site does."""
    from django.contrib.auth.signals import user_logged_in
    from django.test import Client

    def store_groups(sender, request, **kwargs):
        request.session["ws4redis:memberof"] = list(memberof)

    if memberof is not None:
        user_logged_in.connect(store_groups, dispatch_uid="wsrelay-test-ws4redis")
    try:
        with engine_settings(engine, secret_key):
            client = Client()
            client.force_login(user(name), backend=MODEL_BACKEND)
            return client.cookies["sessionid"].value
    finally:
        user_logged_in.disconnect(dispatch_uid="wsrelay-test-ws4redis")


def read_only(store):
    """Keeps Django from changing the store while it judges a session:
    auth.get_user flushes a session whose hash no longer matches and cycles the
    key of one that matched a fallback secret."""
    for name in ("save", "delete", "flush", "cycle_key", "create"):
        setattr(store, name, lambda *args, **kwargs: None)
    return store


# ---- the commands ---------------------------------------------------------
# Each is called with the request's fields as keyword arguments; what it returns
# is the answer's "ok". Django's modules are imported inside the functions: most
# can be imported only once the settings are configured and apps are loaded.


def create_user(name, password, active=True, groups=()):
    from django.contrib.auth.models import Group, User

    new = User.objects.create_user(username=name, password=password, is_active=active)
    for group in groups:
        new.groups.add(Group.objects.get_or_create(name=group)[0])
    return new.pk


def add_to_group(name, group):
    from django.contrib.auth.models import Group

    user(name).groups.add(Group.objects.get_or_create(name=group)[0])


def remove_from_group(name, group):
    from django.contrib.auth.models import Group

    user(name).groups.remove(Group.objects.get(name=group))


def set_password(name, password):
    # A new password changes the hash that _auth_user_hash is checked against.
    found = user(name)
    found.set_password(password)
    found.save()


def set_active(name, active):
    found = user(name)
    found.is_active = active
    found.save()


def login(name, engine, secret_key=None):
    return log_in(name, engine, secret_key)


def stock_ws4redis_session(name, engine, memberof):
    return log_in(name, engine, memberof=memberof)


def expire_session(session_key):
    """Ends a session as time does: the database row's expire_date goes into
    the past and the cache copies go away (what their TTL would have done).
    Returns what was there: {"db_row": bool, "cache": [engines]}."""
    from django.contrib.sessions.models import Session
    from django.utils import timezone

    if ":" in session_key:
        raise ValueError(
            "a signed cookie holds its session: it cannot be expired on the server "
            "(Django checks its age against SESSION_COOKIE_AGE when it loads it)"
        )
    past = timezone.now() - timedelta(days=1)
    rows = Session.objects.filter(session_key=session_key).update(expire_date=past)
    return {"db_row": rows > 0, "cache": drop_cached(session_key)}


def drop_cached(session_key):
    from django.conf import settings
    from django.core.cache import caches

    cache = caches[settings.SESSION_CACHE_ALIAS]
    dropped = []
    for engine in ("cache", "cached_db"):
        if cache.delete(import_module(engine_module(engine)).KEY_PREFIX + session_key):
            dropped.append(engine)
    return dropped


def delete_session(session_key):
    """Ends a session as a logout does: the row and the cache copies are deleted.
    Returns what was there, as expire_session does."""
    from django.contrib.sessions.models import Session

    rows, _ = Session.objects.filter(session_key=session_key).delete()
    return {"db_row": rows > 0, "cache": drop_cached(session_key)}


def session_row(session_key):
    from django.contrib.sessions.models import Session

    return (
        Session.objects.filter(session_key=session_key)
        .values_list("session_data", flat=True)
        .first()
    )


def session_cache_keys(session_key):
    """The cache's full keys (as in Redis) for `session_key`, per cache engine."""
    from django.conf import settings
    from django.core.cache import caches

    cache = caches[settings.SESSION_CACHE_ALIAS]
    return {
        engine: cache.make_key(import_module(engine_module(engine)).KEY_PREFIX + session_key)
        for engine in ("cache", "cached_db")
    }


def load_session(engine, session_key):
    """The session as Django loads it ({} when Django refuses it or has none)."""
    with engine_settings(engine) as store:
        return dict(read_only(store(session_key)).load())


def session_user(engine, session_key):
    """Django's own verdict: the user name auth.get_user finds for the session,
    or None. It checks the signature, the expiry, the user's existence and
    is_active, and _auth_user_hash against SECRET_KEY and its fallbacks."""
    from django.contrib import auth
    from django.http import HttpRequest

    with engine_settings(engine) as store:
        request = HttpRequest()
        request.session = read_only(store(session_key))
        found = auth.get_user(request)
        return found.get_username() if found.is_authenticated else None


COMMANDS = {
    f.__name__: f
    for f in (
        create_user,
        add_to_group,
        remove_from_group,
        set_password,
        set_active,
        login,
        stock_ws4redis_session,
        expire_session,
        delete_session,
        session_row,
        session_cache_keys,
        load_session,
        session_user,
    )
}


def answer(message):
    ANSWERS.write(json.dumps(message, default=str) + "\n")
    ANSWERS.flush()


def main():
    configure()
    import django
    from django.core.management import call_command
    from django.db import connection

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)
    answer(
        {
            "ready": {
                "django": django.get_version(),
                "python": sys.version.split()[0],
                "database": connection.vendor,
            }
        }
    )
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            command = COMMANDS[request.pop("cmd")]
            answer({"ok": command(**request)})
        except Exception as error:
            answer({"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()})
    connection.close()


if __name__ == "__main__":
    main()
