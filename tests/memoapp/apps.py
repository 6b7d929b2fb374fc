from django.apps import AppConfig


class MemoAppConfig(AppConfig):
    """django-memoized-prefetch's README models, for the memo's differential tests."""

    name = "tests.memoapp"
    label = "memoapp"
