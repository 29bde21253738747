"""Setting values as text: parsers (text -> typed value, ValueError(problem)
on bad input) and the formatters that spell values back for ``--help``.

Syntax:

- sizes: plain bytes or IEC units, ``4096``, ``512KiB``, ``64MiB``,
  ``2GiB``, ``1TiB`` (unit letters case-insensitive, ``B`` allowed, a
  fraction such as ``1.5GiB`` is rounded down to whole bytes). Decimal units
  (``MB``) and bare letters (``M``) are refused on purpose: tools disagree on
  whether ``1MB`` is 10**6 or 2**20 bytes.
- durations: seconds (``30``, ``0.5``) or ``500ms``, ``30s``, ``5m``, ``1h``.
- booleans: ``1/true/yes`` and ``0/false/no`` (case-insensitive).
- addresses: ``host:port`` or ``[ipv6]:port``. The host is required (no bare
  ``:8080``): listening on every interface must be spelled ``0.0.0.0:8080``.
  Port 0 asks the kernel for a free port (used by tests).
- origins: a local path, ``file://`` path, ``http(s)://host/...`` or
  ``s3://bucket/prefix``.

Bounds (minimums, maximums, alignment) are not checked here: they belong to
each setting, in :data:`cachesvc.config.options.OPTIONS`.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


@dataclass(frozen=True, slots=True)
class HostPort:
    """A listen address. ``host`` has no brackets, even for IPv6. Immutable."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


_SIZE_UNITS = {"": 1, "b": 1, "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB}
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)")
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)")
_HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def parse_size(text: str) -> int:
    """Bytes from ``4096``, ``512KiB``, ``1.5GiB`` ...; see the module docstring."""
    match = _SIZE_RE.fullmatch(text.strip())
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"invalid size {text!r} (use bytes or IEC units like 512MiB)")
    return int(Decimal(match.group(1)) * _SIZE_UNITS[unit])


def format_size(size: int) -> str:
    """The shortest exact spelling: ``1GiB``, ``512KiB``, ``1000``."""
    for unit, factor in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def parse_duration(text: str) -> float:
    """Seconds from ``30``, ``0.5``, ``500ms``, ``30s``, ``5m``, ``1h``."""
    match = _DURATION_RE.fullmatch(text.strip())
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _DURATION_UNITS:
        raise ValueError(f"invalid duration {text!r} (use seconds or a unit: 500ms, 30s, 5m, 1h)")
    return float(match.group(1)) * _DURATION_UNITS[unit]


def format_duration(seconds: float) -> str:
    """``30s``, ``500ms``, or ``0.0001s`` when neither is exact."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    if seconds * 1000 == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise ValueError(f"invalid boolean {text!r} (use 1/true/yes or 0/false/no)")


def parse_int(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text.strip()):
        raise ValueError(f"invalid number {text!r} (use a whole number)")
    return int(text)


def parse_address(text: str) -> HostPort:
    """``host:port`` or ``[ipv6]:port``; see the module docstring."""
    bracketed = re.fullmatch(r"\[([^\]]*)\]:([^:]*)", text)
    if bracketed:
        host, port_text = bracketed.groups()
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address {host!r} in {text!r}") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"invalid address {text!r} (use host:port, e.g. 127.0.0.1:8080)")
        if ":" in host:
            raise ValueError(f"invalid address {text!r} (put IPv6 in brackets: [::1]:8080)")
        if not host:
            raise ValueError(
                f"missing host in {text!r} (use 127.0.0.1:PORT, or 0.0.0.0:PORT for all interfaces)"
            )
        if not _HOSTNAME_RE.fullmatch(host) or len(host) > 253:
            raise ValueError(f"invalid host {host!r} in {text!r}")
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"invalid IPv4 address {host!r} in {text!r}") from None
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or int(port_text) > 65535:
        raise ValueError(f"invalid port {port_text!r} in {text!r} (use 0 to 65535)")
    return HostPort(host, int(port_text))


def parse_origin(text: str) -> str:
    """A local path, ``file://`` path, ``http(s)://host/...`` or ``s3://bucket/prefix``."""
    value = text.strip()
    if not value:
        raise ValueError("must not be empty")
    if "://" not in value:
        return value
    parts = urllib.parse.urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if not parts.path:
            raise ValueError(f"invalid origin {text!r} (file:// needs a path)")
    elif scheme in ("http", "https"):
        if not parts.hostname:
            raise ValueError(f"invalid origin {text!r} (no host)")
    elif scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"invalid origin {text!r} (use s3://bucket/prefix)")
    else:
        raise ValueError(
            f"unsupported origin {text!r} (use a path, file://, http://, https:// or s3://)"
        )
    return value


def parse_http_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid URL {text!r} (use http(s)://host[:port])")
    return text.strip()


def parse_text(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError("must not contain control characters")
    return text


def parse_token(text: str) -> str:
    # It travels in "Authorization: Bearer <token>": printable ASCII, no spaces.
    if not text:
        raise ValueError("must not be empty")
    if not all("!" <= c <= "~" for c in text):
        raise ValueError("must be printable ASCII without spaces")
    return text


def choice_parser(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"invalid value {text!r} (choose {' or '.join(choices)})")
        return value

    return parse
