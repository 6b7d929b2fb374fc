"""Django settings for the test suite: one database, on the embedded server
(:func:`async_prefetch.devtools.embedded.get_server`).

Importing this module starts the embedded server (or uses ``DATABASE_URL``); pytest-django then
creates the test database ``test_<name>`` on it, migrates ``testapp`` and syncs ``demo_app``.
"""

from async_prefetch.devtools.embedded import get_server
from tests.settings_static import *  # noqa: F403

DATABASES = {"default": get_server().django_database()}
