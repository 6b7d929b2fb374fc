from django.apps import AppConfig


class DemoAppConfig(AppConfig):
    """Demo bookstore app; its tables are created with ``migrate --run-syncdb`` (no migrations)."""

    name = "async_prefetch.devtools.demo"
    label = "async_prefetch_demo"
    default_auto_field = "django.db.models.BigAutoField"
