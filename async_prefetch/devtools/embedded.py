"""A running PostgreSQL for the tests, the demo and the benchmarks.

:func:`get_server` picks the first source that works, in this order:

1. ``DATABASE_URL`` (``postgres://`` or ``postgresql://``; a unix-socket directory goes in
   ``?host=/path``). Nothing is started or stopped.
2. pgserver (``pip install -e ".[embedded]"``): a throw-away cluster in a fresh temporary directory.
3. PostgreSQL binaries (``initdb`` and ``postgres`` on ``PATH``, else the highest version under
   ``/usr/lib/postgresql/*/bin``): ``initdb`` into a temporary directory and ``postgres`` listening
   only on a unix socket in that directory. As root, both run as the ``postgres`` user (else
   ``nobody``), because PostgreSQL refuses to run as root.

``ASYNC_PREFETCH_EMBEDDED=pgserver`` or ``=binaries`` forces that source (``DATABASE_URL`` is then
ignored); ``auto`` or unset means the order above. Embedded servers are stopped and their
directories removed when the interpreter exits: by ``atexit``, or, when the process ends without
running it (``os._exit``, a signal), by a small watchdog process.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import psycopg

__all__ = [
    "ENV_SOURCE",
    "RunningServer",
    "ServerInfo",
    "find_postgres_bindir",
    "get_server",
    "parse_database_url",
    "start_server",
]

logger = logging.getLogger(__name__)

ENV_SOURCE: Final = "ASYNC_PREFETCH_EMBEDDED"
"""Environment variable that forces a source: ``pgserver``, ``binaries`` or ``auto``."""

DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"
"""Glob searched for PostgreSQL binaries when ``initdb`` is not on ``PATH``."""

_STARTUP_TIMEOUT: Final = 60.0
_HELP: Final = (
    "Start one with `docker compose up -d` (docker-compose.yml in the repository root) and set "
    "DATABASE_URL=postgresql://postgres:postgres@localhost:5432/postgres, "
    'or install pgserver with `pip install -e ".[embedded]"`.'
)


@dataclass(frozen=True)
class ServerInfo:
    """How to reach a running PostgreSQL.

    ``host`` is a host name, an IP address, a unix-socket directory (an absolute path) or ``""``
    for libpq's default socket; ``port`` ``None`` means libpq's default. ``options`` holds extra
    libpq parameters from the URL's query string (e.g. ``sslmode``).
    """

    source: str
    dbname: str
    user: str
    password: str = field(repr=False)
    host: str
    port: int | None
    options: tuple[tuple[str, str], ...] = ()

    def url(self) -> str:
        """A libpq connection URI; ``parse_database_url(info.url())`` gives ``info`` back."""
        auth = quote(self.user, safe="")
        if self.password:
            auth += ":" + quote(self.password, safe="")
        params: dict[str, str] = {}
        port = "" if self.port is None else f":{self.port}"
        if self.host.startswith("/"):
            netloc_host = ""
            params["host"] = self.host
            if self.port is not None:
                params["port"] = str(self.port)
                port = ""
        elif ":" in self.host:
            netloc_host = f"[{self.host}]"
        else:
            netloc_host = self.host
        params.update(self.options)
        query = "?" + urlencode(params, quote_via=quote, safe="/") if params else ""
        return f"postgresql://{auth}@{netloc_host}{port}/{quote(self.dbname, safe='')}{query}"

    def address(self) -> str | tuple[str, int]:
        """Where a raw client connects: the unix socket file, or ``(host, port)``.

        Raises ``ValueError`` for libpq's default socket directory (``host`` ``""``), which
        only libpq knows.
        """
        port = self.port or 5432
        if self.host.startswith("/"):
            return f"{self.host}/.s.PGSQL.{port}"
        if not self.host:
            raise ValueError("the server is on libpq's default socket directory; set a host")
        return (self.host, port)

    def django_database(self, **overrides: Any) -> dict[str, Any]:
        """A ``DATABASES`` entry for ``django.db.backends.postgresql``; ``overrides`` win."""
        entry: dict[str, Any] = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": self.dbname,
            "USER": self.user,
            "PASSWORD": self.password,
            "HOST": self.host,
            "PORT": "" if self.port is None else str(self.port),
            "OPTIONS": dict(self.options),
        }
        entry.update(overrides)
        return entry


def parse_database_url(url: str, *, source: str = "DATABASE_URL") -> ServerInfo:
    """Parse a ``postgres://`` / ``postgresql://`` URL (libpq URI syntax).

    Query parameters ``host``, ``port``, ``user``, ``password`` and ``dbname`` override the URL's
    parts; other parameters end up in ``options``. ``user`` defaults to ``postgres`` and ``dbname``
    to the user. Raises ``ValueError`` (without echoing the URL, which may hold a password) for
    another scheme or a malformed port.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"URL scheme {parts.scheme!r} is not postgres or postgresql")
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = hostport.partition(":")
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    user = params.pop("user", unquote(user)) or "postgres"
    port = params.pop("port", port)
    if port and not (port.isascii() and port.isdigit()):
        raise ValueError(f"invalid port {port!r} in the URL")
    return ServerInfo(
        source=source,
        dbname=params.pop("dbname", unquote(parts.path.removeprefix("/"))) or user,
        user=user,
        password=params.pop("password", unquote(password)),
        host=params.pop("host", unquote(host)),
        port=int(port) if port else None,
        options=tuple(params.items()),
    )


@dataclass
class RunningServer:
    """A server :func:`start_server` started (or found through ``DATABASE_URL``).

    ``stop()`` stops an embedded server and removes ``data_dir``; it is idempotent and does
    nothing in a forked child or for ``DATABASE_URL`` (``data_dir`` ``None``).
    """

    info: ServerInfo
    data_dir: Path | None = None
    _stop: Callable[[], None] | None = field(default=None, repr=False)
    _owner_pid: int = field(default_factory=os.getpid, repr=False)

    def stop(self) -> None:
        """Stop the server and remove its directory (once, in the process that started it)."""
        stop, self._stop = self._stop, None
        if stop is not None and os.getpid() == self._owner_pid:
            logger.info("stopping PostgreSQL (%s) in %s", self.info.source, self.data_dir)
            stop()


def start_server(source: str | None = None) -> RunningServer:
    """Start a new server (no singleton): ``source`` is ``"DATABASE_URL"``, ``"pgserver"``,
    ``"binaries"`` or ``"auto"``; ``None`` reads ``ASYNC_PREFETCH_EMBEDDED`` (default ``auto``).

    Raises ``RuntimeError`` (saying how to start one) when no source is available.
    """
    if source is None:
        source = os.environ.get(ENV_SOURCE, "").strip() or "auto"
    if source == "DATABASE_URL":
        url = os.environ.get("DATABASE_URL")
        if not url:
            raise RuntimeError("DATABASE_URL is not set. " + _HELP)
        return RunningServer(parse_database_url(url))
    if source == "pgserver":
        return _start_pgserver()
    if source == "binaries":
        return _start_binaries(_require_bindir(""))
    if source != "auto":
        raise ValueError(f"{ENV_SOURCE}={source!r}: expected pgserver, binaries or auto")
    if os.environ.get("DATABASE_URL"):
        return start_server("DATABASE_URL")
    try:
        return _start_pgserver()
    except ImportError:
        logger.info("pgserver is not installed; trying PostgreSQL binaries")
    except Exception:
        logger.warning("pgserver failed to start; trying PostgreSQL binaries", exc_info=True)
    why = "No PostgreSQL available: DATABASE_URL is not set, pgserver is not available, and "
    return _start_binaries(_require_bindir(why))


_lock = threading.Lock()
_server: RunningServer | None = None


def get_server() -> ServerInfo:
    """The process-wide server: started on the first call (thread-safe), stopped at exit."""
    global _server
    with _lock:
        if _server is None:
            _server = start_server()
            atexit.register(_server.stop)
            info = _server.info
            logger.info(
                "using PostgreSQL from %s: host=%r port=%s dbname=%s user=%s",
                *(info.source, info.host, info.port, info.dbname, info.user),
            )
        return _server.info


def find_postgres_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``: from ``PATH`` (symlinks resolved),
    else the highest version under ``/usr/lib/postgresql/*/bin``; ``None`` if there is none."""
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).resolve().parent] if on_path else []

    def version(bindir: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", bindir.parent.name))

    candidates += sorted(Path("/").glob(DEBIAN_BINDIRS.lstrip("/")), key=version, reverse=True)
    for bindir in candidates:
        if all(os.access(bindir / exe, os.X_OK) for exe in ("initdb", "postgres")):
            return bindir
    return None


def _require_bindir(why: str) -> Path:
    bindir = find_postgres_bindir()
    if bindir is None:
        raise RuntimeError(
            f"{why}no initdb/postgres binaries were found on PATH or in {DEBIAN_BINDIRS}. " + _HELP
        )
    return bindir


def _start_pgserver() -> RunningServer:
    with warnings.catch_warnings():
        # platformdirs warns at pgserver's import when XDG_RUNTIME_DIR is unset (as in containers).
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        from pgserver.postgres_server import get_server as get_pgserver

    tmp = Path(tempfile.mkdtemp(prefix="async_prefetch_pgserver_"))
    try:
        server = get_pgserver(tmp, cleanup_mode="stop")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    postmaster = server.get_postmaster_info()
    disarm = _watchdog(postmaster.pid, tmp)
    info = ServerInfo(
        source="pgserver",
        dbname="postgres",
        user="postgres",
        password="",
        host=str(postmaster.socket_dir) if postmaster.socket_dir else postmaster.hostname or "",
        port=postmaster.port,
    )

    def stop() -> None:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
        disarm()

    return RunningServer(info, tmp, stop)


def _start_binaries(bindir: Path) -> RunningServer:
    tmp = Path(tempfile.mkdtemp(prefix="async_prefetch_pg_"))
    data = tmp / "data"
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:
        import pwd

        for name in ("postgres", "nobody"):
            try:
                account = pwd.getpwnam(name)
            except KeyError:
                continue
            os.chown(tmp, account.pw_uid, account.pw_gid)
            run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
            break
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run initdb")
    log_path = tmp / "postgres.log"
    info = ServerInfo("binaries", "postgres", "postgres", "", str(tmp), 5432)
    process: subprocess.Popen[bytes] | None = None
    disarm: Callable[[], None] | None = None

    def stop() -> None:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)  # "fast" shutdown: disconnects clients
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(tmp, ignore_errors=True)
        if disarm is not None:
            disarm()

    try:
        initdb = subprocess.run(
            [
                *(str(bindir / "initdb"), "-D", str(data), "-U", "postgres"),
                *("--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"),
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            **run_as,
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed ({initdb.returncode}):\n{initdb.stderr}")
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    *(str(bindir / "postgres"), "-D", str(data), "-k", str(tmp), "-h", ""),
                    *("-p", "5432", "-c", "fsync=off", "-c", "full_page_writes=off"),
                    *("-c", "synchronous_commit=off"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                **run_as,
            )
        disarm = _watchdog(process.pid, tmp)
        _wait_until_ready(info, process, log_path)
    except BaseException:
        stop()
        raise
    return RunningServer(info, tmp, stop)


def _wait_until_ready(info: ServerInfo, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"postgres exited with {process.returncode}:\n{log.read_text()}")
        try:
            psycopg.connect(info.url(), connect_timeout=5).close()
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start in time:\n{log.read_text()}") from None
            time.sleep(0.05)
        else:
            return


_WATCHDOG: Final = """\
import os, shutil, signal, sys, time
pid, directory = int(sys.argv[1]), sys.argv[2]

def running():
    os.kill(pid, 0)  # ProcessLookupError once it is gone
    try:  # an exited process nobody has reaped yet is a zombie: gone too
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True

if sys.stdin.buffer.read():  # a message: the owner stopped the server itself
    sys.exit()
try:  # EOF alone: the owner died (os._exit, SIGKILL, ...) with the server still running
    os.kill(pid, signal.SIGINT)  # fast shutdown
    deadline = time.monotonic() + 15
    while running() and time.monotonic() < deadline:
        time.sleep(0.02)
    if running():
        os.kill(pid, signal.SIGKILL)
except ProcessLookupError:
    pass
shutil.rmtree(directory, ignore_errors=True)
"""


def _watchdog(postmaster_pid: int, directory: Path) -> Callable[[], None]:
    """Start a process that stops ``postmaster_pid`` and removes ``directory`` if this process
    ends without stopping the server (atexit does not run on ``os._exit``, which mypy uses, nor on
    signals). Returns the function that tells the watchdog the server was stopped cleanly."""
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(postmaster_pid), str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives signals sent to this process group
    )
    pipe = watchdog.stdin
    assert pipe is not None

    def disarm() -> None:
        with contextlib.suppress(BrokenPipeError):
            pipe.write(b"stopped")
            pipe.close()
        watchdog.wait()

    return disarm
