"""Settings of the sample project: the server is ``DATABASE_URL``'s, else an embedded one."""

from async_prefetch.devtools.embedded import get_server

SECRET_KEY = "sample-project-not-secret"
DEBUG = False
DATABASES = {"default": get_server().django_database(NAME="sample_project")}
INSTALLED_APPS = ["django.contrib.contenttypes", "async_prefetch", "shelf"]
ASYNC_PREFETCH = {"INSTALL": True}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
