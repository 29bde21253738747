"""A real nginx serving a directory, for tests of the HTTP origin and Range handling.

:func:`start_nginx` runs ``nginx -p <workdir> -c <conf>`` in the foreground
(``daemon off``, one worker) on 127.0.0.1 and a free port, with every path it
writes (pid, logs, temp dirs) inside ``workdir``. The location serving
``root_dir`` has ``autoindex on; autoindex_format json;`` plus ``extra_conf``
(e.g. ``max_ranges 0;`` for an origin that ignores Range).

The :func:`nginx` fixture is a factory that stops every server it started.
To use it from another test module, import it there (``from
tests.integration.nginx_fixture import nginx  # noqa: F401``) or list this
module in ``pytest_plugins``.

Every wait is bounded; nginx is stopped by PID (SIGQUIT, then SIGKILL of its
process group, so no orphaned worker outlives the test).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.servers import free_port, stop_process, wait_for_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 10000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        {server_conf}
        location / {{
            autoindex on;
            autoindex_format json;
            {extra_conf}
        }}
    }}
}}
"""


def nginx_available() -> bool:
    return os.access(NGINX, os.X_OK)


def start_nginx(
    root_dir: Path,
    extra_conf: str = "",
    *,
    server_conf: str = "",
    workdir: Path | None = None,
    timeout: float = 10.0,
) -> tuple[int, Callable[[], None]]:
    """Starts nginx serving ``root_dir``; returns ``(port, stop)``.

    ``extra_conf`` goes into the ``location /`` block, ``server_conf`` into
    ``server``. ``workdir`` (default: a new temporary directory, removed by
    ``stop``) holds the configuration, pid file, logs and temp paths.
    """
    if not nginx_available():
        raise RuntimeError(f"nginx not found at {NGINX}")
    own_workdir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="nginx-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    # As root, nginx would run its worker as 'nobody', which cannot read tmp_path.
    user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""
    for _attempt in range(3):  # the free port may be taken before nginx binds it
        port = free_port()
        conf = work / "nginx.conf"
        conf.write_text(
            _CONF.format(
                user=user,
                work=work,
                port=port,
                root=Path(root_dir).resolve(),
                server_conf=server_conf,
                extra_conf=extra_conf,
            )
        )
        proc = subprocess.Popen(
            [NGINX, "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for_port(port, proc, timeout)
            break
        except (RuntimeError, TimeoutError):
            stop_process(proc, signal.SIGQUIT, 2.0, group=True)
    else:
        log = (work / "error.log").read_text(errors="replace")
        raise RuntimeError(f"nginx did not start:\n{log}")

    def stop(stop_timeout: float = 5.0) -> None:
        stop_process(proc, signal.SIGQUIT, stop_timeout, group=True)
        if own_workdir:
            shutil.rmtree(work, ignore_errors=True)

    return port, stop


@pytest.fixture
def nginx() -> Iterator[Callable[..., int]]:
    """Factory: ``nginx(root_dir, extra_conf="", **kw) -> port``; all stopped at teardown."""
    if not nginx_available():
        pytest.skip(f"nginx not installed ({NGINX})")
    stops: list[Callable[[], None]] = []

    def start(root_dir: Path, extra_conf: str = "", **kwargs: object) -> int:
        port, stop = start_nginx(root_dir, extra_conf, **kwargs)  # type: ignore[arg-type]
        stops.append(stop)
        return port

    yield start
    for stop in reversed(stops):
        stop()
