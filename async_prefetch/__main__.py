"""``python -m async_prefetch COMMAND [ARGS...]``.

Each command is a module of :mod:`async_prefetch.devtools` with a ``main(argv) -> int``; it is
imported only when run, so a command's dependencies (Django settings, extras) never load for
another one, and the library itself never imports the developer tooling.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import import_module

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("async_prefetch.devtools.demo.cli", "one page by prefetch_related and by the engine"),
    "bench": (
        "async_prefetch.devtools.bench.runner",
        "benchmark prefetch_related against the engine",
    ),
    "bench-peers": (
        "async_prefetch.devtools.bench.peers",
        "the engine beside Tortoise ORM and SQLAlchemy (peers extra)",
    ),
    "bench-load": (
        "async_prefetch.devtools.bench.load",
        "calls/s and latency under concurrent callers",
    ),
    "bench-n-plus-one": (
        "async_prefetch.devtools.bench.n_plus_one",
        "a loop reading relations nobody prefetched: auto-prefetch, learned plans",
    ),
    "bench-gather": (
        "async_prefetch.devtools.bench.gather",
        "several querysets at once, and prefetch inside atomic",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to ``COMMANDS[command]``'s ``main`` with the remaining arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m async_prefetch",
        description="async_prefetch command line tools.",
        epilog="commands:\n" + "\n".join(f"  {n:<18}{h}" for n, (_, h) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the command")
    ns = parser.parse_args(argv)
    command_main = import_module(COMMANDS[ns.command][0]).main
    result: int = command_main(ns.args)
    return result


if __name__ == "__main__":
    sys.exit(main())
