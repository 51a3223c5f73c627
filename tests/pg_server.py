"""A throwaway PostgreSQL server for tests and benchmarks.

``PostgresServer`` runs ``initdb`` into a fresh temporary directory and then the
``postgres`` binary itself (not ``pg_ctl``, so the test owns the process and can
stop and start it at will), listening on 127.0.0.1 at a free port and on a Unix
socket inside the same directory. ``stop()`` and ``start()`` keep the data, so a
test can take the server away mid-stream; ``cleanup()`` stops it and removes
everything.

Binaries are found with ``pg_config --bindir``, then ``/usr/lib/postgresql/*/bin``
(newest first), then ``PATH``. PostgreSQL refuses to run as root, so under root
the server runs as the ``postgres`` user (Debian's package creates it), else
``nobody``, and its directory is chowned to that user.

Without binaries, ``require_bindir()`` skips the test (under CI's
``WALBATCH_NO_SKIP=1`` the root conftest turns that skip into a failure).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from urllib.parse import quote

import pytest

USER = "walbatch"  # the database superuser initdb creates (trust auth: no password)
START_TIMEOUT = 30.0


def find_bindir() -> str | None:
    """The directory holding initdb and postgres, or None."""
    candidates: list[str] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.strip()
            candidates.append(out)
        except (OSError, subprocess.SubprocessError):
            pass
    # Newest major version first: /usr/lib/postgresql/15/bin before .../9.6/bin.
    versioned = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(versioned, key=_version_key, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(os.path.dirname(initdb))
    for d in candidates:
        if all(os.access(os.path.join(d, exe), os.X_OK) for exe in ("initdb", "postgres")):
            return d
    return None


def _version_key(path: str) -> tuple[int, ...]:
    version = os.path.basename(os.path.dirname(path))
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return (0,)


def require_bindir() -> str:
    """The binaries' directory; skip the test without them."""
    bindir = find_bindir()
    if bindir is None:
        reason = ("PostgreSQL server binaries not found (looked at `pg_config --bindir`, "
                  "/usr/lib/postgresql/*/bin and PATH); install e.g. the `postgresql` package")
        pytest.skip(reason)
    return bindir


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged user to run the server as when we are root, else None."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root, and neither user 'postgres' nor 'nobody' exists to "
                       "run PostgreSQL as (it refuses to run as root)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One initdb'd cluster in a temporary directory, with its postgres process.

    ``fsync=False`` (the tests' default) skips every flush: the tests kill walbatch,
    never the server, so the server's own durability is not under test and the
    suite runs faster. Benchmarks pass ``fsync=True`` for an honest baseline.
    """

    def __init__(self, bindir: str, *, base_dir: str | None = None, fsync: bool = False,
                 settings: dict[str, str] | None = None) -> None:
        self.bindir = bindir
        self.fsync = fsync
        self.settings = dict(settings or {})
        self.port = free_port()
        self.owner = _run_as()
        self.dir = tempfile.mkdtemp(prefix="walbatch-pg-",
                                    dir=os.path.abspath(base_dir) if base_dir else None)
        self.datadir = os.path.join(self.dir, "data")
        self.logfile = os.path.join(self.dir, "postgres.log")
        # A Unix socket path must fit in 107 bytes: under a deep base dir, use /tmp.
        self.sockdir = self.dir if len(self.dir) < 80 else tempfile.mkdtemp(prefix="wbpg-")
        self.proc: subprocess.Popen[bytes] | None = None
        if self.owner is not None:
            for d in {self.dir, self.sockdir}:
                os.chown(d, self.owner.pw_uid, self.owner.pw_gid)
            self._check_reachable()
        self._initdb()

    # ---------------------------------------------------------------- urls

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def url(self, dbname: str = "postgres", **params: str) -> str:
        """A ``postgresql://`` URL for the server over TCP, with extra query ``params``."""
        query = "&".join(f"{k}={quote(str(v), safe=':,')}" for k, v in params.items())
        return f"postgresql://{USER}@{self.host}:{self.port}/{dbname}" + (f"?{query}" if query else "")

    @property
    def conninfo(self) -> str:
        return f"host={self.host} port={self.port} user={USER} dbname=postgres"

    # ----------------------------------------------------------- lifecycle

    def _as_owner(self) -> dict:
        if self.owner is None:
            return {}
        return {"user": self.owner.pw_uid, "group": self.owner.pw_gid, "extra_groups": []}

    def _check_reachable(self) -> None:
        # The server user must be able to reach its directory: a base dir under a
        # 0700 home (e.g. /root) would make initdb fail with a confusing message.
        probe = subprocess.run(["test", "-w", self.dir], **self._as_owner())
        if probe.returncode != 0:
            raise RuntimeError(f"user {self.owner.pw_name!r} (PostgreSQL refuses to run as "
                               f"root) cannot write {self.dir}: pick a base directory every "
                               "user can traverse")

    def _initdb(self) -> None:
        cmd = [os.path.join(self.bindir, "initdb"), "-D", self.datadir, "-U", USER, "-A", "trust",
               "-E", "UTF8", "--locale=C", "--no-instructions"]
        if not self.fsync:
            cmd.append("--no-sync")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                              env=self._env(), **self._as_owner())
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": self.sockdir,
            "fsync": "on" if self.fsync else "off",
            "synchronous_commit": "on" if self.fsync else "off",
            "full_page_writes": "on" if self.fsync else "off",
            "max_connections": "100",
            "logging_collector": "off",
            **self.settings,
        }
        cmd = [os.path.join(self.bindir, "postgres"), "-D", self.datadir]
        for k, v in settings.items():
            cmd += ["-c", f"{k}={v}"]
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env=self._env(), start_new_session=True,
                                         **self._as_owner())
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        sock = os.path.join(self.sockdir, f".s.PGSQL.{self.port}")
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode} while starting:\n"
                                   + self.log_tail())
            if os.path.exists(sock) and self._accepts():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"postgres did not accept connections in {START_TIMEOUT}s:\n"
                           + self.log_tail())

    def _accepts(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.conninfo, connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT): sessions are cut, the data stays for start()."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGQUIT)  # immediate shutdown; the data dir is throwaway
            proc.wait(timeout)

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            shutil.rmtree(self.sockdir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.logfile, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no server log)"

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def running_server(**kwargs) -> Iterator[PostgresServer]:
    """Start a server for a fixture: skip without binaries or driver, clean up after."""
    pytest.importorskip("psycopg", reason="the PostgreSQL tests need psycopg: "
                        "pip install 'walbatch[postgresql]'")
    bindir = require_bindir()
    server = PostgresServer(bindir, **kwargs)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module", name="postgres")
def postgres_fixture() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole test module (fsync off: we never crash it)."""
    yield from running_server()
