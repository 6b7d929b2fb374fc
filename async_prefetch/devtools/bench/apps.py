"""The benchmark's Django app (label ``async_prefetch_bench``); the bench runner installs it."""

from __future__ import annotations

from django.apps import AppConfig


class BenchConfig(AppConfig):
    """Benchmark schema; its tables are created with ``migrate --run-syncdb`` (no migrations)."""

    name = "async_prefetch.devtools.bench"
    label = "async_prefetch_bench"
    default_auto_field = "django.db.models.BigAutoField"
