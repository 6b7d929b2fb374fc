"""``PrefetchReportMiddleware``: a :func:`~.report.prefetch_report` per request.

Add ``"async_prefetch.access.middleware.PrefetchReportMiddleware"`` to ``MIDDLEWARE``
(first, so that the other middleware's lazy loads count too). Sync and async: under
ASGI the report follows the request into the views Django runs in a thread and into
``sync_to_async`` calls, which inherit the request's context. The report is logged on
``async_prefetch.report`` at the end of each request and left on
``request.prefetch_report``.

Settings, read on each request::

    ASYNC_PREFETCH_REPORT = {
        "RAISE": False,    # raise NPlusOneError at the end of a request with an N+1
        "THRESHOLD": 2,    # instances loaded one at a time that make an N+1
    }

``RAISE`` is for tests and development: the error turns the response into a server
error (the test client raises it in the test).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponseBase
from django.utils.decorators import sync_and_async_middleware

from .report import PrefetchReport, prefetch_report

__all__ = ["PrefetchReportMiddleware"]

_KEYS = frozenset({"RAISE", "THRESHOLD"})


def _options() -> tuple[bool, int]:
    raw = getattr(settings, "ASYNC_PREFETCH_REPORT", None) or {}
    if not isinstance(raw, dict) or not set(raw) <= _KEYS:
        raise ImproperlyConfigured(
            f"ASYNC_PREFETCH_REPORT must be a dict with the keys {sorted(_KEYS)}; got {raw!r}."
        )
    raise_ = raw.get("RAISE", False)
    threshold = raw.get("THRESHOLD", 2)
    if not isinstance(raise_, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ImproperlyConfigured(
            'ASYNC_PREFETCH_REPORT["RAISE"] must be a bool and ["THRESHOLD"] an int >= 1.'
        )
    return raise_, threshold


def _report(request: HttpRequest) -> Any:
    raise_, threshold = _options()
    return prefetch_report(
        raise_on_n_plus_one=raise_,
        threshold=threshold,
        name=f"{request.method} {request.get_full_path()}",
    )


@sync_and_async_middleware
def PrefetchReportMiddleware(
    get_response: Callable[[HttpRequest], Any],
) -> Callable[[HttpRequest], Any]:
    """Record and log a :class:`~.report.PrefetchReport` for each request."""
    if iscoroutinefunction(get_response):
        async_get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]] = get_response

        async def async_middleware(request: HttpRequest) -> HttpResponseBase:
            with _report(request) as report:
                _attach(request, report)
                response = await async_get_response(request)
            return response

        return async_middleware

    def middleware(request: HttpRequest) -> HttpResponseBase:
        with _report(request) as report:
            _attach(request, report)
            response: HttpResponseBase = get_response(request)
        return response

    return middleware


def _attach(request: HttpRequest, report: PrefetchReport) -> None:
    request.prefetch_report = report  # type: ignore[attr-defined]
