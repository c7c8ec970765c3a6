#!/usr/bin/env python3
"""Write Django sessions into a real Redis and save the raw bytes as fixtures.

The gateway must read the sessions that a Django site leaves in Redis. To test
that against the real thing, this script lets Django itself (and the session
and cache packages a Django site would use) write sessions into a Redis server,
reads back the exact bytes Redis holds for each one, checks with Django that
those bytes load back into the same session, and writes everything to one JSON
file (tests/fixtures/django_sessions.json by default).

It runs in two roles:

* The driver (the default) needs only the standard library. For every Python
  interpreter given with --python (each one a virtualenv that has Django
  installed) and for every engine configuration, it starts this same file
  again as a worker in a subprocess, collects the cases the workers print, and
  writes the fixture file.
* A worker (--worker CONFIG_JSON) configures Django once with
  settings.configure() for one engine configuration, writes the sessions,
  reads the raw values, verifies them with Django and prints its cases as JSON.
  One process per configuration is needed because Django can be configured
  only once per process, and django-redis-sessions reads its settings when it
  is imported.

See tests/django/README.md for the commands.
"""

import argparse
import base64
import json
import os
import subprocess
import sys
from urllib.parse import unquote, urlparse

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "django_sessions.json")

# Test-only secrets. Never use them anywhere else.
SECRET_KEY = "wsrelay-test-secret-do-not-use"
OTHER_SECRET_KEY = "wsrelay-some-other-secret-do-not-use"

GROUPS_KEY = "ws4redis:memberof"
USER_KEY = "wsrelay:username"

# What django.contrib.auth.login() would have put in the session. Set by hand.
AUTH_FIELDS = {
    "_auth_user_id": "42",
    "_auth_user_backend": "django.contrib.auth.backends.ModelBackend",
    "_auth_user_hash": "5f1c0d0e9b7a4e2f8c3d6a1b0e9f8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f10",
}

BUILTIN_REDIS_CACHE = "django.core.cache.backends.redis.RedisCache"
DJANGO_REDIS_CACHE = "django_redis.cache.RedisCache"

# Every engine configuration the driver asks each interpreter for. "cases" names
# the session contents written under that configuration (see session_contents()).
FULL_SIGNED = ["small", "login", "large", "many_groups", "groups_only", "anonymous", "unicode"]
FULL_PICKLED = ["small", "login", "large", "many_groups", "groups_only", "memo_refs", "datetime",
                "anonymous", "unicode"]
CONFIGS = [
    {"engine": "redis_sessions", "tag": "prefix-session", "prefix": "session",
     "cases": FULL_SIGNED + ["tampered", "wrong_secret"]},
    {"engine": "redis_sessions", "tag": "no-prefix", "prefix": "",
     "cases": ["small", "login", "large", "groups_only", "anonymous"]},
    {"engine": "cache", "tag": "redis-cache-v1", "backend": BUILTIN_REDIS_CACHE,
     "prefix": "", "version": 1, "cases": FULL_PICKLED},
    {"engine": "cache", "tag": "redis-cache-myapp-v1", "backend": BUILTIN_REDIS_CACHE,
     "prefix": "myapp", "version": 1, "cases": ["login", "datetime"]},
    {"engine": "cache", "tag": "redis-cache-v2", "backend": BUILTIN_REDIS_CACHE,
     "prefix": "", "version": 2, "cases": ["small"]},
    {"engine": "cache", "tag": "redis-cache-myapp-v2", "backend": BUILTIN_REDIS_CACHE,
     "prefix": "myapp", "version": 2, "cases": ["small", "groups_only"]},
    {"engine": "cache", "tag": "django-redis-v1", "backend": DJANGO_REDIS_CACHE,
     "prefix": "", "version": 1, "cases": FULL_PICKLED},
    {"engine": "cache", "tag": "django-redis-myapp-v2", "backend": DJANGO_REDIS_CACHE,
     "prefix": "myapp", "version": 2, "cases": ["small"]},
    # cached_db also writes every session to the database with the JSON
    # serializer, so a datetime value cannot be stored there at all.
    {"engine": "cached_db", "tag": "redis-cache-v1", "backend": BUILTIN_REDIS_CACHE,
     "prefix": "", "version": 1, "cases": ["small", "login", "groups_only", "anonymous"]},
    {"engine": "cached_db", "tag": "redis-cache-myapp-v2", "backend": BUILTIN_REDIS_CACHE,
     "prefix": "myapp", "version": 2, "cases": ["small"]},
    {"engine": "cached_db", "tag": "django-redis-v1", "backend": DJANGO_REDIS_CACHE,
     "prefix": "", "version": 1, "cases": ["login", "anonymous"]},
]

SESSION_ENGINES = {
    "redis_sessions": "redis_sessions.session",
    "cache": "django.contrib.sessions.backends.cache",
    "cached_db": "django.contrib.sessions.backends.cached_db",
}
CACHE_KEY_PREFIXES = {
    "cache": "django.contrib.sessions.cache",
    "cached_db": "django.contrib.sessions.cached_db",
}


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def parse_redis_url(url):
    u = urlparse(url)
    if u.scheme != "redis":
        raise SystemExit("only redis:// URLs are supported, got %r" % url)
    db = (u.path or "/0").lstrip("/") or "0"
    return {
        "host": u.hostname or "127.0.0.1",
        "port": u.port or 6379,
        "db": int(db),
        "password": unquote(u.password) if u.password else None,
    }


# --------------------------------------------------------------------------
# Session contents. Each returns (session dict, expected, note).
# --------------------------------------------------------------------------

def session_contents(case):
    import datetime

    staff = ["staff", "editors"]
    if case in ("small", "tampered"):
        data = {GROUPS_KEY: staff, USER_KEY: "jane"}
        return (data, {"user": "jane", "groups": staff},
                "only the two wsrelay fields (no Django auth fields); too short for zlib to pay off")
    if case in ("login", "wrong_secret"):
        data = dict(AUTH_FIELDS)
        data[GROUPS_KEY] = staff
        data[USER_KEY] = "jane"
        return (data, {"user": "jane", "groups": staff},
                "what a real login leaves: Django's three auth fields plus the two wsrelay fields")
    if case == "large":
        groups = ["group%03d" % i for i in range(200)]
        data = dict(AUTH_FIELDS)
        data[GROUPS_KEY] = groups
        data[USER_KEY] = "jane"
        data["padding"] = "x" * 2000
        return (data, {"user": "jane", "groups": groups},
                "200 groups and a 2000-byte padding field; big enough that signing compresses it")
    if case == "many_groups":
        groups = ["group%04d" % i for i in range(1500)]
        data = dict(AUTH_FIELDS)
        data[GROUPS_KEY] = groups
        data[USER_KEY] = "jane"
        return (data, {"user": "jane", "groups": groups},
                "1500 groups: a pickle writes list items in batches of 1000 (two APPENDS)")
    if case == "groups_only":
        data = dict(AUTH_FIELDS)
        data[GROUPS_KEY] = staff
        return data, {"user": None, "groups": staff}, "groups stored but no wsrelay:username field"
    if case == "anonymous":
        data = {"cart": [1, 2, 3], "theme": "dark"}
        return data, {"user": None, "groups": []}, "anonymous visitor: no auth fields, no user, no groups"
    if case == "unicode":
        groups = ["rédaction", "スタッフ", "staff"]
        data = dict(AUTH_FIELDS)
        data[GROUPS_KEY] = groups
        data[USER_KEY] = "jörg✓"
        return (data, {"user": "jörg✓", "groups": groups},
                "non-ASCII user and group names (JSON writes them as \\u escapes, pickle as UTF-8)")
    if case == "memo_refs":
        name = "".join(["jane", "-", "lead"])  # one string object, used twice
        groups = [name, "editors"]
        data = dict(AUTH_FIELDS)
        data[GROUPS_KEY] = groups
        data[USER_KEY] = name
        return (data, {"user": name, "groups": groups},
                "the user name string object is also the first group, so the pickle refers "
                "back to it with a memo get (BINGET) instead of writing it twice")
    if case == "datetime":
        data = dict(AUTH_FIELDS)
        data[GROUPS_KEY] = staff
        data[USER_KEY] = "jane"
        data["last_seen"] = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
        return (data, {"user": "jane", "groups": staff},
                "also holds an aware datetime: the pickle imports datetime classes "
                "(STACK_GLOBAL/REDUCE), which the gateway must refuse")
    raise ValueError(case)


# --------------------------------------------------------------------------
# Worker: one engine configuration in one process.
# --------------------------------------------------------------------------

def configure_django(cfg, redis):
    from django.conf import settings

    options = {
        "SECRET_KEY": SECRET_KEY,
        "USE_TZ": True,
        "INSTALLED_APPS": [
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "django.contrib.sessions",
        ],
        "DATABASES": {},
        "SESSION_ENGINE": SESSION_ENGINES[cfg["engine"]],
        "LOGGING_CONFIG": None,
    }
    if cfg["engine"] == "redis_sessions":
        options["SESSION_REDIS"] = {
            "host": redis["host"],
            "port": redis["port"],
            "db": redis["db"],
            "password": redis["password"],
            "prefix": cfg["prefix"],
            "socket_timeout": 5,
        }
    else:
        options["CACHES"] = {
            "default": {
                "BACKEND": cfg["backend"],
                "LOCATION": cfg["redis_url"],
                "KEY_PREFIX": cfg["prefix"],
                "VERSION": cfg["version"],
            }
        }
    if cfg["engine"] == "cached_db":
        options["DATABASES"] = {
            "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}
        }
    settings.configure(**options)
    import django

    django.setup()
    if cfg["engine"] == "cached_db":
        from django.core.management import call_command

        call_command("migrate", "sessions", verbosity=0, interactive=False)


def tamper(value):
    """Change one character of the base64 payload of a signed, uncompressed value.

    The position is chosen so that the payload still decodes to a JSON object
    that differs from the original: only the signature check can catch it.
    """
    payload, rest = value.split(":", 1)
    assert not payload.startswith("."), "tamper() wants an uncompressed value"
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

    def decode(p):
        return json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)).decode("utf-8"))

    original = decode(payload)
    middle = len(payload) // 2
    for offset in range(len(payload)):
        for i in (middle + offset, middle - offset):
            if not 0 <= i < len(payload) - 1:
                continue
            for step in range(1, len(alphabet)):
                c = alphabet[(alphabet.index(payload[i]) + step) % len(alphabet)]
                candidate = payload[:i] + c + payload[i + 1:]
                try:
                    changed = decode(candidate)
                except ValueError:
                    continue
                if isinstance(changed, dict) and changed != original:
                    return candidate + ":" + rest, changed
    raise AssertionError("found no character to flip")


# Pickle opcodes that import a class or call something: never in a plain session.
IMPORTING_OPCODES = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "INST", "OBJ",
                     "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"}


def pickle_opcodes(value):
    import pickletools

    return {op.name for op, _arg, _pos in pickletools.genops(value)}


def decode_signed_by_hand(text, secret):
    """Check a signed session value with the standard library only.

    This is the recipe tests/django/README.md describes for the gateway; doing
    it here too proves the description against what Django really wrote.
    Returns the session dict, or None when the signature does not match.
    """
    import hashlib
    import hmac
    import zlib

    salt = "django.contrib.sessions.SessionStore"
    signed, signature = text.rsplit(":", 1)
    payload, _timestamp = signed.split(":", 1)
    key = hashlib.sha256((salt + "signer" + secret).encode()).digest()
    mac = hmac.new(key, signed.encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(base64.urlsafe_b64encode(mac).rstrip(b"=").decode(), signature):
        return None
    compressed = payload.startswith(".")
    raw = base64.urlsafe_b64decode(payload.lstrip(".") + "=" * (-len(payload.lstrip(".")) % 4))
    if compressed:
        raw = zlib.decompress(raw)
    return json.loads(raw.decode("utf-8"))


def run_worker(cfg):
    import importlib

    import redis as redis_py

    redis = parse_redis_url(cfg["redis_url"])
    configure_django(cfg, redis)

    import django
    from django.core import signing
    from django.test.utils import override_settings

    raw = redis_py.Redis.from_url(cfg["redis_url"])
    engine_mod = importlib.import_module(SESSION_ENGINES[cfg["engine"]])
    SessionStore = engine_mod.SessionStore
    version = django.get_version()
    pyver = "%d.%d.%d" % sys.version_info[:3]

    def stored_key(session_key):
        if cfg["engine"] == "redis_sessions":
            return "%s:%s" % (cfg["prefix"], session_key) if cfg["prefix"] else session_key
        return "%s:%s:%s%s" % (cfg["prefix"], cfg["version"],
                               CACHE_KEY_PREFIXES[cfg["engine"]], session_key)

    def check_key_matches_django(store, key):
        # Cross-check our idea of the key layout against the library's own.
        if cfg["engine"] == "redis_sessions":
            assert store.get_real_stored_key(store.session_key) == key, key
        else:
            from django.core.cache import caches

            assert str(caches["default"].make_key(store.cache_key)) == key, key

    def write_session(data, secret=None):
        if secret is None:
            store = SessionStore()
            store.update(data)
            store.save()
        else:
            with override_settings(SECRET_KEY=secret):
                store = SessionStore()
                store.update(data)
                store.save()
        key = stored_key(store.session_key)
        check_key_matches_django(store, key)
        value = raw.get(key)
        assert value is not None, "nothing stored under %r" % key
        return store.session_key, key, value

    def load_from_redis_only(session_key, key, value):
        """Put the raw bytes back and load them with a fresh SessionStore."""
        raw.delete(key)
        raw.set(key, value, ex=3600 * 24 * 14)
        if cfg["engine"] == "cached_db":
            # Make sure the session can only come from Redis, not from the DB.
            from django.contrib.sessions.models import Session

            Session.objects.filter(session_key=session_key).delete()
        store = SessionStore(session_key)
        return store.load()

    out = []
    for case in cfg["cases"]:
        data, expected, note = session_contents(case)
        valid = True
        if case == "tampered":
            session_key, key, good = write_session(data)
            text, changed = tamper(good.decode("ascii"))
            value = text.encode("ascii")
            assert value != good
            try:
                signing.loads(value.decode(), salt=SessionStore().key_salt,
                              serializer=SessionStore().serializer)
            except signing.BadSignature:
                pass
            else:
                raise AssertionError("tampered value still verifies")
            loaded = load_from_redis_only(session_key, key, value)
            assert loaded == {}, loaded
            valid = False
            expected = {"user": None, "groups": []}
            note = ("the small session with one character of the base64 payload changed, "
                    "so the payload still decodes to valid JSON (%s) but the signature no "
                    "longer matches; Django loads an empty session"
                    % json.dumps(changed, ensure_ascii=False, separators=(",", ":")))
        elif case == "wrong_secret":
            session_key, key, value = write_session(data, secret=OTHER_SECRET_KEY)
            loaded = load_from_redis_only(session_key, key, value)
            assert loaded == {}, loaded
            with override_settings(SECRET_KEY=OTHER_SECRET_KEY):
                assert SessionStore(session_key).load() == data
            valid = False
            expected = {"user": None, "groups": []}
            note = ("the login session signed with SECRET_KEY=%r (other_secret_key) instead of secret_key; "
                    "Django with the right secret loads an empty session" % OTHER_SECRET_KEY)
        else:
            session_key, key, value = write_session(data)
            loaded = load_from_redis_only(session_key, key, value)
            assert loaded == data, (case, loaded)
            if case == "datetime":
                valid = False
        if cfg["engine"] == "redis_sessions":
            by_hand = decode_signed_by_hand(value.decode("ascii"), SECRET_KEY)
            assert by_hand == (data if valid else None), (case, by_hand)
        if case == "wrong_secret":
            assert decode_signed_by_hand(value.decode("ascii"), OTHER_SECRET_KEY) == data
        if cfg["engine"] == "redis_sessions" and valid:
            text = value.decode("ascii")
            compressed = text.startswith(".")
            if case in ("login", "large", "many_groups"):
                assert compressed, "expected a compressed value for %s" % case
            if case in ("small", "anonymous"):
                assert not compressed, "expected an uncompressed value for %s" % case
            note += "; compressed" if compressed else "; not compressed"
        if cfg["engine"] != "redis_sessions":
            note += "; pickle protocol %d" % value[1]
            ops = pickle_opcodes(value)
            assert bool(ops & IMPORTING_OPCODES) == (not valid), (case, sorted(ops))
            if case == "memo_refs":
                assert ops & {"BINGET", "LONG_BINGET"}, sorted(ops)
        expected = {"user": expected["user"], "groups": expected["groups"], "valid": valid}
        out.append({
            "name": "%s/%s/%s/django-%s" % (cfg["engine"], cfg["tag"], case, version),
            "django": version,
            "python": pyver,
            "engine": cfg["engine"],
            "cache_backend": cfg.get("backend"),
            "key_prefix": cfg["prefix"],
            "version": cfg.get("version"),
            "session_key": session_key,
            "redis_key": key,
            "value_b64": base64.b64encode(value).decode("ascii"),
            "expected": expected,
            "note": note,
        })
        if cfg.get("cleanup"):
            raw.delete(key)
    json.dump(out, sys.stdout)


# --------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------

def interpreter_info(python):
    code = ("import json, importlib.util as u, django;"
            "print(json.dumps({'django': django.get_version(),"
            " 'redis_sessions': u.find_spec('redis_sessions') is not None,"
            " 'django_redis': u.find_spec('django_redis') is not None,"
            " 'builtin_redis_cache': u.find_spec('django.core.cache.backends.redis') is not None}))")
    res = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit("%s cannot import django:\n%s" % (python, res.stderr))
    return json.loads(res.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                    help="Redis to write the sessions into (redis://host:port/db)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="fixture file to write")
    ap.add_argument("--python", action="append", default=[],
                    help="interpreter with Django installed; repeat for several "
                         "Django versions (default: this interpreter)")
    ap.add_argument("--cleanup", action="store_true",
                    help="delete the session keys from Redis once read")
    ap.add_argument("--worker", metavar="CONFIG_JSON", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        run_worker(json.loads(args.worker))
        return

    pythons = args.python or [sys.executable]
    cases, skipped = [], []
    for python in pythons:
        info = interpreter_info(python)
        log("== %s: Django %s" % (python, info["django"]))
        for cfg in CONFIGS:
            what = "%s/%s on Django %s" % (cfg["engine"], cfg["tag"], info["django"])
            if cfg["engine"] == "redis_sessions" and not info["redis_sessions"]:
                skipped.append(what + ": django-redis-sessions not installed")
                continue
            if cfg.get("backend") == BUILTIN_REDIS_CACHE and not info["builtin_redis_cache"]:
                skipped.append(what + ": Django has no built-in RedisCache before 4.0")
                continue
            if cfg.get("backend") == DJANGO_REDIS_CACHE and not info["django_redis"]:
                skipped.append(what + ": django-redis not installed")
                continue
            wcfg = dict(cfg, redis_url=args.redis_url, cleanup=args.cleanup)
            res = subprocess.run(
                [python, os.path.abspath(__file__), "--worker", json.dumps(wcfg)],
                capture_output=True, text=True)
            if res.returncode != 0:
                sys.stderr.write(res.stderr)
                raise SystemExit("worker failed: " + what)
            got = json.loads(res.stdout)
            log("   %-45s %d cases" % (cfg["engine"] + "/" + cfg["tag"], len(got)))
            cases.extend(got)
    for s in skipped:
        log("   skipped " + s)

    names = [c["name"] for c in cases]
    assert len(names) == len(set(names)), "duplicate case names"
    doc = {
        "secret_key": SECRET_KEY,
        "other_secret_key": OTHER_SECRET_KEY,
        "generated_by": "tests/django/make_sessions.py",
        "django_versions": sorted({c["django"] for c in cases}),
        "skipped": skipped,
        "cases": cases,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    log("wrote %d cases to %s" % (len(cases), args.out))


if __name__ == "__main__":
    main()
