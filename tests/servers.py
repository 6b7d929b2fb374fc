"""Extra servers for the tests: streaming replicas of the test primary, and PgBouncer.

:func:`start_replicas` takes one base backup of the running test primary (``pg_basebackup
-R``: a standby that streams from it) and starts each replica from a copy of it, on a unix
socket in a temporary directory, logging every statement (``log_statement=all``) so that
tests count the queries each server ran (:meth:`Replica.statements`). The binaries must be
of the primary's major version: pgserver's bundle (PostgreSQL 16, the embedded primary's
own) or ``/usr/lib/postgresql/<major>/bin``; the primary must accept replication
connections from its local user (initdb's default ``pg_hba.conf`` does, and
``wal_level=replica`` with ``max_wal_senders=10`` are PostgreSQL's defaults). As root,
the replicas run as the owner of the primary's socket directory (pgserver's ``pgserver``
user, or the ``postgres`` user of the embedded binaries), which PostgreSQL requires.

:func:`start_pgbouncer` starts ``pgbouncer`` in transaction pooling mode in front of the
primary, on a free loopback port (as root, with ``-u`` and the same non-root user).

Both raise :class:`Unavailable` (the fixtures skip with its reason) when the binaries are
missing or the primary cannot be replicated; both stop their processes and remove their
directories when stopped, and a watchdog does it if the test process dies.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from asgiref.sync import SyncToAsync
from django.db import connections

from async_prefetch.devtools.embedded import ServerInfo, _watchdog, find_postgres_bindir, get_server
from async_prefetch.devtools.latency_proxy import LatencyProxyProcess
from async_prefetch.execution.pools import close_pools, close_pools_of
from async_prefetch.runtime import bridge

_STARTUP_TIMEOUT = 60.0
_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")  # log_line_prefix's %m


class Unavailable(Exception):
    """A server the tests need cannot be started here (the message says why)."""


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _major(version_text: str) -> int | None:
    """The major version in ``postgres --version``'s output."""
    match = re.search(r"\(PostgreSQL\) (\d+)", version_text)
    return int(match.group(1)) if match else None


def bindir_for(major: int) -> Path | None:
    """A directory with ``pg_basebackup`` and ``postgres`` of PostgreSQL ``major``:
    pgserver's bundle, then ``PATH`` and ``/usr/lib/postgresql/*/bin``."""
    candidates: list[Path] = []
    with contextlib.suppress(ImportError):
        from pgserver._commands import POSTGRES_BIN_PATH

        candidates.append(Path(POSTGRES_BIN_PATH))
    found = find_postgres_bindir()
    if found is not None:
        candidates.append(found)
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    for bindir in candidates:
        if not all(os.access(bindir / exe, os.X_OK) for exe in ("pg_basebackup", "postgres")):
            continue
        version = subprocess.run(
            [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=False
        ).stdout
        if _major(version) == major:
            return bindir
    return None


def _run_as(directory: str) -> dict[str, Any]:
    """``subprocess`` arguments to run as a non-root user when this process is root: the
    owner of ``directory`` (the primary's socket directory) if not root, else ``postgres``,
    ``pgserver`` or ``nobody``; ``{}`` when not root."""
    if os.geteuid() != 0:
        return {}
    uids: list[int] = []
    with contextlib.suppress(OSError):
        uids.append(os.stat(directory).st_uid)
    for name in ("postgres", "pgserver", "nobody"):
        with contextlib.suppress(KeyError):
            uids.append(pwd.getpwnam(name).pw_uid)
    for uid in uids:
        if uid != 0:
            account = pwd.getpwuid(uid)
            return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    raise Unavailable("running as root with no non-root user to run PostgreSQL as")


def _chown_for(path: Path, run_as: dict[str, Any]) -> None:
    if run_as:
        os.chown(path, run_as["user"], run_as["group"])


@dataclass
class _Process:
    """A server process, stopped by ``stop_signal``: PostgreSQL's fast shutdown (SIGINT)
    by default; PgBouncer's immediate one is SIGTERM (its SIGINT waits for clients)."""

    process: subprocess.Popen[bytes] | None = None
    disarm: Callable[[], None] | None = None
    stop_signal: signal.Signals = signal.SIGINT

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(self.stop_signal)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        disarm, self.disarm = self.disarm, None
        if disarm is not None:
            disarm()


@dataclass
class Replica:
    """A streaming replica of the test primary (see the module docstring)."""

    name: str
    bindir: Path
    directory: Path  # its socket directory; the data directory is under it
    run_as: dict[str, Any] = field(repr=False)
    _server: _Process = field(default_factory=_Process, repr=False)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / "postgres.log"

    def info(self, dbname: str = "postgres") -> ServerInfo:
        return ServerInfo(self.name, dbname, "postgres", "", str(self.directory), 5432)

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(self.info(dbname).url(), autocommit=True, connect_timeout=5)

    @property
    def running(self) -> bool:
        return self._server.process is not None and self._server.process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it accepts (read-only) connections."""
        assert not self.running
        with self.log_path.open("ab") as log:
            process = subprocess.Popen(
                [
                    *(str(self.bindir / "postgres"), "-D", str(self.data)),
                    *("-k", str(self.directory), "-h", "", "-p", "5432"),
                    *("-c", "fsync=off", "-c", "log_statement=all"),
                    *("-c", "log_line_prefix=%m [%p] "),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                **self.run_as,
            )
        self._server.process = process
        self._server.disarm = _watchdog(process.pid, self.directory)
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while True:
            if process.poll() is not None:
                raise Unavailable(
                    f"replica {self.name} exited with {process.returncode}:\n{self._log_tail()}"
                )
            try:
                self.connect().close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    message = f"replica {self.name} did not start:\n{self._log_tail()}"
                    raise Unavailable(message) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (fast shutdown); its directory stays for :meth:`start`."""
        self._server.stop()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""

    def log_mark(self) -> int:
        """A position in the server log: :meth:`statements` reads from there."""
        return self.log_path.stat().st_size

    def statements(self, since: int, containing: str = "") -> list[str]:
        """The statements the server logged since ``since`` whose text contains
        ``containing``."""
        with self.log_path.open("rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
        statements: list[str] = []
        current: list[str] | None = None  # the lines of the statement being read
        for line in text.splitlines():
            if _LOG_LINE.match(line):
                _, marker, statement = line.partition(" LOG:  statement: ")
                current = [statement] if marker else None
                if current is not None:
                    statements.append("")
            elif current is not None:  # a statement's next line
                current.append(line)
            if current is not None:
                statements[-1] = "\n".join(current)
        return [statement for statement in statements if containing in statement]

    def replay_lsn(self) -> str:
        with self.connect() as conn:
            row = conn.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()
        assert row is not None
        return str(row[0])

    def wait_for_replay(self, lsn: str, timeout: float = 30.0) -> None:
        """Wait until the replica has replayed the primary's WAL up to ``lsn``."""
        deadline = time.monotonic() + timeout
        with self.connect() as conn:
            while True:
                row = conn.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [lsn]
                ).fetchone()
                if row is not None and row[0]:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"replica {self.name} did not replay up to {lsn}")
                time.sleep(0.01)


def primary_lsn(primary: ServerInfo) -> str:
    """The primary's current WAL insert position (after the writes committed so far)."""
    with psycopg.connect(primary.url(), autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def start_replicas(primary: ServerInfo, names: list[str]) -> list[Replica]:
    """One running streaming replica of ``primary`` per name (see the module docstring).

    Raises :class:`Unavailable` when there are no binaries of the primary's version, or
    the base backup fails (no replication connection allowed).
    """
    try:
        with psycopg.connect(primary.url(), autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SELECT current_setting('server_version_num')::int").fetchone()
    except psycopg.Error as exc:
        raise Unavailable(f"cannot connect to the test primary: {exc}") from exc
    assert row is not None
    major = int(row[0]) // 10000
    bindir = bindir_for(major)
    if bindir is None:
        raise Unavailable(
            f"no pg_basebackup/postgres of PostgreSQL {major} (the test primary's version) "
            "in pgserver's bundle, on PATH or in /usr/lib/postgresql/*/bin"
        )
    run_as = _run_as(primary.host) if primary.host.startswith("/") else _run_as("/")
    base = Path(tempfile.mkdtemp(prefix="async_prefetch_replica_base_"))
    replicas: list[Replica] = []
    try:
        _chown_for(base, run_as)
        command = [
            *(str(bindir / "pg_basebackup"), "-D", str(base / "data"), "-R"),
            *("-X", "stream", "--checkpoint=fast", "--no-sync"),
            *("-h", primary.host or "localhost", "-U", primary.user),
        ]
        if primary.port is not None:
            command += ["-p", str(primary.port)]
        env = dict(os.environ)
        if primary.password:
            env["PGPASSWORD"] = primary.password
        backup = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            env=env,
            timeout=120,
            **run_as,
        )
        if backup.returncode != 0:
            raise Unavailable(
                f"pg_basebackup from the test primary failed ({backup.returncode}): "
                f"{backup.stderr.strip()}"
            )
        for name in names:
            directory = Path(tempfile.mkdtemp(prefix=f"async_prefetch_{name}_"))
            _chown_for(directory, run_as)
            shutil.copytree(base / "data", directory / "data", symlinks=True)
            if run_as:
                for path in [directory / "data", *(directory / "data").rglob("*")]:
                    os.lchown(path, run_as["user"], run_as["group"])
            (directory / "data").chmod(0o700)
            replica = Replica(name, bindir, directory, run_as)
            replicas.append(replica)
            replica.start()
    except BaseException:
        for replica in replicas:
            replica.remove()
        raise
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return replicas


@dataclass
class PgBouncer:
    """A running ``pgbouncer`` in front of a primary (see :func:`start_pgbouncer`)."""

    port: int
    directory: Path
    _server: _Process = field(
        default_factory=lambda: _Process(stop_signal=signal.SIGTERM), repr=False
    )

    def info(self, dbname: str, user: str = "postgres") -> ServerInfo:
        return ServerInfo("pgbouncer", dbname, user, "", "127.0.0.1", self.port)

    def stop(self) -> None:
        self._server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.directory / "pgbouncer.log").read_text(errors="replace")
        return ""


def pgbouncer_binary() -> str | None:
    """The ``pgbouncer`` executable: on ``PATH`` or where Debian installs it."""
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)),
        None,
    )


def start_pgbouncer(primary: ServerInfo, *, pool_size: int = 20) -> PgBouncer:
    """``pgbouncer`` with ``pool_mode = transaction`` in front of ``primary`` (every
    database name passed through, ``trust`` authentication), listening on a free port of
    127.0.0.1 only. Raises :class:`Unavailable` when there is no ``pgbouncer``."""
    binary = pgbouncer_binary()
    if binary is None:
        raise Unavailable("no pgbouncer binary (apt-get install pgbouncer)")
    run_as = _run_as(primary.host) if primary.host.startswith("/") else _run_as("/")
    directory = Path(tempfile.mkdtemp(prefix="async_prefetch_pgbouncer_"))
    _chown_for(directory, run_as)
    port = free_port()
    server_port = primary.port or 5432
    host = primary.host or "/var/run/postgresql"
    password = f" password={primary.password}" if primary.password else ""
    (directory / "userlist.txt").write_text(f'"{primary.user}" ""\n')
    (directory / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={host} port={server_port} user={primary.user}{password}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {directory / 'userlist.txt'}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {pool_size}\n"
        "max_client_conn = 500\n"
        f"admin_users = {primary.user}\n"
        f"logfile = {directory / 'pgbouncer.log'}\n"
        f"pidfile = {directory / 'pgbouncer.pid'}\n"
    )
    for path in directory.iterdir():
        _chown_for(path, run_as)
    command = [binary, str(directory / "pgbouncer.ini")]
    if run_as:  # pgbouncer refuses to run as root; -u switches to the user
        command[1:1] = ["-u", pwd.getpwuid(run_as["user"]).pw_name]
    bouncer = PgBouncer(port, directory)
    try:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        bouncer._server.process = process
        bouncer._server.disarm = _watchdog(process.pid, directory)
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        info = bouncer.info(primary.dbname, primary.user)
        while True:
            if process.poll() is not None:
                stderr = process.stderr.read().decode() if process.stderr else ""
                raise Unavailable(
                    f"pgbouncer exited with {process.returncode}: {stderr}{bouncer.log()}"
                )
            try:
                psycopg.connect(info.url(), connect_timeout=5).close()
                return bouncer
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise Unavailable(f"pgbouncer did not start:\n{bouncer.log()}") from None
                time.sleep(0.05)
    except BaseException:
        bouncer.stop()
        raise


@contextlib.contextmanager
def pgbouncer_databases(pool_size: int, entries: dict[str, dict[str, Any]]) -> Iterator[PgBouncer]:
    """PgBouncer (transaction pooling, ``pool_size`` server connections) in front of the
    test primary, reached through ``DATABASES`` aliases (:func:`extra_databases`): each of
    ``entries`` the test database through PgBouncer, with the given keys replaced.
    Raises :class:`Unavailable` when there is no ``pgbouncer``; stopped on exit."""
    server = start_pgbouncer(get_server(), pool_size=pool_size)
    try:
        through = {"HOST": "127.0.0.1", "PORT": str(server.port), "TEST": {"MIRROR": "default"}}
        with extra_databases({alias: {**through, **keys} for alias, keys in entries.items()}):
            yield server
    finally:
        server.stop()


@contextlib.contextmanager
def default_through_proxy(rtt: float) -> Iterator[LatencyProxyProcess]:
    """The ``default`` alias (the caller's own connection, and the engine's pool) through
    a latency proxy adding ``rtt`` seconds per round trip; restored afterwards, its
    connections and pools closed."""
    conn = connections["default"]
    saved = dict(conn.settings_dict)
    with LatencyProxyProcess(get_server().address(), rtt_ms=rtt * 1000) as proxy:
        conn.close()
        conn.settings_dict.update(HOST=proxy.host, PORT=str(proxy.port))
        try:
            yield proxy
        finally:
            conn.close()
            conn.settings_dict.clear()
            conn.settings_dict.update(saved)
            bridge.run_sync(close_pools)


_used_aliases: set[str] = set()


@contextlib.contextmanager
def extra_databases(entries: dict[str, dict[str, Any]]) -> Iterator[None]:
    """``DATABASES`` (and Django's connection handler) with ``entries`` added, each a
    copy of the ``default`` entry (the test database) with the given keys replaced; on
    exit the entries are removed, and their Django connections and engine pools closed."""
    databases = connections.settings  # settings.DATABASES itself, defaults filled in
    for alias, overrides in entries.items():
        assert alias not in databases, alias
        # Threads this process no longer reaches (executor workers) may still hold a
        # Django connection wrapper for an alias used before, with its old settings:
        # an alias is used once per process.
        assert alias not in _used_aliases, (
            f"extra_databases(): alias {alias!r} was used before in this process; "
            "give each use its own alias"
        )
        _used_aliases.add(alias)
        entry = copy.deepcopy(connections["default"].settings_dict)
        entry.update(overrides)
        databases[alias] = entry
    try:
        yield
    finally:
        aliases = list(entries)
        bridge.on_engine_thread(lambda: _forgotten_on_engine(aliases))
        SyncToAsync.single_thread_executor.submit(_forget, aliases).result()
        _forget(aliases)
        for alias in aliases:
            databases.pop(alias, None)


def _forget(aliases: list[str], *, close: bool = True) -> None:
    """Close (unless not ``close``) and drop this thread's Django connections for ``aliases``."""
    for alias in aliases:
        if close:
            with contextlib.suppress(Exception):
                connections[alias].close()
        with contextlib.suppress(AttributeError):
            del connections[alias]


async def _forgotten_on_engine(aliases: list[str]) -> None:
    """On the engine's thread: close the pools of ``aliases`` and drop its wrappers (the
    engine only reads their settings: they hold no connection)."""
    await close_pools_of(*aliases)
    _forget(aliases, close=False)
