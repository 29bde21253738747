"""Tests of configuration loading (flags, environment, TOML), value parsers,
memory-limit detection, the CLI entry point in-process, and log formatting."""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from cachesvc import cli
from cachesvc.config import (
    CONFIG_ENV,
    OPTIONS,
    Config,
    ConfigError,
    add_arguments,
    default_cache_size,
    detect_memory_limit,
    load_config,
)
from cachesvc.config.values import (
    GiB,
    HostPort,
    KiB,
    MiB,
    format_duration,
    format_size,
    parse_address,
    parse_duration,
    parse_size,
)
from cachesvc.logs import setup_logging

# A memory limit under which the default cache size is 1 GiB.
BIG_LIMIT = 16 * GiB


def load(
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    limit: int | None = BIG_LIMIT,
) -> Config:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load_config(parser.parse_args(list(args)), env or {}, memory_limit=lambda: limit)


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cachesvc.toml"
    path.write_text(text)
    return str(path)


def toml_literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    return repr(value)


# For every option: (text for flag/env, value for TOML, expected Config value).
# Each expected value differs from the default.
SAMPLES: dict[str, tuple[str | None, object, object]] = {
    "origin": ("s3://bucket/prefix", "s3://bucket/prefix", "s3://bucket/prefix"),
    "s3_endpoint": ("http://127.0.0.1:9000", "http://127.0.0.1:9000", "http://127.0.0.1:9000"),
    "s3_region": ("eu-west-3", "eu-west-3", "eu-west-3"),
    "http_origin_writes": (None, True, True),
    "listen": ("127.0.0.1:18080", "127.0.0.1:18080", HostPort("127.0.0.1", 18080)),
    "admin_listen": ("[::1]:19090", "[::1]:19090", HostPort("::1", 19090)),
    "cache_size": ("3GiB", "3GiB", 3 * GiB),
    "memory_file": ("/dev/shm/cachesvc", "/dev/shm/cachesvc", "/dev/shm/cachesvc"),
    "readahead": ("1MiB", 1048576, 1 * MiB),
    "eviction_policy": ("lru", "lru", "lru"),
    "max_pinned": ("8MiB", "8MiB", 8 * MiB),
    "revalidate": ("5m", 300, 300.0),
    "write_mode": ("writethrough", "writethrough", "writethrough"),
    "dirty_expire": ("500ms", 0.5, 0.5),
    "max_dirty": ("100MiB", "100MiB", 100 * MiB),
    "shutdown_grace": ("1h", "1h", 3600.0),
    "max_ranges": ("7", 7, 7),
    "max_partial_write": ("512KiB", "512KiB", 512 * KiB),
    "read_only": (None, True, True),
    "write_token": ("w-token", "w-token", "w-token"),
    "admin_token": ("a-token", "a-token", "a-token"),
    "allow_anonymous_writes": (None, True, True),
    "log_level": ("debug", "debug", "debug"),
    "log_format": ("json", "json", "json"),
}


def test_every_option_is_a_config_field_and_has_a_sample() -> None:
    fields = set(Config.__dataclass_fields__)
    names = [option.name for option in OPTIONS]
    assert len(names) == len(set(names))
    assert set(names) == fields
    assert set(SAMPLES) == fields


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_sample_differs_from_default(option: Any) -> None:
    assert getattr(load(), option.name) != SAMPLES[option.name][2]


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_option_by_flag(option: Any) -> None:
    text, _, expected = SAMPLES[option.name]
    args = [option.flag] if text is None else [option.flag, text]
    assert getattr(load(args), option.name) == expected


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_option_by_environment(option: Any) -> None:
    text, _, expected = SAMPLES[option.name]
    config = load(env={option.env: "yes" if text is None else text})
    assert getattr(config, option.name) == expected


@pytest.mark.parametrize("spelling", ["-", "_"])
@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_option_by_toml_file(option: Any, spelling: str, tmp_path: Path) -> None:
    _, value, expected = SAMPLES[option.name]
    key = option.name.replace("_", spelling)
    path = write_toml(tmp_path, f"{key} = {toml_literal(value)}\n")
    assert getattr(load(["--config", path]), option.name) == expected
    assert getattr(load(env={CONFIG_ENV: path}), option.name) == expected


def test_defaults() -> None:
    config = load()
    assert config.origin == "./data"
    assert config.listen == HostPort("127.0.0.1", 8080)
    assert config.admin_listen == HostPort("127.0.0.1", 9090)
    assert config.cache_size == 1 * GiB
    assert config.max_dirty == 512 * MiB
    assert config.write_mode == "writeback"
    assert config.dirty_expire == 30.0
    assert config.readahead == 16 * MiB
    assert config.max_ranges == 64
    assert config.max_partial_write == 64 * MiB
    assert config.revalidate == 60.0
    assert config.shutdown_grace == 30.0
    assert config.s3_region is None
    assert config.write_token is None and config.admin_token is None
    assert not config.read_only
    assert (config.log_level, config.log_format) == ("info", "text")


def test_default_cache_size_follows_memory_limit() -> None:
    assert load(limit=2 * GiB).cache_size == 512 * MiB
    assert load(limit=2 * GiB).max_dirty == 256 * MiB
    assert load(limit=None).cache_size == 1 * GiB
    # An explicit size wins and the limit is not consulted.
    assert load(["--cache-size", "2GiB"], limit=1 * MiB).cache_size == 2 * GiB


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'cache_size = "3GiB"\nread_only = true\nmax_ranges = 3\n')
    env = {"CACHESVC_CACHE_SIZE": "2GiB", "CACHESVC_READ_ONLY": "0", CONFIG_ENV: path}
    flags = ["--cache-size", "1536MiB"]
    config = load(flags, env)
    assert config.cache_size == 1536 * MiB  # flag over env and file
    assert config.read_only is False  # env over file
    assert config.max_ranges == 3  # file over default
    assert config.max_partial_write == 64 * MiB  # default
    assert load(env={**env, "CACHESVC_READ_ONLY": ""}).read_only is True  # empty env: unset
    assert load(["--no-read-only"], {"CACHESVC_READ_ONLY": "1"}).read_only is False


def test_config_flag_beats_config_env(tmp_path: Path) -> None:
    first = write_toml(tmp_path, "max_ranges = 3\n")
    second = tmp_path / "other.toml"
    second.write_text("max_ranges = 5\n")
    assert load(["--config", str(second)], {CONFIG_ENV: first}).max_ranges == 5


@pytest.mark.parametrize("text", ["1", "true", "YES", "True"])
def test_env_true(text: str) -> None:
    assert load(env={"CACHESVC_READ_ONLY": text}).read_only is True


@pytest.mark.parametrize("text", ["0", "false", "No", "FALSE"])
def test_env_false(text: str) -> None:
    assert load(env={"CACHESVC_READ_ONLY": text}).read_only is False


BAD_VALUES = [
    # (flag, value, words in the message)
    ("--cache-size", "12XB", "invalid size '12XB'"),
    ("--cache-size", "512MB", "invalid size"),
    ("--cache-size", "2G", "invalid size"),
    ("--cache-size", "-1GiB", "invalid size"),
    ("--cache-size", "512KiB", "at least 1MiB"),
    ("--readahead", "32KiB", "at least 64KiB"),
    ("--max-dirty", "1KiB", "at least 64KiB"),
    ("--dirty-expire", "1d", "invalid duration"),
    ("--dirty-expire", "0", "at least 1ms"),
    ("--revalidate", "-5s", "invalid duration"),
    ("--revalidate", "9000h", "at most"),
    ("--shutdown-grace", "soon", "invalid duration"),
    ("--max-ranges", "0", "at least 1"),
    ("--max-ranges", "1.5", "invalid number"),
    ("--max-ranges", "\u0661", "invalid number"),  # ARABIC-INDIC DIGIT ONE
    ("--write-mode", "fast", "choose writeback or writethrough"),
    ("--log-level", "trace", "invalid value"),
    ("--log-format", "xml", "choose text or json"),
    ("--listen", ":8080", "missing host"),
    ("--listen", "8080", "invalid address"),
    ("--listen", "::1:8080", "brackets"),
    ("--listen", "[nothost]:8080", "invalid IPv6"),
    ("--listen", "127.0.0.1:65536", "invalid port"),
    ("--listen", "127.0.0.1:http", "invalid port"),
    ("--listen", "300.1.1.1:80", "invalid IPv4"),
    ("--listen", "bad_host:80", "invalid host"),
    ("--admin-listen", "127.0.0.1:", "invalid port"),
    ("--origin", "ftp://host/x", "unsupported origin"),
    ("--origin", "s3://", "s3://bucket/prefix"),
    ("--origin", "http:///path", "no host"),
    ("--s3-endpoint", "minio:9000", "invalid URL"),
    ("--write-token", "has space", "printable ASCII"),
    ("--admin-token", "", "must not be empty"),
    ("--memory-file", "", "must not be empty"),
]


@pytest.mark.parametrize(("flag", "value", "words"), BAD_VALUES)
def test_bad_flag_value(flag: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load([f"{flag}={value}"])
    assert info.value.flag == flag
    assert words in info.value.message
    assert str(info.value).startswith(f"{flag}: ")


# An empty environment variable counts as unset, so those cases do not apply.
@pytest.mark.parametrize(("flag", "value", "words"), [bad for bad in BAD_VALUES if bad[1]])
def test_bad_env_value_names_flag_and_variable(flag: str, value: str, words: str) -> None:
    env_name = "CACHESVC_" + flag[2:].upper().replace("-", "_")
    with pytest.raises(ConfigError) as info:
        load(env={env_name: value})
    assert info.value.flag == flag
    assert words in info.value.message
    assert f"(from {env_name})" in info.value.message


@pytest.mark.parametrize("value", ["maybe", "2", "on", "y"])
def test_bad_env_bool(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(env={"CACHESVC_READ_ONLY": value})
    assert info.value.flag == "--read-only"
    assert "invalid boolean" in info.value.message


@pytest.mark.parametrize(
    ("text", "flag", "words"),
    [
        ('cache_size = "12XB"', "--cache-size", "invalid size"),
        ("read_only = 1", "--read-only", "invalid boolean"),
        ('read_only = "true"', "--read-only", "invalid boolean"),
        ("origin = 5", "--origin", "expected a string"),
        ("max_ranges = true", "--max-ranges", "expected a string"),
        ("listen = [1, 2]", "--listen", "expected a string"),
        ("dirty_expire = nan", "--dirty-expire", "invalid number"),
        ("cache_size = 1e3", "--cache-size", "at least 1MiB, got 1000"),
        ("cache_sise = 1", "--config", "unknown key 'cache_sise' in"),
        ("[server]\nlisten = '127.0.0.1:1'", "--config", "unknown key 'server'"),
        ("cache-size = 1\ncache_size = 2", "--config", "given twice"),
        ("cache_size = ", "--config", "invalid TOML"),
        ("config = 'other.toml'", "--config", "unknown key 'config'"),
    ],
)
def test_bad_toml(text: str, flag: str, words: str, tmp_path: Path) -> None:
    path = write_toml(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as info:
        load(["--config", path])
    assert info.value.flag == flag
    assert words in info.value.message


def test_toml_numbers_are_bytes_and_seconds(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "cache_size = 2147483648\nreadahead = 65537\nrevalidate = 1.5\n")
    config = load(["--config", path])
    assert config.cache_size == 2 * GiB
    assert config.readahead == 65536 + 4096  # rounded up to a page
    assert config.revalidate == 1.5


def test_unknown_toml_key_suggests_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'cache-size'"):
        load(["--config", write_toml(tmp_path, "cache_sise = 1\n")])


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(env={CONFIG_ENV: str(tmp_path / "missing.toml")})
    assert info.value.flag == "--config"
    assert "cannot read" in info.value.message


def test_non_loopback_admin_listener_needs_token() -> None:
    for address in ("0.0.0.0:9090", "[::]:9090", "10.1.2.3:9090", "example.com:9090"):
        with pytest.raises(ConfigError) as info:
            load(["--admin-listen", address])
        assert info.value.flag == "--admin-listen"
        assert "requires --admin-token" in info.value.message
    config = load(["--admin-listen", "0.0.0.0:9090"], {"CACHESVC_ADMIN_TOKEN": "t"})
    assert config.admin_listen == HostPort("0.0.0.0", 9090)
    assert load(["--admin-listen", "localhost:9090"]).admin_listen.is_loopback


def test_non_loopback_data_listener_without_token_is_allowed() -> None:
    config = load(["--listen", "0.0.0.0:8080"])
    assert not config.listen.is_loopback
    assert config.write_token is None


@pytest.mark.parametrize(
    ("args", "flag", "words"),
    [
        (["--cache-size", "1GiB", "--max-dirty", "2GiB"], "--max-dirty", "not exceed"),
        (["--cache-size", "1MiB", "--readahead", "2MiB"], "--readahead", "not exceed"),
        (["--cache-size", "1MiB", "--max-pinned", "2MiB"], "--max-pinned", "not exceed"),
        (["--listen", "127.0.0.1:7000", "--admin-listen", "127.0.0.1:7000"], "--admin-listen",
         "same address"),
    ],
)  # fmt: skip
def test_cross_field_rules(args: list[str], flag: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(args)
    assert info.value.flag == flag
    assert words in info.value.message


def test_both_listeners_on_port_zero_are_allowed() -> None:
    config = load(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
    assert config.listen.port == config.admin_listen.port == 0


# --- --readahead 0: no readahead (issue 18) -----------------------------------


@pytest.mark.parametrize("zero", ["0", "0KiB"])
def test_readahead_zero_from_flag_and_environment_is_kept(zero: str) -> None:
    assert load(["--readahead", zero]).readahead == 0
    assert load(env={"CACHESVC_READAHEAD": zero}).readahead == 0
    # A flag of 0 still overrides the environment, and the other way round.
    assert load(["--readahead", zero], {"CACHESVC_READAHEAD": "1MiB"}).readahead == 0
    assert load(["--readahead", "1MiB"], {"CACHESVC_READAHEAD": zero}).readahead == 1 * MiB


@pytest.mark.parametrize("value", ["0", '"0"', '"0B"'])
def test_readahead_zero_from_toml_is_kept(value: str, tmp_path: Path) -> None:
    path = write_toml(tmp_path, f"readahead = {value}\n")
    assert load(["--config", path]).readahead == 0
    assert load(env={CONFIG_ENV: path}).readahead == 0


@pytest.mark.parametrize(
    ("cache_size", "readahead"),
    [("8GiB", 16 * MiB), ("64MiB", 8 * MiB), ("1MiB", 128 * KiB)],
)
def test_readahead_absent_everywhere_gets_the_default(
    cache_size: str, readahead: int, tmp_path: Path
) -> None:
    path = write_toml(tmp_path, "max_ranges = 3\n")  # a file that does not set it
    config = load(["--cache-size", cache_size, "--config", path], {"CACHESVC_READAHEAD": ""})
    assert config.readahead == readahead
    assert Config(cache_size=config.cache_size).readahead == readahead


def test_readahead_zero_reaches_the_cache_unchanged() -> None:
    from cachesvc.server import cache_options

    assert cache_options(load(["--readahead", "0"])).readahead == 0
    assert cache_options(load(["--cache-size", "64MiB"])).readahead == 8 * MiB


@pytest.mark.parametrize(
    ("value", "shown"),
    [("4KiB", "4KiB"), ("1", "4KiB"), ("60KiB", "60KiB")],  # rounded up to a page
)
def test_readahead_between_zero_and_the_minimum_is_refused(value: str, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(["--readahead", value])
    assert info.value.flag == "--readahead"
    assert info.value.message == f"must be 0 (no readahead) or at least 64KiB, got {shown}"


@pytest.mark.usefixtures("clean_env")
def test_main_refuses_readahead_of_one_page(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--readahead", "4KiB"]) == 2
    assert capsys.readouterr().err == (
        "cachesvc: error: --readahead: must be 0 (no readahead) or at least 64KiB, got 4KiB\n"
    )


def test_memory_options_reach_the_cache() -> None:
    from cachesvc.server import cache_options

    options = cache_options(load(["--cache-size", "64MiB"]))
    assert (options.eviction_policy, options.max_pinned) == ("s3fifo", 32 * MiB)
    options = cache_options(load(["--eviction-policy", "lru", "--max-pinned", "0"]))
    assert (options.eviction_policy, options.max_pinned) == ("lru", 0)
    with pytest.raises(ConfigError) as info:
        load(["--eviction-policy", "mru"])
    assert info.value.flag == "--eviction-policy"


def test_config_direct_construction_and_repr() -> None:
    config = Config(cache_size=8 * MiB, write_token="secret-w", admin_token="secret-a")
    assert config.max_dirty == 4 * MiB
    assert config.readahead == 1 * MiB  # an eighth of the cache, under 16 MiB
    assert "secret" not in repr(config)
    assert "cache_size=8388608" in repr(config)
    with pytest.raises(ConfigError):
        Config(admin_listen=HostPort("0.0.0.0", 9090))


# --- parsers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("4096", 4096),
        ("4096B", 4096),
        ("512KiB", 512 * KiB),
        ("64MiB", 64 * MiB),
        ("64mib", 64 * MiB),
        ("2GiB", 2 * GiB),
        ("1TiB", 1 << 40),
        ("1.5GiB", 3 * 512 * MiB),
        (" 2 GiB ", 2 * GiB),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("size", [1, 1000, KiB, 3 * KiB, 5 * MiB, GiB, 3 * GiB, 1 << 40])
def test_format_size_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size


def test_format_size_picks_the_largest_exact_unit() -> None:
    assert [format_size(s) for s in (GiB, 1536 * MiB, 1000)] == ["1GiB", "1536MiB", "1000"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 30.0), ("0.5", 0.5), ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_format_duration() -> None:
    assert [format_duration(s) for s in (30.0, 0.5, 0.0001)] == ["30s", "500ms", "0.0001s"]


@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080, "127.0.0.1:8080"),
        ("[::1]:0", "::1", 0, "[::1]:0"),
        ("localhost:65535", "localhost", 65535, "localhost:65535"),
        ("0.0.0.0:80", "0.0.0.0", 80, "0.0.0.0:80"),
    ],
)
def test_parse_address(text: str, host: str, port: int, shown: str) -> None:
    address = parse_address(text)
    assert address == HostPort(host, port)
    assert str(address) == shown


def test_loopback_detection() -> None:
    assert HostPort("127.0.0.2", 1).is_loopback
    assert HostPort("::1", 1).is_loopback
    assert HostPort("LOCALHOST", 1).is_loopback
    assert not HostPort("0.0.0.0", 1).is_loopback
    assert not HostPort("::", 1).is_loopback
    assert not HostPort("cache.internal", 1).is_loopback


# --- memory limit detection ------------------------------------------------


class FakeHost:
    """A fake /sys/fs/cgroup, /proc/self/cgroup and /proc/meminfo."""

    def __init__(self, root: Path) -> None:
        self.cgroup_root = root / "cgroup"
        self.proc_cgroup = root / "proc_self_cgroup"
        self.meminfo = root / "meminfo"
        self.cgroup_root.mkdir()

    def write(self, relative: str, text: str) -> None:
        path = self.cgroup_root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def detect(self) -> int | None:
        return detect_memory_limit(self.cgroup_root, self.proc_cgroup, self.meminfo)


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    fake = FakeHost(tmp_path)
    fake.meminfo.write_text("MemTotal:       16384000 kB\nMemFree:         1000 kB\n")
    return fake


def test_cgroup_v2_nested_limit(host: FakeHost) -> None:
    host.proc_cgroup.write_text("0::/system.slice/app.service\n")
    host.write("memory.max", "max\n")
    host.write("system.slice/memory.max", "max\n")
    host.write("system.slice/app.service/memory.max", "2147483648\n")
    assert host.detect() == 2 * GiB


def test_cgroup_v2_smallest_ancestor_wins(host: FakeHost) -> None:
    host.proc_cgroup.write_text("0::/a/b\n")
    host.write("a/memory.max", "1073741824\n")
    host.write("a/b/memory.max", "2147483648\n")
    assert host.detect() == 1 * GiB
    host.write("a/b/memory.max", "max\n")
    assert host.detect() == 1 * GiB
    host.write("a/b/memory.max", "536870912\n")
    assert host.detect() == 512 * MiB


def test_cgroup_v2_container_view(host: FakeHost) -> None:
    # The container sees its own cgroup at the mount root; /proc names the host path.
    host.proc_cgroup.write_text("0::/docker/abc123\n")
    host.write("memory.max", "536870912\n")
    assert host.detect() == 512 * MiB


def test_cgroup_v2_unlimited_falls_back_to_memtotal(host: FakeHost) -> None:
    host.proc_cgroup.write_text("0::/\n")
    host.write("memory.max", "max\n")
    assert host.detect() == 16384000 * KiB


def test_cgroup_v1_limit(host: FakeHost) -> None:
    host.proc_cgroup.write_text("5:cpu,cpuacct:/x\n4:memory:/process_api/abc\n0::/\n")
    host.write("memory/memory.limit_in_bytes", "9223372036854771712\n")
    host.write("memory/process_api/abc/memory.limit_in_bytes", "3221225472\n")
    assert host.detect() == 3 * GiB


def test_cgroup_v1_unlimited_falls_back_to_memtotal(host: FakeHost) -> None:
    host.proc_cgroup.write_text("4:memory:/\n")
    host.write("memory/memory.limit_in_bytes", "9223372036854771712\n")
    assert host.detect() == 16384000 * KiB


def test_limit_above_physical_memory_is_capped(host: FakeHost) -> None:
    host.proc_cgroup.write_text("0::/\n")
    host.write("memory.max", str(64 * GiB))
    assert host.detect() == 16384000 * KiB


def test_nothing_readable(tmp_path: Path) -> None:
    assert FakeHost(tmp_path).detect() is None


@pytest.mark.parametrize(
    ("limit", "size"),
    [(None, GiB), (16 * GiB, GiB), (4 * GiB, GiB), (2 * GiB, 512 * MiB), (MiB, MiB),
     (100 * MiB + 1, 25 * MiB)],
)  # fmt: skip
def test_default_cache_size(limit: int | None, size: int) -> None:
    assert default_cache_size(limit) == size


# --- the CLI in-process ------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    own = logging.getLogger("cachesvc")
    saved = (root.handlers[:], root.level, own.level)
    yield
    root.handlers[:], level, own_level = saved
    root.setLevel(level)
    own.setLevel(own_level)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for option in OPTIONS:
        monkeypatch.delenv(option.env, raising=False)
    monkeypatch.delenv(CONFIG_ENV, raising=False)


@pytest.mark.usefixtures("clean_env")
def test_main_bad_value_prints_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--cache-size", "12XB"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "cachesvc: error: --cache-size: invalid size '12XB' (use bytes or IEC units like 512MiB)\n"
    )


@pytest.mark.usefixtures("clean_env")
def test_main_usage_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cachesvc: error: ")
    assert "--no-such-flag" in err


def test_main_without_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "serve" in capsys.readouterr().err


def test_main_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == "cachesvc 0.1.0\n"


@pytest.mark.usefixtures("clean_env", "restore_logging")
def test_main_creates_origin_and_runs_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Config] = []

    def serve_forever(config: Config) -> int:
        seen.append(config)
        return 7

    fake_server = types.ModuleType("cachesvc.server")
    fake_server.serve_forever = serve_forever  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cachesvc.server", fake_server)
    origin = tmp_path / "a" / "b"
    monkeypatch.setenv("CACHESVC_LOG_FORMAT", "json")
    assert cli.main(["serve", "--origin", f"file://{origin}", "--cache-size", "8MiB"]) == 7
    assert origin.is_dir()
    assert [(c.cache_size, c.log_format) for c in seen] == [(8 * MiB, "json")]


@pytest.mark.usefixtures("clean_env", "restore_logging")
def test_main_origin_in_the_way(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["serve", "--origin", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cachesvc: error: --origin: cannot create directory")
    assert err.count("\n") == 1


def test_prepare_origin_leaves_remote_origins_alone(tmp_path: Path) -> None:
    cli.prepare_origin(Config(origin="http://127.0.0.1:1/x", cache_size=8 * MiB))
    cli.prepare_origin(Config(origin="s3://bucket/p", cache_size=8 * MiB))
    assert list(tmp_path.iterdir()) == []


# --- log formats ---------------------------------------------------------------


@pytest.mark.usefixtures("restore_logging")
def test_text_log_lines() -> None:
    stream = io.StringIO()
    setup_logging("info", "text", stream)
    log = logging.getLogger("cachesvc.test")
    log.debug("hidden")
    log.info("wrote %d bytes", 5, extra={"path": "a b.txt", "ranges": 2})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    ts, level, logger, rest = lines[0].split(" ", 3)
    assert ts.endswith("Z") and ts[10] == "T"
    assert (level, logger) == ("INFO", "cachesvc.test")
    assert rest == 'wrote 5 bytes path="a b.txt" ranges=2'


@pytest.mark.usefixtures("restore_logging")
def test_json_log_lines_with_exception() -> None:
    stream = io.StringIO()
    setup_logging("debug", "json", stream)
    log = logging.getLogger("cachesvc.test")
    log.debug("detail", extra={"path": "x"})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    logging.getLogger("aiohttp.test").debug("library debug stays off")
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["msg"] for e in entries] == ["detail", "failed"]
    assert entries[0]["level"] == "DEBUG" and entries[0]["path"] == "x"
    assert entries[0]["logger"] == "cachesvc.test" and entries[0]["ts"].endswith("Z")
    assert "RuntimeError: boom" in entries[1]["exc"]


def test_setup_logging_rejects_unknown_values() -> None:
    with pytest.raises(ValueError):
        setup_logging("trace", "text")
