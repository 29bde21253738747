"""A real S3 HTTP server (moto_server) for integration tests.

:func:`running_moto_server` starts ``moto_server`` on 127.0.0.1 at a free port
as a subprocess, waits (bounded) until it answers, yields its endpoint URL and
stops it by PID. The fixtures wrap it: ``moto_endpoint`` (one server per test
module; tests use their own buckets) and ``aws_credentials`` (fake AWS
credentials in the environment, no config files, no instance metadata).

Use them from a test module with ``from tests.integration.moto_fixture import
aws_credentials, moto_endpoint`` and name them in ``usefixtures`` or in a
fixture of that module.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.support.servers import free_port, stop_process, wait_for_http

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
"""Environment for clients of a moto server (moto accepts any credentials)."""

_UNSET_FOR_CLIENTS = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def _moto_command(port: int) -> list[str]:
    """``moto_server`` next to the running interpreter, else ``python -m moto.server``."""
    binary = Path(sys.executable).with_name("moto_server")
    if binary.exists():
        return [str(binary), "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


@contextlib.contextmanager
def running_moto_server(
    log_dir: Path, *, env: Mapping[str, str] | None = None, timeout: float = 30.0
) -> Iterator[str]:
    """Runs ``moto_server`` while the block runs; yields ``http://127.0.0.1:<port>``.

    ``env`` adds variables for the server (e.g. ``S3_UPLOAD_PART_MIN_SIZE``).
    The server's output goes to ``log_dir``, and is quoted if it fails to start.
    Tries a few ports in case another process takes the free one first.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **FAKE_CREDENTIALS, **(env or {})}
    last_error: Exception | None = None
    for _attempt in range(3):
        port = free_port()
        log_path = log_dir / f"moto-{port}.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                _moto_command(port), stdout=log_file, stderr=subprocess.STDOUT, env=full_env
            )
        endpoint = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(f"{endpoint}/moto-api/data.json", timeout, proc)
        except (RuntimeError, TimeoutError) as exc:
            stop_process(proc)
            last_error = RuntimeError(
                f"moto_server did not start: {exc}\n{log_path.read_text(errors='replace')}"
            )
            continue
        try:
            yield endpoint
        finally:
            stop_process(proc)
        return
    assert last_error is not None
    raise last_error


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The endpoint URL of a moto S3 server shared by one test module."""
    with running_moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake AWS credentials for botocore clients, isolated from the user's config."""
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    for name in _UNSET_FOR_CLIENTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config-missing"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials-missing"))
