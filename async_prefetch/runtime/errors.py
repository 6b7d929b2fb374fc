"""The error a failed run raises, out of its task group's."""

from __future__ import annotations

from typing import Any

import anyio


def primary_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The error a failed run raises: the first real error of its task group (the
    siblings' cancellations are noise), or a cancellation if there is nothing else.

    The other real errors stay reachable, as trio keeps them: listed in a note, and as
    an exception group in the error's ``__context__`` when that is free.
    """
    errors: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        else:
            errors.append(exc)

    collect(group)
    cancelled = anyio.get_cancelled_exc_class()
    real = [error for error in errors if not isinstance(error, cancelled)]
    if not real:
        return errors[0] if errors else group
    primary, others = real[0], real[1:]
    if others:
        primary.add_note(
            f"async_prefetch: {len(others)} other quer{'y' if len(others) == 1 else 'ies'} "
            "of the same call failed too: "
            + "; ".join(f"{type(other).__name__}: {other}" for other in others)
        )
        if primary.__context__ is None:
            primary.__context__ = BaseExceptionGroup("other errors of the same call", others)
    return primary
