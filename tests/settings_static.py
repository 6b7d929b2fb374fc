"""Test settings that need no running server (mypy's Django plugin reads these).

``tests.settings`` adds the database of the embedded server.
"""

from typing import Any

SECRET_KEY = "async-prefetch-tests-not-secret"
DEBUG = False
DATABASES: dict[str, dict[str, Any]] = {
    "default": {"ENGINE": "django.db.backends.postgresql", "NAME": "typecheck-only"}
}
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "tests.testapp",
    "tests.memoapp",
    "taggit",
    "modelcluster",
    "tests.thirdparty",
    # Installed so that mypy's Django plugin (which reads these settings) can type the demo.
    "async_prefetch.devtools.demo",
]
USE_TZ = True
TIME_ZONE = "America/Chicago"  # not UTC on purpose: catches naive/aware datetime bugs
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ASYNC_PREFETCH: dict[str, Any] = {}
