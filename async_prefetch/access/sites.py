"""Where in the application code something happened: the first frame outside this
library, Django, asgiref and the event loop machinery, as ``"path/to/file.py:LINE"``
(relative to the working directory when under it)."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

__all__ = ["call_site", "location"]

_SKIPPED = (
    "async_prefetch.",
    "django.",
    "asgiref.",
    "asyncio.",
    "anyio.",
    "contextlib",
    "concurrent.",
    "threading",
)


def _skipped(module: str) -> bool:
    return module == "async_prefetch" or module.startswith(_SKIPPED)


def call_site(depth: int = 1) -> str | None:
    """The application's frame above the caller's ``depth``-th caller (1: the function
    that calls this one was called from there), or ``None`` when there is none."""
    frame = sys._getframe(depth + 1)
    while frame is not None:
        if not _skipped(frame.f_globals.get("__name__", "")):
            return f"{_shown_path(frame.f_code.co_filename)}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return None


def location() -> str | None:
    """Where the caller's caller was reached from, as :func:`call_site`, followed by the
    template line when a template was being rendered in between (``"views.py:12
    (template shop/book.html:7)"``), or the template line alone."""
    frame: Any = sys._getframe(2)
    template = None
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("django.template."):
            if template is None:
                node = frame.f_locals.get("self")
                origin, token = getattr(node, "origin", None), getattr(node, "token", None)
                if origin is not None and token is not None:
                    template = (
                        f"{getattr(origin, 'template_name', None) or origin.name}:{token.lineno}"
                    )
        elif not _skipped(module):
            site = f"{_shown_path(frame.f_code.co_filename)}:{frame.f_lineno}"
            return f"{site} (template {template})" if template else site
        frame = frame.f_back
    return f"template {template}" if template else None


@functools.lru_cache(maxsize=1024)
def _shown_path(filename: str) -> str:
    """``filename`` relative to the working directory when under it (computing that is
    most of a site's cost, and a site's file comes back on every call)."""
    try:
        relative = os.path.relpath(filename)
    except (ValueError, OSError):  # another drive (Windows); no working directory any more
        return filename
    return relative if not relative.startswith("..") else filename
