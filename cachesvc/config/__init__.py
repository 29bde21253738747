"""The server's configuration, as the rest of cachesvc imports it.

- :mod:`cachesvc.config.options`: the option table, :class:`Config`, argparse
  wiring and loading (flag > ``CACHESVC_*`` environment > TOML file > default).
- :mod:`cachesvc.config.values`: value syntax, the parsers and formatters of
  sizes, durations, addresses, origins and tokens.
- :mod:`cachesvc.config.hostlimits`: the host's memory limit (cgroup v2/v1,
  /proc/meminfo) and the default cache size it implies.
"""

from __future__ import annotations

from cachesvc.config.hostlimits import default_cache_size, detect_memory_limit
from cachesvc.config.options import (
    CONFIG_ENV,
    OPTIONS,
    Config,
    ConfigError,
    add_arguments,
    load_config,
)
from cachesvc.config.values import HostPort

__all__ = [
    "CONFIG_ENV",
    "OPTIONS",
    "Config",
    "ConfigError",
    "HostPort",
    "add_arguments",
    "default_cache_size",
    "detect_memory_limit",
    "load_config",
]
