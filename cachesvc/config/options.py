"""Configuration: flags, ``CACHESVC_*`` environment variables and an optional
TOML file, merged into one immutable :class:`Config`.

:class:`Config` declares every setting once, with its type and default;
:data:`OPTIONS` adds how each one is written (parser, metavar) and its help.
argparse, the environment and the TOML file are all driven by that table, so
a new setting is a new field plus a new row, and nothing else.

Precedence: flag > environment (``CACHESVC_<FLAG_IN_CAPS>``) > TOML file
(``--config PATH`` or ``CACHESVC_CONFIG``) > default.

Value syntax (sizes, durations, addresses, origins) is that of the parsers
in :mod:`cachesvc.config.values`. Per source:

- durations: at most a year.
- booleans: ``--read-only`` / ``--no-read-only`` on the command line,
  ``1/true/yes`` and ``0/false/no`` (case-insensitive) in the environment,
  ``true`` / ``false`` in TOML.
- An empty environment variable counts as unset (docker-compose substitutes
  an empty string for a missing ``${VAR:-}``).
- TOML keys are flag names without the dashes, with ``-`` or ``_``
  (``cache-size`` or ``cache_size``); sizes and durations may be numbers
  (bytes, seconds) or strings; an unknown key is an error.

Defaults that are computed: ``--cache-size`` is min(1 GiB, a quarter of the
memory limit, see :mod:`cachesvc.config.hostlimits`); ``--max-dirty`` is half
of the cache size; ``--readahead``, when not given at all, is 16 MiB, at most
an eighth of the cache size, at least 64 KiB (given as 0 it turns readahead
off: fills cover only the request's own pages); ``--max-pinned`` is half of
the cache size (given as 0, pins are refused).

Cross-field rules: an admin listener on a non-loopback address needs
``--admin-token``; ``--max-dirty``, ``--readahead`` and ``--max-pinned`` may
not exceed ``--cache-size``; the two listeners need different addresses. (A
data listener on a non-loopback address without ``--write-token`` is
allowed: writes are then refused at request time, see api/writes.py.)
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from cachesvc.config.hostlimits import (
    MIN_CACHE_SIZE,
    default_cache_size,
    detect_memory_limit,
    detected_cache_size,
)
from cachesvc.config.values import (
    HostPort,
    KiB,
    MiB,
    choice_parser,
    format_duration,
    format_size,
    parse_address,
    parse_bool,
    parse_duration,
    parse_http_url,
    parse_int,
    parse_origin,
    parse_size,
    parse_text,
    parse_token,
)
from cachesvc.core.eviction import DEFAULT_POLICY, POLICIES
from cachesvc.core.fillplan import MIN_READAHEAD
from cachesvc.core.memfile import PAGE_SIZE

WriteMode = Literal["writeback", "writethrough"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]

ENV_PREFIX = "CACHESVC_"
CONFIG_ENV = "CACHESVC_CONFIG"

# Minimums for sizes: below these the cache cannot do useful work.
# (--cache-size's is MIN_CACHE_SIZE, in hostlimits; --readahead's,
# MIN_READAHEAD, is the core's smallest fill window.)
MIN_MAX_DIRTY = 64 * KiB
# The default largest readahead window. A streamed read keeps up to three
# windows ahead of the reader; against a 2 ms origin (benchmarks/origin_bench.py,
# 2026-11-22, 2 x 7 rounds) a cold 64 MiB read took a median 0.166-0.175 s
# with 16 MiB windows and 0.191-0.222 s with 4 MiB.
DEFAULT_READAHEAD = 16 * MiB
MAX_SIZE = 2**63 - 1
MAX_DURATION = 365 * 24 * 3600.0

_DEFAULT_LISTEN = HostPort("127.0.0.1", 8080)
_DEFAULT_ADMIN_LISTEN = HostPort("127.0.0.1", 9090)


class ConfigError(Exception):
    """A configuration value is invalid; names the flag it belongs to."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag
        self.message = message


# ---------------------------------------------------------------------------
# Defaults computed from other settings


def default_readahead(cache_size: int) -> int:
    """DEFAULT_READAHEAD, at most an eighth of ``cache_size`` (page-aligned),
    at least MIN_READAHEAD."""
    eighth = cache_size // 8 // PAGE_SIZE * PAGE_SIZE
    return max(MIN_READAHEAD, min(DEFAULT_READAHEAD, eighth))


# ---------------------------------------------------------------------------
# The configuration


@dataclass(frozen=True, slots=True)
class Config:
    """The server's whole configuration; every field is one flag. Immutable.

    Constructing one checks the cross-field rules (raises ConfigError);
    per-value syntax and bounds are checked by :func:`load_config`.
    """

    origin: str = "./data"
    s3_endpoint: str | None = None
    s3_region: str | None = None  # None: the client's default (us-east-1)
    http_origin_writes: bool = False
    listen: HostPort = _DEFAULT_LISTEN
    admin_listen: HostPort = _DEFAULT_ADMIN_LISTEN
    cache_size: int = field(default_factory=detected_cache_size)  # bytes
    memory_file: str | None = None  # None: an anonymous memfd
    write_mode: WriteMode = "writeback"
    dirty_expire: float = 30.0  # seconds
    max_dirty: int = 0  # bytes; 0 (the default) becomes cache_size // 2
    # bytes, page-aligned; 0: no readahead, fills cover only the request's own
    # pages; None (not given) becomes default_readahead(cache_size).
    readahead: int | None = None
    eviction_policy: str = DEFAULT_POLICY
    # bytes operator pins may hold; 0: no pins; None (not given) becomes
    # half of cache_size.
    max_pinned: int | None = None
    max_ranges: int = 64
    max_partial_write: int = 64 * MiB  # bytes
    revalidate: float = 60.0  # seconds
    shutdown_grace: float = 30.0  # seconds
    read_only: bool = False
    write_token: str | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)
    allow_anonymous_writes: bool = False
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"

    def __post_init__(self) -> None:
        if self.max_dirty == 0:
            object.__setattr__(self, "max_dirty", max(MIN_MAX_DIRTY, self.cache_size // 2))
        readahead = default_readahead(self.cache_size) if self.readahead is None else self.readahead
        object.__setattr__(self, "readahead", readahead)
        max_pinned = self.cache_size // 2 if self.max_pinned is None else self.max_pinned
        object.__setattr__(self, "max_pinned", max_pinned)
        size = format_size(self.cache_size)
        if self.max_dirty > self.cache_size:
            raise ConfigError("--max-dirty", f"must not exceed --cache-size ({size})")
        if readahead > self.cache_size:
            raise ConfigError("--readahead", f"must not exceed --cache-size ({size})")
        if max_pinned > self.cache_size:
            raise ConfigError("--max-pinned", f"must not exceed --cache-size ({size})")
        if not self.admin_listen.is_loopback and not self.admin_token:
            raise ConfigError(
                "--admin-listen",
                f"non-loopback address {self.admin_listen} requires --admin-token",
            )
        if self.admin_listen == self.listen and self.listen.port != 0:
            raise ConfigError("--admin-listen", f"same address as --listen ({self.listen})")


# ---------------------------------------------------------------------------
# The option table


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: how it is written and checked. Its type and default live
    on the Config field of the same name. Immutable."""

    name: str  # Config field name
    parse: Callable[[str], Any]
    help: str
    group: str
    metavar: str | None = None  # None for booleans
    show: Callable[[Any], str] = str  # renders the default for --help
    default_text: Callable[[], str] | None = None  # replaces show(default) in --help
    minimum: float | None = None
    zero: str | None = None  # what 0 means, when 0 is allowed below the minimum
    maximum: float | None = None
    align: int = 1  # values are rounded up to a multiple of this
    numeric: bool = False  # TOML may give an int or float instead of a string

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def boolean(self) -> bool:
        return self.parse is parse_bool

    @property
    def default(self) -> Any:
        """The Config field's default (computed now for a default_factory)."""
        spec = _CONFIG_FIELDS[self.name]
        if spec.default_factory is not dataclasses.MISSING:
            return spec.default_factory()
        return spec.default

    def default_help(self) -> str:
        if self.default_text is not None:
            return self.default_text()
        default = self.default
        return "unset" if default is None else self.show(default)

    def check(self, value: Any) -> Any:
        """Bounds and alignment of a parsed value; ValueError on failure."""
        if self.align > 1:
            value = -(-value // self.align) * self.align
        if value == 0 and self.zero is not None:
            return value
        if self.minimum is not None and value < self.minimum:
            least = f"at least {self.show(self.minimum)}"
            if self.zero is not None:
                least = f"0 ({self.zero}) or {least}"
            raise ValueError(f"must be {least}, got {self.show(value)}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"must be at most {self.show(self.maximum)}, got {self.show(value)}")
        return value


_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _show_bool(value: bool) -> str:
    return "true" if value else "false"


def _show_size(value: float) -> str:
    return format_size(int(value))


def _size(name: str, help: str, group: str, minimum: int, **kw: Any) -> Option:
    return Option(
        name, parse_size, help, group, "SIZE", _show_size, minimum=minimum, maximum=MAX_SIZE,
        numeric=True, **kw,
    )  # fmt: skip


def _duration(name: str, help: str, group: str, minimum: float = 0.0) -> Option:
    return Option(
        name, parse_duration, help, group, "DURATION", format_duration,
        minimum=minimum, maximum=MAX_DURATION, numeric=True,
    )  # fmt: skip


def _bool(name: str, help: str, group: str) -> Option:
    return Option(name, parse_bool, help, group, show=_show_bool)


OPTIONS: tuple[Option, ...] = (
    Option(
        "origin", parse_origin,
        "where files live: a directory (created if missing), file://PATH, http(s)://HOST/PATH"
        " or s3://BUCKET/PREFIX",
        "origin", "URL",
    ),
    Option(
        "s3_endpoint", parse_http_url,
        "S3 endpoint URL for MinIO, Ceph RGW ...; credentials come from the standard AWS"
        " variables",
        "origin", "URL",
    ),
    Option(
        "s3_region", parse_text, "S3 region", "origin", "REGION",
        default_text=lambda: "unset, i.e. us-east-1",
    ),
    _bool(
        "http_origin_writes",
        "the http(s):// origin accepts partial PUT (e.g. another cachesvc)", "origin",
    ),
    Option("listen", parse_address, "data listener address", "listeners", "ADDR"),
    Option(
        "admin_listen", parse_address,
        "admin listener address (non-loopback requires --admin-token)", "listeners", "ADDR",
    ),
    _size(
        "cache_size", "page cache budget", "cache", MIN_CACHE_SIZE,
        default_text=lambda: "min(1GiB, a quarter of the memory limit)"
        f" = {format_size(detected_cache_size())} here",
    ),
    Option(
        "memory_file", parse_text,
        "back the cache with this file (e.g. on tmpfs) instead of an anonymous memfd",
        "cache", "PATH",
    ),
    _size(
        "readahead",
        "largest readahead window (rounded up to 4KiB; 0: none, fills cover only the"
        " request's own pages)",
        "cache", MIN_READAHEAD, align=PAGE_SIZE, zero="no readahead",
        default_text=lambda: "16MiB, at most an eighth of --cache-size",
    ),
    Option(
        "eviction_policy", choice_parser(*POLICIES),
        "which cached extents go first when the budget is short: s3fifo (scan-resistant)"
        " or lru",
        "cache", "{" + ",".join(POLICIES) + "}",
    ),
    _size(
        "max_pinned",
        "most bytes operator pins may hold (a pin beyond it is refused with 507; 0: no pins)",
        "cache", PAGE_SIZE, align=PAGE_SIZE, zero="no pins",
        default_text=lambda: "half of --cache-size",
    ),
    _duration(
        "revalidate", "how long cached data is trusted before the origin is asked again",
        "cache",
    ),
    Option(
        "write_mode", choice_parser("writeback", "writethrough"),
        "writeback: dirty data is written to the origin later; writethrough: before the"
        " write returns",
        "write-back", "{writeback,writethrough}",
    ),
    _duration(
        "dirty_expire", "write back dirty data older than this", "write-back",
        minimum=0.001,
    ),
    _size(
        "max_dirty", "write back when dirty data exceeds this", "write-back", MIN_MAX_DIRTY,
        default_text=lambda: "half of --cache-size",
    ),
    _duration(
        "shutdown_grace", "how long in-flight requests may run after SIGTERM", "write-back",
    ),
    Option(
        "max_ranges", parse_int, "most ranges in one request after coalescing",
        "requests", "N", minimum=1, maximum=MAX_SIZE, numeric=True,
    ),
    _size("max_partial_write", "largest partial write body", "requests", 1),
    _bool("read_only", "refuse all writes", "security"),
    Option(
        "write_token", parse_token,
        "bearer token required for writes (prefer the environment variable)",
        "security", "TOKEN",
    ),
    Option(
        "admin_token", parse_token,
        "bearer token required for admin actions (prefer the environment variable)",
        "security", "TOKEN",
    ),
    _bool(
        "allow_anonymous_writes",
        "allow writes without a token on a non-loopback data listener", "security",
    ),
    Option(
        "log_level", choice_parser("debug", "info", "warning", "error"),
        "log level", "logging", "{debug,info,warning,error}",
    ),
    Option(
        "log_format", choice_parser("text", "json"), "text lines or JSON lines",
        "logging", "{text,json}",
    ),
)  # fmt: skip

OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--config`` and one flag per option (default None: "not given")."""
    parser.add_argument(
        "--config", metavar="PATH", default=None,
        help=f"TOML file with more settings (env {CONFIG_ENV})",
    )  # fmt: skip
    names = dict.fromkeys(option.group for option in OPTIONS)  # in table order
    groups = {name: parser.add_argument_group(f"{name} options") for name in names}
    for option in OPTIONS:
        text = f"{option.help} (default: {option.default_help()}; env {option.env})"
        if option.boolean:
            groups[option.group].add_argument(
                option.flag, dest=option.name, action=argparse.BooleanOptionalAction,
                default=None, help=text,
            )  # fmt: skip
        else:
            groups[option.group].add_argument(
                option.flag, dest=option.name, metavar=option.metavar, default=None, help=text
            )


# ---------------------------------------------------------------------------
# Loading


Source = Literal["flag", "env", "file"]


def _convert(option: Option, raw: object, source: Source, where: str = "") -> Any:
    """A raw value -> checked typed value. Flags and environment variables
    give text (flags give booleans as bool); TOML gives its own types."""
    try:
        if option.boolean:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and source == "env":
                return parse_bool(raw)
            raise ValueError(f"invalid boolean {raw!r} (use true or false)")
        if isinstance(raw, int | float) and not isinstance(raw, bool) and option.numeric:
            if isinstance(raw, float) and not math.isfinite(raw):
                raise ValueError(f"invalid number {raw!r}")
            # Decimal notation, so that 1e3 reaches the parser as 1000.
            raw = str(raw) if isinstance(raw, int) else format(Decimal(repr(raw)), "f")
        if not isinstance(raw, str):
            raise ValueError(f"invalid value {raw!r} (expected a string)")
        return option.check(option.parse(raw))
    except ValueError as exc:
        suffix = f" (from {where})" if where else ""
        raise ConfigError(option.flag, f"{exc}{suffix}") from None


def read_config_file(path: str) -> dict[str, object]:
    """The TOML file's settings keyed by Config field name."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"invalid TOML in {path}: {exc}") from None
    values: dict[str, object] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in OPTIONS_BY_NAME:
            known = [option.name.replace("_", "-") for option in OPTIONS]
            close = difflib.get_close_matches(key.replace("_", "-"), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError("--config", f"unknown key {key!r} in {path}{hint}")
        if name in values:
            raise ConfigError("--config", f"key {key!r} given twice in {path}")
        values[name] = value
    return values


def load_config(
    flags: argparse.Namespace | Mapping[str, object],
    environ: Mapping[str, str],
    *,
    memory_limit: Callable[[], int | None] = detect_memory_limit,
) -> Config:
    """Merges flags > environment > TOML file > defaults into a Config.

    ``flags`` maps Config field names (and ``config``) to the parsed
    command-line values, None or absent when not given: the Namespace from a
    parser set up by :func:`add_arguments`, or a plain dict in tests.
    ``memory_limit`` is only called when ``--cache-size`` is not set.
    Raises ConfigError naming the flag of the first bad value.
    """
    given = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags)
    config_path = str(given.get("config") or environ.get(CONFIG_ENV) or "")
    from_file = read_config_file(config_path) if config_path else {}
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw = given.get(option.name)
        env_value = environ.get(option.env, "")
        if raw is not None:
            values[option.name] = _convert(option, raw, "flag")
        elif env_value != "":
            values[option.name] = _convert(option, env_value, "env", option.env)
        elif option.name in from_file:
            values[option.name] = _convert(option, from_file[option.name], "file", config_path)
    if "cache_size" not in values:
        values["cache_size"] = default_cache_size(memory_limit())
    return Config(**values)
