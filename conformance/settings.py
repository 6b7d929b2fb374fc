"""Settings for Django's ``tests/runtests.py`` (``--settings=conformance.settings``).

Two aliases on one PostgreSQL server (``DATABASE_URL``, which ``conformance/run.py`` sets
for the embedded server it starts): ``default`` and ``other``, each with its own test
database. ``runtests.py`` fills in ``INSTALLED_APPS`` and the rest; the rest here mirrors
Django's own ``tests/test_sqlite.py``.
"""

from async_prefetch.devtools.embedded import get_server

_server = get_server()

DATABASES = {
    "default": _server.django_database(TEST={"NAME": "test_conformance_default"}),
    "other": _server.django_database(
        NAME=f"{_server.dbname}_other", TEST={"NAME": "test_conformance_other"}
    ),
}

SECRET_KEY = "django_tests_secret_key"

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

USE_TZ = False

TEST_RUNNER = "conformance.harness.ConformanceRunner"
