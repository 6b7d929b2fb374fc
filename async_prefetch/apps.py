"""Optional Django app: add ``"async_prefetch"`` to INSTALLED_APPS and set
``ASYNC_PREFETCH = {"INSTALL": True}`` to route all prefetching through the engine, and
``{"AUTO": True}`` to make every queryset's instances auto-prefetch."""

from __future__ import annotations

from django.apps import AppConfig


class AsyncPrefetchConfig(AppConfig):
    name = "async_prefetch"
    verbose_name = "async_prefetch"

    def ready(self) -> None:
        """Register the system checks; ``install()`` and auto-prefetch when the setting
        asks for them.

        A bad ``ASYNC_PREFETCH`` raises nothing here: the checks report it (``manage.py
        check``, ``runserver``, ``migrate``) and the engine is not installed.
        """
        from . import checks
        from .config import read_config

        checks.register()
        config, _ = read_config()
        if config is not None and config.install:
            from .patching import install

            install()
        if config is not None and config.auto:
            from .access.hooks import ensure_installed

            ensure_installed()  # reads AUTO, and follows the setting from then on
