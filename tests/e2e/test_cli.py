"""The real ``python -m cachesvc`` process: version, help, and bad
configuration (exit status 2, one line on stderr naming the flag).

The server is not started here; these runs all end before it would be.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from cachesvc import __version__
from cachesvc.config import CONFIG_ENV, OPTIONS

TIMEOUT = 30.0


def run(
    args: list[str], cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CACHESVC_")}
    # Wide enough that argparse never wraps a flag or variable name.
    full_env = {**clean, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cachesvc", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_version(tmp_path: Path) -> None:
    result = run(["--version"], tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"cachesvc {__version__}\n", "")


def test_serve_help_lists_every_option_with_default_and_env(tmp_path: Path) -> None:
    result = run(["serve", "--help"], tmp_path)
    assert result.returncode == 0
    help_text = result.stdout
    for option in OPTIONS:
        assert option.flag in help_text
        assert f"env {option.env})" in help_text
    assert "--config PATH" in help_text and CONFIG_ENV in help_text
    assert help_text.count("(default: ") == len(OPTIONS)
    assert "(default: 127.0.0.1:8080; env CACHESVC_LISTEN)" in help_text
    assert "(default: ./data; env CACHESVC_ORIGIN)" in help_text


def test_no_command_prints_help_and_exits_2(tmp_path: Path) -> None:
    result = run([], tmp_path)
    assert result.returncode == 2
    assert "serve" in result.stderr and result.stdout == ""


@pytest.mark.parametrize(
    ("args", "env", "flag"),
    [
        (["--cache-size", "12XB"], {}, "--cache-size"),
        (["--listen", ":8080"], {}, "--listen"),
        (["--admin-listen", "0.0.0.0:9090"], {}, "--admin-listen"),
        ([], {"CACHESVC_DIRTY_EXPIRE": "forever"}, "--dirty-expire"),
        ([], {"CACHESVC_READ_ONLY": "maybe"}, "--read-only"),
        (["--write-mode", "sometimes"], {}, "--write-mode"),
        ([], {CONFIG_ENV: "missing.toml"}, "--config"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(
    args: list[str], env: dict[str, str], flag: str, tmp_path: Path
) -> None:
    result = run(["serve", "--origin", "new-origin", *args], tmp_path, env)
    assert result.returncode == 2
    assert result.stderr.startswith(f"cachesvc: error: {flag}: ")
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n")
    assert result.stdout == ""
    # Nothing happens before the configuration is known to be good.
    assert not (tmp_path / "new-origin").exists()


def test_unknown_toml_key_exits_2(tmp_path: Path) -> None:
    (tmp_path / "cachesvc.toml").write_text('cache-size = "64MiB"\nlisten_adress = "x"\n')
    result = run(["serve", "--config", "cachesvc.toml"], tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        "cachesvc: error: --config: unknown key 'listen_adress' in cachesvc.toml"
        " (did you mean 'listen'?)\n"
    )


def test_unknown_flag_exits_2_with_one_line(tmp_path: Path) -> None:
    result = run(["serve", "--cache-sise", "1GiB"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("cachesvc: error: ")
    assert "--cache-sise" in result.stderr and result.stderr.count("\n") == 1
