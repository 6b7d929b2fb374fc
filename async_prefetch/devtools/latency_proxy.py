"""Userspace TCP proxy that adds a fixed round-trip latency in front of PostgreSQL.

Used by the benchmarks to emulate a remote database without ``tc netem``.

Contract:

* The proxy listens on ``127.0.0.1:<port>`` (``0`` = ephemeral) and forwards every accepted
  connection to one upstream: a unix-socket path (``str``, e.g.
  ``"/tmp/x/.s.PGSQL.5432"``) or a TCP ``(host, port)`` tuple.
* Each direction is delayed by ``rtt / 2``: every chunk read at time ``t`` is written to the
  other side at ``t + rtt / 2``. Chunks are queued, not serialized, so pipelined bytes keep
  their throughput and only pay the latency once. Ordering is preserved; EOF is forwarded
  (as a half-close) with the same delay. ``TCP_NODELAY`` is set on TCP sockets.
* The TCP handshake of the client->proxy connection is *not* delayed (the kernel completes
  it); everything after it (startup packet, auth, queries) is.
* Connections are independent: one slow connection never delays another.

Run it in its own process so the benchmark's event loop does not perturb the timing::

    python -m async_prefetch.devtools.latency_proxy --listen-port 0 \\
        --upstream-unix /tmp/x/.s.PGSQL.5432 --rtt-ms 5

prints ``LISTENING 127.0.0.1 <port>`` (flushed) once ready and serves until SIGTERM/SIGINT.
:class:`LatencyProxyProcess` wraps that as a context manager.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Self

__all__ = [
    "LatencyProxy",
    "LatencyProxyProcess",
    "Upstream",
    "main",
    "new_event_loop",
]

Upstream = str | tuple[str, int]
"""A unix-socket path, or a TCP ``(host, port)``."""

_CHUNK: Final = 256 * 1024
# Max queued chunks per direction before the reader stops reading (TCP back-pressure).
_MAX_QUEUED_CHUNKS: Final = 256
_READY_PREFIX: Final = "LISTENING"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """Return an event loop with sub-millisecond timer precision.

    The default epoll/poll selectors round timeouts *up* to whole milliseconds, which adds
    up to 1 ms of error per delayed chunk. ``select()`` takes a microsecond timeout; its
    fd < 1024 limit is irrelevant for a benchmark proxy.
    """
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock: socket.socket | None = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, delivering each chunk ``delay`` seconds after it was read.

    Returns after forwarding EOF. Raises ``OSError`` if either side fails.
    """
    loop = asyncio.get_running_loop()
    # (deliver_at, data); data == b"" marks EOF.
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_MAX_QUEUED_CHUNKS)

    async def produce() -> None:
        while True:
            data = await reader.read(_CHUNK)
            await queue.put((loop.time() + delay, data))
            if not data:
                return

    async def consume() -> None:
        pending: tuple[float, bytes] | None = None
        while True:
            deliver_at, data = pending if pending is not None else await queue.get()
            pending = None
            wait = deliver_at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            # Coalesce everything else that is already due into one write.
            chunks = [data]
            while data and not queue.empty():
                nxt = queue.get_nowait()
                if nxt[0] > loop.time():
                    pending = nxt
                    break
                data = nxt[1]
                chunks.append(data)
            payload = b"".join(chunks)
            if payload:
                writer.write(payload)
                await writer.drain()
            if not data:  # EOF reached
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return

    async with asyncio.TaskGroup() as tg:
        tg.create_task(produce())
        tg.create_task(consume())


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


class LatencyProxy:
    """In-process latency proxy (see module docstring for the contract).

    Use as ``async with LatencyProxy(upstream, rtt_ms=5) as proxy: ... proxy.port``.
    For accurate timings run it in a separate process (:class:`LatencyProxyProcess`) on the
    loop returned by :func:`new_event_loop`.
    """

    def __init__(
        self,
        upstream: Upstream,
        rtt_ms: float,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        if rtt_ms < 0:
            raise ValueError("rtt_ms must be >= 0")
        self.upstream: Final = upstream
        self.rtt_ms: Final = rtt_ms
        self.host: Final = listen_host
        self.port = listen_port
        self._delay = rtt_ms / 2000.0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind and start accepting; sets :attr:`port` to the bound port."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        """Stop accepting and abort all proxied connections."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if isinstance(self.upstream, str):
            return await asyncio.open_unix_connection(self.upstream, limit=_CHUNK)
        host, port = self.upstream
        return await asyncio.open_connection(host, port, limit=_CHUNK)

    async def _handle(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._proxy_connection(client_reader, client_writer)
        except asyncio.CancelledError:
            # Only aclose() cancels handlers. Finishing normally avoids Python 3.11's
            # streams callback logging a spurious "Unhandled exception" for cancelled tasks.
            pass
        finally:
            self._handlers.discard(task)

    async def _proxy_connection(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        _set_nodelay(client_writer)
        try:
            up_reader, up_writer = await self._open_upstream()
        except OSError as exc:
            print(f"latency_proxy: upstream connect failed: {exc}", file=sys.stderr)
            await _close(client_writer)
            return
        _set_nodelay(up_writer)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_pipe(client_reader, up_writer, self._delay))
                tg.create_task(_pipe(up_reader, client_writer, self._delay))
        except* OSError:
            pass  # a peer reset/closed: tear the whole connection down
        finally:
            client_writer.close()
            up_writer.close()


async def serve(upstream: Upstream, rtt_ms: float, *, listen_port: int = 0) -> None:
    """Run a proxy, print the ``LISTENING`` line, and serve until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with LatencyProxy(upstream, rtt_ms, listen_port=listen_port) as proxy:
        print(f"{_READY_PREFIX} {proxy.host} {proxy.port}", flush=True)
        await stop.wait()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m async_prefetch.devtools.latency_proxy",
        description="TCP proxy adding a fixed round-trip latency (rtt/2 each way).",
    )
    parser.add_argument("--listen-port", type=int, default=0, help="0 = ephemeral (default)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--upstream-unix", metavar="PATH", help="upstream unix socket file")
    group.add_argument("--upstream-host", metavar="HOST", help="upstream TCP host")
    parser.add_argument("--upstream-port", type=int, default=5432, help="default 5432")
    parser.add_argument("--rtt-ms", type=float, required=True, help="added round trip, ms")
    args = parser.parse_args(argv)
    if args.rtt_ms < 0:
        parser.error("--rtt-ms must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    args = _parse_args(argv)
    upstream: Upstream = (
        args.upstream_unix
        if args.upstream_unix is not None
        else (args.upstream_host, args.upstream_port)
    )
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve(upstream, args.rtt_ms, listen_port=args.listen_port))
    return 0


class LatencyProxyProcess:
    """Run the proxy in a subprocess; a context manager exposing :attr:`host` and :attr:`port`.

    ``__enter__`` starts ``python -m async_prefetch.devtools.latency_proxy`` and waits (up to
    ``startup_timeout`` seconds) for its ``LISTENING`` line, raising ``RuntimeError`` on
    failure. ``__exit__`` sends SIGTERM and waits for the process (SIGKILL after 5 s).
    """

    def __init__(
        self,
        upstream: Upstream,
        rtt_ms: float,
        *,
        listen_port: int = 0,
        startup_timeout: float = 10.0,
    ) -> None:
        self.upstream: Final = upstream
        self.rtt_ms: Final = rtt_ms
        self.listen_port: Final = listen_port
        self.startup_timeout: Final = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._host: str | None = None
        self._port: int | None = None

    @property
    def host(self) -> str:
        """Address the proxy listens on."""
        if self._host is None:
            raise RuntimeError("proxy not started")
        return self._host

    @property
    def port(self) -> int:
        """TCP port the proxy listens on."""
        if self._port is None:
            raise RuntimeError("proxy not started")
        return self._port

    def command(self) -> list[str]:
        """The argv used to launch the proxy."""
        cmd = [
            sys.executable,
            "-m",
            "async_prefetch.devtools.latency_proxy",
            "--listen-port",
            str(self.listen_port),
            "--rtt-ms",
            repr(float(self.rtt_ms)),
        ]
        if isinstance(self.upstream, str):
            cmd += ["--upstream-unix", self.upstream]
        else:
            cmd += ["--upstream-host", self.upstream[0], "--upstream-port", str(self.upstream[1])]
        return cmd

    def start(self) -> None:
        """Launch the subprocess and wait for its ``LISTENING`` line."""
        if self._proc is not None:
            raise RuntimeError("proxy already started")
        env = dict(os.environ)
        # Make the package importable in the child even when it is not installed.
        project_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (project_root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, env=env)
        try:
            line = self._read_ready_line()
            parts = line.split()
            if len(parts) != 3 or parts[0] != _READY_PREFIX:
                raise RuntimeError(f"latency proxy printed unexpected line: {line!r}")
            self._host, self._port = parts[1], int(parts[2])
        except BaseException:
            self.stop()
            raise

    def _read_ready_line(self) -> str:
        proc = self._proc
        assert proc is not None
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + self.startup_timeout
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(
                        f"latency proxy did not report readiness within {self.startup_timeout}s"
                    )
                if not sel.select(remaining):
                    continue
                chunk = os.read(fd, 4096)
                if not chunk:
                    rc = proc.wait()
                    raise RuntimeError(f"latency proxy exited with code {rc} before ready")
                buf += chunk
        return buf.split(b"\n", 1)[0].decode()

    def stop(self) -> None:
        """Terminate the subprocess (idempotent) and wait for it to exit."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
