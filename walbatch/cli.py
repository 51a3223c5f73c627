"""The ``walbatch`` command line: a thin click layer over the library.

Errors from the library become one clear line (``click.ClickException``), never
a traceback; exit codes are documented in docs/cli.md.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import inspect
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from typing import Any

import click

from . import __version__
from .durable import DurableBatcher
from .errors import WalbatchError
from .options import Options

_DEMO_MARKER = ".walbatch-demo"


def protocol_default_frame() -> int:
    from .protocol import DEFAULT_MAX_FRAME

    return DEFAULT_MAX_FRAME


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="walbatch")
def cli() -> None:
    """walbatch: fsync each item to a log, batch it to a sink, never lose it.

    Exit codes: 0 success, 1 an error (one line on stderr), 2 bad usage,
    3 the log is corrupt (verify found damage).
    """


# ----------------------------------------------------------------- options

class Size(click.ParamType):
    """A byte count: 1048576, 512KiB, 64MiB, 1GiB (also k/M/G, KB/MB/GB as powers of 1024)."""

    name = "size"
    _UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
              "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace("_", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits):].strip()
        try:
            return int(float(digits) * self._UNITS[unit])
        except (ValueError, KeyError):
            self.fail(f"{value!r} is not a size (examples: 4096, 512KiB, 64MiB, 1GiB)", param, ctx)


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field (the style of options.py)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for i, node in enumerate(body[:-1]):
        nxt = body[i + 1]
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(
                nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
    return docs


_SIZE_OPTIONS = {"max_bytes", "segment_bytes", "max_log_bytes", "max_group_bytes", "memory_tail_bytes"}


def batcher_options(f):  # type: ignore[no-untyped-def]
    """Add one flag per Options field (env WALBATCH_<NAME>, config key <name>)."""
    docs = _field_docs(Options)
    for fld in reversed(dataclasses.fields(Options)):
        if fld.name == "permanent_errors":
            continue
        if fld.name in _SIZE_OPTIONS:
            ptype: Any = Size()
        elif fld.name == "on_corruption":
            ptype = click.Choice(["raise", "quarantine"])
        elif fld.name == "retry_limit" or isinstance(fld.default, int):
            ptype = click.IntRange(min=0)
        else:
            ptype = click.FloatRange(min=0)
        f = click.option(
            "--" + fld.name.replace("_", "-"), fld.name, type=ptype, default=None,
            envvar="WALBATCH_" + fld.name.upper(), show_envvar=True,
            help=f"{docs.get(fld.name, '')} [default: {fld.default!r}]",
        )(f)
    return f


def _options_from(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The Options the user set (flag, env or config); the rest keep their defaults."""
    return {name: kwargs[name] for name in Options.names() if kwargs.get(name) is not None}


def _load_config(ctx: click.Context, _param: click.Parameter, path: str | None) -> str | None:
    """Read a TOML config into click's default_map: flag > env > file > default."""
    if not path:
        return path
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as ex:
        raise click.BadParameter(f"cannot read {path}: {ex.strerror}") from None
    except tomllib.TOMLDecodeError as ex:
        raise click.BadParameter(f"{path} is not valid TOML: {ex}") from None
    data = data.get("walbatch", data)
    known = {p.name for p in ctx.command.params if p.name}
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known or name == "config":
            raise click.BadParameter(f"{path}: unknown setting {key!r}")
        values[name] = value
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return path


def _fail(ex: BaseException) -> click.ClickException:
    return click.ClickException(str(ex))


# ------------------------------------------------------------------- serve

@cli.command()
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=_load_config, envvar="WALBATCH_CONFIG",
              help="TOML file of settings (same names as the flags, with _ or -).")
@click.option("--data-dir", default="walbatch-data", show_default=True, envvar="WALBATCH_DATA_DIR",
              type=click.Path(file_okay=False), help="The log directory.")
@click.option("--socket", "socket_path", default=None, envvar="WALBATCH_SOCKET",
              help="Unix socket to listen on [default: DATA_DIR/walbatch.sock].")
@click.option("--sink", default=None, envvar="WALBATCH_SINK",
              help="Sink URL: sqlite:///PATH, file:///PATH, module:function "
                   "[default: sqlite:///DATA_DIR/walbatch.db].")
@click.option("--socket-mode", default="0600", show_default=True, envvar="WALBATCH_SOCKET_MODE",
              help="Permissions of the socket file (octal).")
@click.option("--socket-group", default=None, envvar="WALBATCH_SOCKET_GROUP",
              help="Group owning the socket file (with --socket-mode 0660, its members may connect).")
@click.option("--allow-uid", type=int, multiple=True, envvar="WALBATCH_ALLOW_UID",
              help="Only serve peers with this uid (SO_PEERCRED); repeatable.")
@click.option("--allow-gid", type=int, multiple=True, envvar="WALBATCH_ALLOW_GID",
              help="Only serve peers with this gid; repeatable.")
@click.option("--max-frame-bytes", type=Size(), default=protocol_default_frame(),
              show_default=True, envvar="WALBATCH_MAX_FRAME_BYTES",
              help="Largest request frame accepted; a larger one gets too_large and is disconnected.")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              envvar="WALBATCH_SHUTDOWN_TIMEOUT",
              help="On SIGTERM/SIGINT, deliver for at most this long, then exit leaving the rest in the log.")
@click.option("--log-level", default="info", show_default=True, envvar="WALBATCH_LOG_LEVEL",
              type=click.Choice(["debug", "info", "warning", "error"]))
@batcher_options
def serve(data_dir: str, socket_path: str | None, sink: str | None, socket_mode: str,
          socket_group: str | None, allow_uid: tuple[int, ...], allow_gid: tuple[int, ...],
          max_frame_bytes: int, shutdown_timeout: float, log_level: str, **kwargs: Any) -> None:
    """Run the daemon: take items over a Unix socket, fsync, batch them to the sink.

    Every setting is a flag, a WALBATCH_* environment variable or a key in the
    --config TOML file (flag > env > file > default). SIGTERM or SIGINT stops
    it gracefully. docs/protocol.md describes the socket protocol.

    \b
    Example:
        walbatch serve --data-dir /var/lib/walbatch --sink "sqlite:///events.db?table=events"
    """
    from .server import Server, ServerOptions

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        mode = int(socket_mode, 8)
    except ValueError:
        raise click.BadParameter(f"{socket_mode!r} is not an octal mode",
                                 param_hint="--socket-mode") from None
    opts = _options_from(kwargs)
    os.makedirs(data_dir, exist_ok=True)
    socket_path = socket_path or os.path.join(data_dir, "walbatch.sock")
    sink = sink or f"sqlite:///{os.path.abspath(os.path.join(data_dir, 'walbatch.db'))}"
    try:
        batcher = DurableBatcher(data_dir, sink, **opts)
    except (WalbatchError, ValueError, TypeError, ImportError, OSError) as ex:
        raise _fail(ex) from None
    server = Server(batcher, ServerOptions(
        socket_path=socket_path, socket_mode=mode, socket_group=socket_group,
        allow_uids=tuple(allow_uid), allow_gids=tuple(allow_gid), max_frame_bytes=max_frame_bytes,
        shutdown_timeout=shutdown_timeout))
    try:
        asyncio.run(server.serve())
    except (OSError, ValueError) as ex:
        batcher.close(shutdown_timeout)
        raise _fail(ex) from None


@cli.command()
@click.option("--dir", "directory", default="walbatch-demo", show_default=True,
              type=click.Path(file_okay=False), help="Where the demo keeps its log and database.")
@click.option("--items", default=20000, show_default=True, type=click.IntRange(100),
              help="How many items the writer tries to submit before it is killed.")
@click.option("--threads", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Submitting threads in the writer.")
@click.option("--child", is_flag=True, hidden=True)
def demo(directory: str, items: int, threads: int, child: bool) -> None:
    """Kill -9 a writer mid-stream, restart, and show every acknowledged item landed once.

    A child process submits items from several threads to a DurableBatcher whose
    sink is SQLite (DIR/demo.db), recording each acknowledged item in DIR/acks.
    Halfway through, the demo kills it with SIGKILL, opens the log again
    (which replays what was not delivered) and compares the database with
    what was acknowledged.

    \b
    Example:
        walbatch demo --items 50000
    """
    log_dir = os.path.join(directory, "log")
    db_path = os.path.join(directory, "demo.db")
    sink = f"sqlite:///{os.path.abspath(db_path)}?table=events"
    if child:
        _demo_child(log_dir, sink, os.path.join(directory, "acks"), items, threads)
        return
    if os.path.exists(directory):
        if not os.path.exists(os.path.join(directory, _DEMO_MARKER)):
            raise click.ClickException(
                f"{directory} exists and was not made by walbatch demo; pick another --dir")
        shutil.rmtree(directory)
    os.makedirs(directory)
    open(os.path.join(directory, _DEMO_MARKER), "w").close()
    acks_path = os.path.join(directory, "acks")

    click.echo(f"1. writer: submitting up to {items:,} items from {threads} threads "
               f"(sink: SQLite {db_path})")
    proc = subprocess.Popen(
        [sys.executable, "-m", "walbatch", "demo", "--child", "--dir", directory,
         "--items", str(items), "--threads", str(threads)],
    )
    target = items // 2
    deadline = time.monotonic() + 120
    while _count_lines(acks_path) < target and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    acked = _read_acks(acks_path)
    click.echo(f"2. kill -9 after {len(acked):,} acknowledged items")

    t0 = time.monotonic()
    with DurableBatcher(log_dir, sink) as b:
        backlog = b.stats().pending
        b.flush(timeout=120)
        stats = b.stats()
    click.echo(f"3. restarted: replayed a backlog of {backlog:,} items in "
               f"{time.monotonic() - t0:.2f}s")

    conn = sqlite3.connect(db_path)
    rows = dict(conn.execute("SELECT id, COUNT(*) FROM events GROUP BY id"))
    conn.close()
    missing = [i for i in acked if i not in rows]
    duplicated = [i for i, n in rows.items() if n > 1]
    extra = len(set(rows) - set(acked))
    click.echo(f"4. in SQLite: {len(rows):,} distinct items, {sum(rows.values()):,} rows")
    click.echo(f"   acknowledged but missing: {len(missing)}")
    click.echo(f"   duplicated:               {len(duplicated)}")
    if extra:
        click.echo(f"   delivered but not yet recorded by the writer when it died: {extra} "
                   "(acknowledged in its last instant)")
    click.echo(f"   stats: submitted={stats.submitted:,} delivered={stats.delivered:,} "
               f"dead_lettered={stats.dead_lettered} pending={stats.pending} "
               f"fsyncs={stats.fsyncs}")
    if missing or duplicated:
        raise click.ClickException("the demo found lost or duplicated items: please report this")
    click.echo("OK: every acknowledged item landed exactly once.")


def _demo_child(log_dir: str, sink: str, acks_path: str, items: int, threads: int) -> None:
    lock = threading.Lock()
    acks = open(acks_path, "a", buffering=1)
    per_thread = items // threads

    with DurableBatcher(log_dir, sink, max_delay=0.05) as b:
        def work(t: int) -> None:
            for k in range(per_thread):
                item_id = t * per_thread + k
                b.submit({"id": item_id, "thread": t, "payload": f"event {item_id}"})
                with lock:  # the item is durable now; record it before counting it
                    acks.write(f"{item_id}\n")

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
    except FileNotFoundError:
        return 0


def _read_acks(path: str) -> list[int]:
    try:
        with open(path) as f:
            return [int(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def main() -> None:
    try:
        cli(standalone_mode=True)
    except WalbatchError as ex:  # pragma: no cover - click handles most paths
        click.echo(f"walbatch: {ex}", err=True)
        sys.exit(1)

