from django.apps import AppConfig


class TestAppConfig(AppConfig):
    """The schema the engine is tested against (tests/testapp/models.py)."""

    name = "tests.testapp"
    label = "testapp"
