"""The ``walbatch`` command line: a thin click layer over the library.

Errors from the library become one clear line (``click.ClickException``), never
a traceback; exit codes are documented in docs/cli.md.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import importlib
import inspect
import logging
import os
import signal
import sys
import threading
import time
import tomllib
from typing import Any

import click
import msgpack

from . import __version__, values
from .durable import DurableBatcher
from .errors import WalbatchError, format_seqs
from .keys import check_key
from .log import Log
from .options import MAX_SECONDS, Options

EXIT_DEAD_LETTERED = 4  # replay finished, but some items went to the dead letters
# A backlog is there all at once: `walbatch replay` batches bigger than a live batcher
# would (one sink transaction and fsync per batch), unless --max-items says otherwise.
REPLAY_DEFAULTS = {"max_items": 5000}


def protocol_default_frame() -> int:
    from .protocol import DEFAULT_MAX_FRAME

    return DEFAULT_MAX_FRAME


def docs_dir() -> str:
    """Where the documentation that help texts and messages name (docs/...) is installed."""
    installed = os.path.join(sys.prefix, "share", "doc", "walbatch")
    if os.path.isdir(os.path.join(installed, "docs")):
        return installed
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # a source checkout


@click.group(context_settings={"help_option_names": ["-h", "--help"]},
             epilog=f"Documentation (README.md, docs/): {docs_dir()}")
@click.version_option(__version__, prog_name="walbatch")
def cli() -> None:
    """walbatch: fsync each item to a log, batch it to a sink, never lose it.

    Exit codes: 0 success, 1 an error (one line on stderr), 2 bad usage,
    3 the log is corrupt (verify found damage), 4 replay dead-lettered items.
    """


# ----------------------------------------------------------------- options

class Size(click.ParamType):
    """A byte count: 1048576, 512KiB, 64MiB, 1GiB (also k/M/G, KB/MB/GB as powers of 1024)."""

    name = "size"

    def __init__(self, min_value: int = 0) -> None:
        self.min_value = min_value

    _UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
              "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if isinstance(value, int):
            if value < self.min_value:
                self.fail(f"{value} is below the minimum of {self.min_value} bytes", param, ctx)
            return value
        text = str(value).strip().lower().replace("_", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits):].strip()
        try:
            size = int(float(digits) * self._UNITS[unit])
        except (ValueError, KeyError):
            self.fail(f"{value!r} is not a size (examples: 4096, 512KiB, 64MiB, 1GiB)", param, ctx)
        if size < self.min_value:
            self.fail(f"{value!r} is below the minimum of {self.min_value} bytes", param, ctx)
        return size


class Callable_(click.ParamType):
    """``module:function``, imported when the command runs (e.g. ``--combine``)."""

    name = "module:function"

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if callable(value):
            return value
        module, _, attr = str(value).partition(":")
        if not module or not attr:
            self.fail(f"{value!r} is not module:function", param, ctx)
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as ex:
            self.fail(f"cannot load {value!r}: {ex}", param, ctx)
        if not callable(fn):
            self.fail(f"{value!r} is not callable", param, ctx)
        return fn


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
        if fld.name in ("permanent_errors", "strict_modes"):  # strict_modes: serve's own flag
            continue
        if fld.name in _SIZE_OPTIONS:
            ptype: Any = Size()
        elif fld.name == "on_corruption":
            ptype = click.Choice(["raise", "quarantine"])
        elif fld.name == "combine":
            ptype = Callable_()
        elif isinstance(fld.default, bool):
            ptype = click.BOOL
        elif fld.name in ("retry_limit", "breaker_failures") or isinstance(fld.default, int):
            ptype = click.IntRange(min=1)
        else:
            ptype = click.FloatRange(min=0, max=MAX_SECONDS)
        f = click.option(
            "--" + fld.name.replace("_", "-"), fld.name, type=ptype, default=None,
            envvar="WALBATCH_" + fld.name.upper(), show_envvar=True,
            help=f"{docs.get(fld.name, '')} [default: {fld.default!r}]",
        )(f)
    return f


def _options_from(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The Options the user set (flag, env or config); the rest keep their defaults.

    Settings that are fine alone but not together (max_log_bytes below twice
    segment_bytes) are a usage error, exit 2, like a bad flag.
    """
    opts = {name: kwargs[name] for name in Options.names() if kwargs.get(name) is not None}
    try:
        Options(**opts)
    except (ValueError, TypeError) as ex:
        raise click.UsageError(str(ex)) from None
    return opts


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
    params = {p.name: p for p in ctx.command.params if p.name}
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in params or name == "config":
            raise click.UsageError(f"{path}: unknown setting {key!r}")
        try:  # checked here, so the error names the file, not a flag or variable
            params[name].type_cast_value(ctx, value)
        except click.BadParameter as ex:
            raise click.UsageError(f"{path}: {key} = {value!r}: {ex.message}") from None
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
              help="Sink URL: sqlite:///PATH, file:///PATH, postgresql://..., nats://..., "
                   "http(s)://..., module:function (docs/sinks.md) "
                   "[default: sqlite:///DATA_DIR/walbatch.db].")
@click.option("--socket-mode", default="0600", show_default=True, envvar="WALBATCH_SOCKET_MODE",
              help="Permissions of the socket file (octal).")
@click.option("--socket-group", default=None, envvar="WALBATCH_SOCKET_GROUP",
              help="Group owning the socket file (with --socket-mode 0660, its members may connect).")
@click.option("--allow-uid", type=int, multiple=True, envvar="WALBATCH_ALLOW_UID",
              help="Only serve peers with this uid (SO_PEERCRED); repeatable.")
@click.option("--allow-gid", type=int, multiple=True, envvar="WALBATCH_ALLOW_GID",
              help="Only serve peers with this gid; repeatable.")
@click.option("--max-frame-bytes", type=Size(min_value=1), default=protocol_default_frame(),
              show_default=True, envvar="WALBATCH_MAX_FRAME_BYTES",
              help="Largest request frame accepted; a larger one gets too_large and is disconnected.")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              envvar="WALBATCH_SHUTDOWN_TIMEOUT",
              help="On SIGTERM/SIGINT, deliver for at most this long, then exit leaving the rest in the log.")
@click.option("--log-level", default="info", show_default=True, envvar="WALBATCH_LOG_LEVEL",
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", default="text", show_default=True, envvar="WALBATCH_LOG_FORMAT",
              type=click.Choice(["text", "json"]),
              help="text for people; json: one object per line with the fields of each state "
                   "change (docs/operations.md).")
@click.option("--strict-modes/--no-strict-modes", default=True, show_default=True,
              envvar="WALBATCH_STRICT_MODES", show_envvar=True,
              help="Refuse a data or socket directory that another user can write to.")
@click.option("--http", "http", default=None, envvar="WALBATCH_HTTP", metavar="HOST:PORT",
              help="Also listen on HTTP: /metrics, /healthz, /readyz, POST /v1/items "
                   "(e.g. 127.0.0.1:9464; needs walbatch[http]; docs/operations.md).")
@click.option("--http-max-body", type=Size(min_value=1), default=16 << 20, show_default=True,
              envvar="WALBATCH_HTTP_MAX_BODY", help="Largest POST body; a larger one gets 413.")
@click.option("--http-token-file", type=click.Path(dir_okay=False), default=None,
              envvar="WALBATCH_HTTP_TOKEN_FILE",
              help="File holding a bearer token that POST /v1/items must present (else 401).")
@click.option("--http-high-water", type=click.FloatRange(0, 1, min_open=True), default=0.8,
              show_default=True, envvar="WALBATCH_HTTP_HIGH_WATER",
              help="Fraction of max_log_bytes from which POSTs get 429 ...")
@click.option("--http-low-water", type=click.FloatRange(0, 1, min_open=True), default=0.6,
              show_default=True, envvar="WALBATCH_HTTP_LOW_WATER",
              help="... until the log is back below this fraction.")
@click.option("--http-retry-after", type=click.IntRange(0, 3600), default=1, show_default=True,
              envvar="WALBATCH_HTTP_RETRY_AFTER", help="Retry-After seconds of a 429 or 503.")
@click.option("--http-idle-timeout", type=click.FloatRange(min=0.01, max=MAX_SECONDS), default=15.0,
              show_default=True, envvar="WALBATCH_HTTP_IDLE_TIMEOUT",
              help="Close an HTTP connection that sends no complete request for this long.")
@click.option("--http-read-timeout", type=click.FloatRange(min=0.01, max=MAX_SECONDS), default=30.0,
              show_default=True, envvar="WALBATCH_HTTP_READ_TIMEOUT",
              help="A POST body not received within this many seconds gets 408.")
@click.option("--otel", is_flag=True, default=False, envvar="WALBATCH_OTEL",
              help="Trace deliveries with OpenTelemetry (walbatch[otel]), linked to the submitters' "
                   "spans (HTTP traceparent); export as any OpenTelemetry program does "
                   "(e.g. opentelemetry-instrument).")
@click.option("--ready-sink-grace", type=click.FloatRange(min=0, max=MAX_SECONDS), default=60.0,
              show_default=True, envvar="WALBATCH_READY_SINK_GRACE",
              help="/readyz turns 503 once the sink has been failing for longer than this.")
@batcher_options
def serve(data_dir: str, socket_path: str | None, sink: str | None, socket_mode: str,
          socket_group: str | None, allow_uid: tuple[int, ...], allow_gid: tuple[int, ...],
          max_frame_bytes: int, shutdown_timeout: float, log_level: str, log_format: str,
          strict_modes: bool, http: str | None, http_max_body: int,
          http_token_file: str | None, http_high_water: float, http_low_water: float,
          http_retry_after: int, http_idle_timeout: float, http_read_timeout: float,
          otel: bool, ready_sink_grace: float, **kwargs: Any) -> None:
    """Run the daemon: take items over a Unix socket (and HTTP), fsync, batch them to the sink.

    Every setting is a flag, a WALBATCH_* environment variable or a key in the
    --config TOML file (flag > env > file > default). SIGTERM or SIGINT stops
    it gracefully. docs/protocol.md describes the socket protocol,
    docs/operations.md the HTTP listener, metrics, logs and alerts.

    \b
    Example:
        walbatch serve --data-dir /var/lib/walbatch --sink "sqlite:///events.db?table=events"
        walbatch serve --http 127.0.0.1:9464 --log-format json
    """
    from . import logfmt
    from .httpd import HttpOptions, parse_address
    from .server import Server, ServerOptions
    from .sinks.urls import redacted

    logfmt.setup(log_level, log_format)
    if otel:
        try:
            from .tracing import require

            require()
        except ImportError as ex:
            raise click.ClickException(str(ex)) from None
    http_opts = None
    if http:
        try:
            parse_address(http)
        except ValueError as ex:
            raise click.BadParameter(str(ex), param_hint="--http") from None
        if http_low_water > http_high_water:
            raise click.UsageError(f"--http-low-water ({http_low_water}) may not exceed "
                                   f"--http-high-water ({http_high_water})")
        try:
            from . import httpd, metrics

            httpd.require()
            metrics.require()
        except ImportError as ex:
            raise click.ClickException(str(ex)) from None
        http_opts = HttpOptions(http, max_body=http_max_body,
                           token=_read_token(http_token_file) if http_token_file else None,
                           high_water=http_high_water, low_water=http_low_water,
                           retry_after=http_retry_after, ready_sink_grace=ready_sink_grace,
                           idle_timeout=http_idle_timeout, read_timeout=http_read_timeout,
                           traced=otel)
    try:
        mode = int(socket_mode, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:  # no sign, no setuid/sticky bits
        raise click.BadParameter(f"{socket_mode!r} is not an octal mode from 0000 to 0777",
                                 param_hint="--socket-mode")
    opts = _options_from(kwargs)
    os.makedirs(data_dir, mode=0o755, exist_ok=True)  # (mode: not group-writable, whatever the umask)
    socket_path = socket_path or os.path.join(data_dir, "walbatch.sock")
    opts["strict_modes"] = strict_modes
    if strict_modes and not os.environ.get("LISTEN_FDS"):  # systemd's socket: its own business
        from .datadir import check_private

        try:
            check_private(os.path.dirname(os.path.abspath(socket_path)), "socket directory")
        except WalbatchError as ex:
            raise _fail(ex) from None
    default_db = os.path.abspath(os.path.join(data_dir, "walbatch.db"))
    try:
        if not sink:  # the default sink keeps its database in the data directory too
            from .datadir import check_sqlite_files

            check_sqlite_files(default_db)
            sink = f"sqlite:///{default_db}"
        batcher = DurableBatcher(data_dir, sink, **opts)
    except (WalbatchError, ValueError, TypeError, ImportError, AttributeError, OSError) as ex:
        raise _fail(ex) from None
    server = Server(batcher, ServerOptions(
        socket_path=socket_path, socket_mode=mode, socket_group=socket_group,
        allow_uids=tuple(allow_uid), allow_gids=tuple(allow_gid), max_frame_bytes=max_frame_bytes,
        shutdown_timeout=shutdown_timeout, http=http_opts, otel=otel,
        sink_label=redacted(sink) if isinstance(sink, str) else repr(sink)))
    try:
        asyncio.run(server.serve())
    except (OSError, ValueError) as ex:
        # It never served: the error is the one line to print, not a close summary.
        logging.getLogger("walbatch").setLevel(logging.WARNING)
        batcher.close(shutdown_timeout)
        raise _fail(ex) from None


def _read_token(path: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace removed); a usage error if none."""
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except (OSError, UnicodeDecodeError) as ex:
        raise click.BadParameter(f"cannot read {path}: {ex}", param_hint="--http-token-file") from None
    if not token or any(c.isspace() for c in token):
        raise click.BadParameter(f"{path} must hold one token: no spaces, not empty",
                                 param_hint="--http-token-file")
    return token


# -------------------------------------------------------- operator commands

_DATA_DIR = click.option("--data-dir", default="walbatch-data", show_default=True,
                         envvar="WALBATCH_DATA_DIR", type=click.Path(file_okay=False),
                         help="The log directory.")


def _socket_option(required: bool = False):  # type: ignore[no-untyped-def]
    return click.option("--socket", "socket_path", default=None, envvar="WALBATCH_SOCKET",
                        help="The daemon's socket [default: DATA_DIR/walbatch.sock].")


def _dumps(v: Any) -> str:
    """One JSON line under walbatch's value mapping (docs/values.md): ``dump`` and ``dlq
    list`` print an item as a JSON sink stores it, and ``values.loads`` reads it back."""
    return values.dumps(v, "output")


def _no_daemon(ex: BaseException) -> bool:
    """True if ``ex`` says nobody listens on the socket (not: the daemon refused)."""
    from .client import DaemonUnavailable

    return isinstance(ex, DaemonUnavailable) and isinstance(
        ex.__cause__ or ex.__context__, (FileNotFoundError, ConnectionRefusedError))


def _require_log_dir(data_dir: str) -> None:
    """Refuse a directory that holds no log (a mistyped --data-dir must not become a new one)."""
    from .datadir import is_log_dir

    if not is_log_dir(data_dir):
        raise click.ClickException(f"{os.path.abspath(data_dir)} is not a walbatch log directory "
                                   "(no checkpoint and no segments)")


def _open_readonly(data_dir: str) -> Log:
    try:
        return Log.open(data_dir, readonly=True, on_corruption="report")
    except (FileNotFoundError, WalbatchError) as ex:
        raise _fail(ex) from None


@cli.command()
@click.argument("items", nargs=-1)
@_DATA_DIR
@_socket_option()
@click.option("--direct", is_flag=True,
              help="Write into DATA_DIR's log without a daemon (it must not be running); the "
                   "items are delivered by the next `walbatch serve` or `walbatch replay`.")
@click.option("--batch", "batch_size", default=1000, show_default=True, type=click.IntRange(1),
              help="Items per submit request.")
@click.option("--key", default=None,
              help="Batching key for every item (keyed batching: batches never mix keys).")
def submit(items: tuple[str, ...], data_dir: str, socket_path: str | None, direct: bool,
           batch_size: int, key: str | None) -> None:
    """Submit JSON items (arguments, or JSON lines on stdin) and print how many were acknowledged.

    A malformed line stops the command with its line number; the lines before it
    are acknowledged and stay acknowledged.

    \b
    Example:
        printf '{"user": 1}\\n{"user": 2}\\n' | walbatch submit
        walbatch submit '{"user": 3}' '"a string item"'
        walbatch submit --key tenant-7 < events.jsonl
    """
    if key is not None:
        try:
            check_key(key)
        except (TypeError, ValueError) as ex:
            raise click.BadParameter(str(ex), param_hint="--key") from None
    sources = enumerate(items, 1) if items else enumerate(sys.stdin, 1)
    label = "argument" if items else "line"
    acked = 0
    if direct:
        try:
            target: Any = DurableBatcher(data_dir, None)
        except WalbatchError as ex:
            raise _fail(ex) from None

        def send(batch: list[Any]) -> int:
            return len(target.submit_many(batch, key=key))
    else:
        from .client import Client

        target = Client(socket_path or os.path.join(data_dir, "walbatch.sock"), connect_timeout=2)

        def send(batch: list[Any]) -> int:
            return len(target.submit_many(batch, key=key))

    error: str | None = None
    try:
        batch: list[Any] = []
        for n, text in sources:
            if not text.strip():
                continue
            try:  # strict: NaN, 1e999 or a repeated name would change the item, not refuse it
                item = values.parse_json(text, f"{label} {n}")
            except ValueError as ex:
                error = str(ex)
                break
            try:  # valid JSON msgpack cannot take: an int beyond 64 bits, a lone surrogate
                msgpack.packb(item)
            except (TypeError, OverflowError, ValueError) as ex:
                error = f"{label} {n}: cannot be submitted ({ex})"
                break
            batch.append(item)
            if len(batch) >= batch_size:
                acked += send(batch)
                batch = []
        if batch:
            acked += send(batch)
    except (WalbatchError, OSError) as ex:
        error = str(ex)
        if not direct and acked == 0 and _no_daemon(ex):
            raise click.ClickException(
                f"{ex}; start it with `walbatch serve --data-dir {data_dir}`, or write into "
                "the log without a daemon with `walbatch submit --direct`; nothing was "
                "submitted") from None
    finally:
        target.close()
    click.echo(f"acknowledged {acked} item(s)")
    if error:
        raise click.ClickException(error + f"; the {acked} item(s) before it are acknowledged")


@cli.command()
@_DATA_DIR
@_socket_option()
@click.option("--live", is_flag=True, help="Ask the running daemon (its socket) instead of "
              "reading the directory.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (its shape: docs/cli.md), nothing else.")
def status(data_dir: str, socket_path: str | None, live: bool, as_json: bool) -> None:
    """Show a log's segments, seq range, checkpoint, backlog, dead letters and damage.

    Reads the directory without locking it, so it works beside a running
    daemon; --live asks the daemon for its counters (and last sink error).

    \b
    Example:
        walbatch status --data-dir /var/lib/walbatch --json
    """
    if live or socket_path:
        from .client import Client

        with Client(socket_path or os.path.join(data_dir, "walbatch.sock"), connect_timeout=2) as c:
            try:
                info = c.stats()
            except WalbatchError as ex:
                raise _fail(ex) from None
        _print_mapping(info, as_json)
        return
    from . import admin

    try:
        report = admin.status(data_dir)
    except (FileNotFoundError, WalbatchError) as ex:
        raise _fail(ex) from None
    info = report.to_dict()
    if not as_json:
        del info["findings"]  # the text form shows them as "damage" lines
        info["dead_letters"] = (info["dead_letters"] if info["dead_letters"] is not None
                                else f"unknown ({info['dead_letters_error']})")
        del info["dead_letters_error"]
    _print_mapping(info, as_json)


def _print_mapping(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(_dumps(info))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, list):
            value = "none" if not value else "\n".join(
                [str(value[0])] + [" " * (width + 2) + str(v) for v in value[1:]])
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        click.echo(f"{key.ljust(width)}  {value}")


@cli.command()
@_DATA_DIR
@click.option("--sink", default=None, envvar="WALBATCH_SINK",
              help="Where to deliver: sqlite:///PATH, file:///PATH, postgresql://..., "
                   "nats://..., http(s)://... or module:function (docs/sinks.md). "
                   "Required unless --dry-run.")
@click.option("--dry-run", is_flag=True, help="Only read, decode and count what would be delivered.")
@click.option("--timeout", default=None, type=click.FloatRange(min=0),
              help="Give up after this many seconds (what is left stays in the log).")
@click.option("--follow", is_flag=True,
              help="Keep running as a standalone flusher: deliver what a separate writer process "
                   "(DurableBatcher(dir, None) or `submit --direct`) appends, until SIGTERM/SIGINT.")
@batcher_options
def replay(data_dir: str, sink: str | None, dry_run: bool, timeout: float | None, follow: bool,
           **kwargs: Any) -> None:
    """Deliver everything after the checkpoint to a sink, without the daemon.

    The recovery command: it opens the log (the daemon must be stopped), delivers
    the backlog with a progress bar, advances the checkpoint and exits. --dry-run
    counts and checks the backlog without delivering or changing anything.
    --follow keeps delivering what a separate writer process appends.

    Batches hold up to 5,000 items unless --max-items is given (a backlog is there
    all at once). Exits 4 when it dead-lettered items (they are in `walbatch dlq
    list`), 3 when the log is damaged.

    \b
    Example:
        walbatch replay --data-dir /var/lib/walbatch --sink "sqlite:///events.db?table=events"
        walbatch replay --data-dir /var/lib/walbatch --sink file:///var/log/events.jsonl --follow
    """
    if sink is None and not dry_run:
        raise click.UsageError("Missing option '--sink' (or WALBATCH_SINK): where to deliver; "
                               "--dry-run only reads")
    if follow:
        assert sink is not None
        _follow(data_dir, sink, _options_from(kwargs))
        return
    _require_log_dir(data_dir)
    from . import replay as replaying

    if dry_run:
        try:
            found = replaying.scan(data_dir)
        except (FileNotFoundError, WalbatchError) as ex:
            raise _fail(ex) from None
        click.echo(f"would deliver {found.would_deliver} item(s) after checkpoint {found.checkpoint}"
                   + (f"; {found.damaged} seq(s) damaged" if found.damaged else ""))
        for f in found.corruption:
            click.echo(f.describe(), err=True)
        if found.corruption:
            sys.exit(3)
        return
    bar: Any = None
    shown = 0

    def progress(done: int, total: int, rate: float) -> None:
        nonlocal bar, shown
        if not total or not sys.stderr.isatty():
            return
        if bar is None:
            bar = click.progressbar(length=total, label="replaying", show_eta=True, show_pos=True,
                                    file=sys.stderr,
                                    item_show_func=lambda r: f"{r:,.0f} items/s" if r else None)
            bar.__enter__()
        bar.update(done - shown, rate or None)
        shown = done

    try:
        try:
            result = replaying.replay(data_dir, sink, timeout=timeout, progress=progress,
                                      **{**REPLAY_DEFAULTS, **_options_from(kwargs)})
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
    except (WalbatchError, ValueError, TypeError, ImportError, AttributeError, OSError) as ex:
        raise _fail(ex) from None
    click.echo(f"delivered {result.delivered} item(s), dead-lettered {result.dead_lettered}, "
               f"{result.left} left, in {result.elapsed:.2f}s; checkpoint {result.checkpoint}")
    if result.error is not None:
        raise _fail(result.error)
    if result.dead_lettered:
        click.echo(f"{result.dead_lettered} item(s) were dead-lettered: see `walbatch dlq list "
                   f"--data-dir {data_dir}`", err=True)
        sys.exit(EXIT_DEAD_LETTERED)


def _follow(data_dir: str, sink: str, opts: dict[str, Any]) -> None:
    from .follow import Follower

    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    try:
        follower = Follower(data_dir, sink, **opts)
    except (WalbatchError, ValueError, TypeError, ImportError, OSError) as ex:
        raise _fail(ex) from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    follower.start()
    click.echo(f"following {follower.log.directory} (log {follower.log.log_id}); "
               "SIGTERM or Ctrl-C stops", err=True)
    last = None
    while not stop.wait(5.0):
        s = follower.stats()
        now = (s.delivered, s.dead_lettered, s.pending)
        if now != last:
            click.echo(f"delivered={s.delivered} dead_lettered={s.dead_lettered} "
                       f"pending={s.pending} checkpoint={s.last_checkpoint}", err=True)
            last = now
    follower.close(follower.options.close_timeout)
    s = follower.stats()
    click.echo(f"stopped: delivered={s.delivered} dead_lettered={s.dead_lettered} "
               f"pending={s.pending} checkpoint={s.last_checkpoint}")


@cli.command()
@_DATA_DIR
@click.option("--repair", is_flag=True,
              help="Trim torn tails and move damaged ranges aside (the daemon must be stopped); "
                   "lists exactly which seqs were lost and records them as dead letters.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (its shape: docs/cli.md), nothing else.")
def verify(data_dir: str, repair: bool, as_json: bool) -> None:
    """Check every record's checksum; report damage by file and offset.

    Exit code 0 when the log is intact (a torn tail is not damage: the next
    open trims it), 3 when it is damaged: a damaged range, missing records, or a
    segment file out of place (another log's, a duplicate, one under the wrong
    name). With --repair, damaged ranges are copied to DATA_DIR/quarantine/,
    misplaced segments moved there (or back under their right name), and the
    log goes on; the seqs it gave up are listed and recorded as dead letters.

    \b
    Example:
        walbatch verify --data-dir /var/lib/walbatch && echo intact
    """
    from . import admin

    try:
        report = admin.verify(data_dir, repair=repair)
    except (FileNotFoundError, WalbatchError) as ex:
        raise _fail(ex) from None
    if as_json:
        click.echo(_dumps(report.to_dict()))
        sys.exit(report.exit_code)
    for f in report.findings:
        click.echo(f.describe())
    if report.error:
        click.echo(report.error, err=True)
    lost = list(report.lost_seqs())
    if repair:
        click.echo(f"repaired: {len(report.findings)} finding(s); lost seqs: "
                   f"{format_seqs(lost) if lost else 'none'}")
    elif not report.intact:
        damaged = sum(f.action == "corrupt" for f in report.findings) or 1
        click.echo(f"DAMAGED: {damaged} damaged range(s)"
                   + (f", seqs {format_seqs(lost)} unreadable" if lost else "")
                   + "; run `walbatch verify --repair`", err=True)
    else:
        click.echo(f"intact: seqs {report.first_seq}..{report.last_seq}, "
                   f"checkpoint {report.checkpoint}"
                   + (f" ({report.harmless} damaged range(s) in delivered records, harmless)"
                      if report.harmless else ""))
    sys.exit(report.exit_code)


@cli.command()
@_DATA_DIR
@click.option("--from", "from_seq", type=click.IntRange(1), default=None, help="First seq.")
@click.option("--to", "to_seq", type=click.IntRange(1), default=None, help="Last seq.")
@click.option("--pending", is_flag=True, help="Only records after the checkpoint.")
def dump(data_dir: str, from_seq: int | None, to_seq: int | None, pending: bool) -> None:
    """Print records as JSON lines {"seq": ..., "item": ...} for debugging.

    Keyed items carry "key". Bytes values appear as {"$base64": ...}; seqs lost to quarantined damage
    as {"seq": N, "lost": true}.

    \b
    Example:
        walbatch dump --data-dir /var/lib/walbatch --from 1000 --to 1010
    """
    from . import admin

    if from_seq is not None and to_seq is not None and from_seq > to_seq:
        raise click.BadParameter(f"--from {from_seq} is after --to {to_seq}", param_hint="--from")
    try:
        records = admin.dump(data_dir, from_seq, to_seq, pending)
    except (FileNotFoundError, WalbatchError) as ex:
        raise _fail(ex) from None
    try:
        for record in records:
            click.echo(_dumps(record.to_dict()))
    except WalbatchError as ex:
        raise _fail(ex) from None
    finally:
        records.close()
    if not records.intact:  # damaged, not yet repaired: the "lost" lines above are unreadable
        for f in records.findings:
            if f.action == "corrupt":
                click.echo(f.describe(), err=True)
        click.echo("DAMAGED: run `walbatch verify --repair`", err=True)
        sys.exit(3)


@cli.group()
def dlq() -> None:
    """List, requeue or purge dead letters (items a sink refused for good).

    \b
    Example:
        walbatch dlq list --data-dir /var/lib/walbatch
    """


@dlq.command("list")
@_DATA_DIR
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              callback=lambda _c, p, v: _at_most_64_bits(v, p),
              help="At most this many, oldest first.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per dead letter.")
def dlq_list(data_dir: str, limit: int | None, as_json: bool) -> None:
    """List dead letters with their error.

    \b
    Example:
        walbatch dlq list --data-dir /var/lib/walbatch --json
    """
    from .dlq import list_dead_letters

    if not os.path.isdir(data_dir):
        raise click.ClickException(f"{data_dir} does not exist")
    letters = list_dead_letters(data_dir, limit)
    if not letters and not as_json:
        click.echo(f"no dead letters in {data_dir}", err=True)
        return
    if not as_json:
        click.echo("seq\tfailed_at\terror\titem")
    for d in letters:
        if as_json:
            click.echo(_dumps(dataclasses.asdict(d)))
        else:
            item = "(lost)" if d.lost else _dumps(d.item)
            click.echo(f"{d.seq}\t{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(d.failed_at))}"
                       f"\t{d.error}\t{item[:200]}")


@dlq.command("requeue")
@_DATA_DIR
@_socket_option()
@click.option("--seq", "seqs", type=int, multiple=True, help="Only this seq; repeatable.")
def dlq_requeue(data_dir: str, socket_path: str | None, seqs: tuple[int, ...]) -> None:
    """Submit dead letters again (new seqs), then remove them from the store.

    Goes through the running daemon when its socket answers; otherwise writes
    into the log directly (delivered by the next serve or replay).

    \b
    Example:
        walbatch dlq requeue --data-dir /var/lib/walbatch --seq 42
    """
    from .requeue import requeue

    _require_log_dir(data_dir)
    _require_dead_letters(data_dir, seqs, lost_ok=False)
    try:
        n = requeue(data_dir, list(seqs) or None, socket_path=socket_path)
    except WalbatchError as ex:
        raise _fail(ex) from None
    click.echo(f"requeued {n} dead letter(s)")


def _at_most_64_bits(value: int | None, param: click.Parameter) -> int | None:
    if value is not None and value >= 1 << 63:  # SQLite's LIMIT is a signed 64-bit integer
        raise click.BadParameter(f"{value} is too large", param=param)
    return value


def _require_dead_letters(data_dir: str, seqs: tuple[int, ...], lost_ok: bool) -> None:
    """Refuse the whole command when a --seq names no dead letter (a typo must not pass)."""
    if not seqs:
        return
    from .dlq import list_dead_letters

    held = {d.seq for d in list_dead_letters(data_dir) if lost_ok or not d.lost}
    missing = sorted(set(seqs) - held)
    if missing:
        raise click.ClickException(
            f"no {'' if lost_ok else 'requeueable '}dead letter with seq "
            f"{', '.join(map(str, missing))} (see walbatch dlq list); nothing was changed")


@dlq.command("purge")
@_DATA_DIR
@click.option("--seq", "seqs", type=int, multiple=True, help="Only this seq; repeatable.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def dlq_purge(data_dir: str, seqs: tuple[int, ...], yes: bool) -> None:
    """Delete dead letters for good.

    \b
    Example:
        walbatch dlq purge --data-dir /var/lib/walbatch --seq 42 --yes
    """
    from .dlq import DeadLetterStore

    _require_log_dir(data_dir)
    _require_dead_letters(data_dir, seqs, lost_ok=True)
    what = f"{len(seqs)} dead letter(s)" if seqs else "ALL dead letters"
    if not yes:
        click.confirm(f"Delete {what} in {data_dir}?", abort=True)
    store = DeadLetterStore.for_dir(data_dir)
    try:
        n = store.purge(list(seqs) or None)
    finally:
        store.close()
    click.echo(f"purged {n} dead letter(s)")


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
    from . import demo as demos

    if child:
        demos.child(directory, items, threads)
        return
    try:
        ok = demos.run(directory, items, threads, say=click.echo)
    except demos.NotADemoDirectory as ex:
        raise click.ClickException(str(ex)) from None
    if not ok:
        raise click.ClickException("the demo found lost or duplicated items: please report this")


def _show_envvars(group: click.Group) -> None:
    # --help names the WALBATCH_* variable next to every option that reads one.
    for cmd in group.commands.values():
        if isinstance(cmd, click.Group):
            _show_envvars(cmd)
        for p in cmd.params:
            if isinstance(p, click.Option) and p.envvar:
                p.show_envvar = True


_show_envvars(cli)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except WalbatchError as ex:  # pragma: no cover - click handles most paths
        click.echo(f"walbatch: {ex}", err=True)
        sys.exit(1)
    except OSError as ex:  # the environment (permissions, a full disk), not a bug: one line
        click.echo(f"Error: {ex}", err=True)
        sys.exit(1)

