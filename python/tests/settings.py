"""Django settings of the package's tests. The Rust test (tests/gateway/python.rs)
starts Redis and a gateway and passes them in the environment."""

import os

SECRET_KEY = "wsrelay-python-tests"
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "wsrelay.contrib.django",
]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
ROOT_URLCONF = "tests.urls"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

WSRELAY_REDIS_URL = os.environ.get("WSRELAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
WSRELAY_PREFIX = os.environ.get("WSRELAY_TEST_PREFIX") or None
# The gateway under test has the same rule (tests/gateway/python.rs).
WSRELAY_FACILITIES = [{"pattern": "pyfeed/*", "history": 10, "history_ttl": 600}]
GATEWAY = os.environ.get("WSRELAY_TEST_GATEWAY", "")
WSRELAY_GATEWAY_URL = f"http://{GATEWAY}" if GATEWAY else None
ALLOWED_HOSTS = ["www.example.com", "testserver"]
