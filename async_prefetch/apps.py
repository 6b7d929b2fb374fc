"""Optional Django app: add ``"async_prefetch"`` to INSTALLED_APPS and set
``ASYNC_PREFETCH = {"INSTALL": True}`` to route all prefetching through the engine."""

from __future__ import annotations

from django.apps import AppConfig


class AsyncPrefetchConfig(AppConfig):
    name = "async_prefetch"
    verbose_name = "async_prefetch"

    def ready(self) -> None:
        from .config import load_config
        from .patching import install

        if load_config().install:
            install()
