"""Builds the data and admin apps on their listeners and runs them.

Lifecycle: open the origin and the memory file, start the cache's
write-back daemon and a usage refresher (the host's view of committed
memory, read in a worker thread so scrapes stay O(1)), then serve until
SIGTERM or SIGINT. Shutdown stops accepting, lets in-flight requests finish
within ``--shutdown-grace``, writes back all dirty data and fsyncs; the exit
status is 0, or 1 after naming the files and ranges that could not be
written.

In-flight requests are counted here rather than left to aiohttp's runner
cleanup: that cleanup first marks every connection closing, after which
aiohttp drops the bytes still arriving on it, so an upload in progress
could never finish its body and would be cancelled when the grace period
ran out. Shutdown therefore closes the listening sockets, waits for the
count to reach zero (answers given meanwhile close their connection), and
only then lets the runners close what is left, with a short linger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import dataclass
from typing import Any

import uvloop
from aiohttp import web

from cachesvc import __version__
from cachesvc.api.admin import make_admin_app
from cachesvc.api.data import make_data_app
from cachesvc.api.fastconn import FastSite
from cachesvc.api.fastpath import FastReads
from cachesvc.api.inflight import InFlight
from cachesvc.api.listener import runner_options
from cachesvc.api.metrics import Metrics
from cachesvc.api.webrequest import STATE_KEY
from cachesvc.config import Config
from cachesvc.core.cache import CacheOptions, FileCache
from cachesvc.core.memfile import MemoryFile
from cachesvc.origins import OriginOptions, open_origin
from cachesvc.origins.instrumented import InstrumentedOrigin

log = logging.getLogger("cachesvc.server")

# How often the host's view of committed memory is refreshed.
USAGE_REFRESH_SECONDS = 1.0
# After the grace period (or once nothing is in flight), how long aiohttp
# may still take to send the last responses before it cancels handlers.
LINGER_SECONDS = 1.0


@dataclass(slots=True)
class Service:
    """Everything one running server owns."""

    config: Config
    cache: FileCache
    memfile: MemoryFile
    origin: InstrumentedOrigin
    metrics: Metrics
    runners: list[web.AppRunner]  # data, admin
    data_site: FastSite
    refresher: asyncio.Task[None]
    in_flight: InFlight


def cache_options(config: Config) -> CacheOptions:
    # Config.__post_init__ has replaced "not given" by the default; 0 (no
    # readahead) goes to the cache as it is.
    assert config.readahead is not None
    return CacheOptions(
        eviction_policy=config.eviction_policy,
        max_pinned=config.max_pinned,
        cache_size=config.cache_size,
        max_dirty=config.max_dirty,
        dirty_expire=config.dirty_expire,
        readahead=config.readahead,
        writethrough=config.write_mode == "writethrough",
        revalidate=config.revalidate,
    )


async def start(config: Config) -> Service:
    """Opens everything and starts both listeners."""
    metrics = Metrics()
    inner = open_origin(
        config.origin,
        OriginOptions(
            http_origin_writes=config.http_origin_writes,
            s3_endpoint=config.s3_endpoint,
            s3_region=config.s3_region,
        ),
    )
    origin = InstrumentedOrigin(inner, metrics)
    memfile = await MemoryFile.create(config.memory_file)
    cache = FileCache(origin, memfile, cache_options(config))
    cache.start()
    metrics.watch_cache(cache)
    in_flight = InFlight()
    data_app = make_data_app(cache, config, metrics)
    data_runner = await _runner(data_app, in_flight, config, runner_options())
    data_site = FastSite(
        data_runner,
        config.listen.host,
        config.listen.port,
        FastReads(data_app[STATE_KEY], in_flight),
        reuse_address=True,
    )
    await data_site.start()
    admin_runner = await _runner(make_admin_app(cache, config, metrics), in_flight, config, {})
    await web.TCPSite(
        admin_runner, config.admin_listen.host, config.admin_listen.port, reuse_address=True
    ).start()
    refresher = asyncio.create_task(_refresh_usage(memfile), name="usage refresher")
    return Service(
        config,
        cache,
        memfile,
        origin,
        metrics,
        [data_runner, admin_runner],
        data_site,
        refresher,
        in_flight,
    )


async def _runner(
    app: web.Application, in_flight: InFlight, config: Config, options: dict[str, Any]
) -> web.AppRunner:
    app.middlewares.insert(0, in_flight.middleware())
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        # stop() has waited out the grace period already.
        shutdown_timeout=min(LINGER_SECONDS, config.shutdown_grace),
        **options,
    )
    await runner.setup()
    return runner


def bound_addresses(service: Service) -> list[str]:
    """``host:port`` of each listener as bound (data first, then admin)."""
    out = []
    for runner in service.runners:
        for address in runner.addresses:
            host, port = address[0], address[1]
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return out


async def _refresh_usage(memfile: MemoryFile) -> None:
    while True:
        try:
            await memfile.update_usage()
        except OSError as exc:
            log.warning("could not read memory usage: %s", exc)
        await asyncio.sleep(USAGE_REFRESH_SECONDS)


async def stop(service: Service) -> int:
    """Graceful shutdown; returns the process exit status."""
    in_flight = service.in_flight
    in_flight.stopping = True
    for runner in service.runners:
        for site in list(runner.sites):
            await site.stop()  # closes the listening socket
    grace = service.config.shutdown_grace
    try:
        async with asyncio.timeout(grace):
            await in_flight.wait_idle()
    except TimeoutError:
        log.warning(
            "%d request(s) still running after the %gs grace period; cancelling them",
            in_flight.count,
            grace,
        )
    service.data_site.close_idle()
    # Answers on the fast path are not aiohttp's: cancelled here, so that
    # they release their mappings before the cache closes.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER_SECONDS):
            await service.data_site.cancel_answers()
    for runner in service.runners:
        # Closes idle keep-alive connections; cancels handlers still running.
        await runner.cleanup()
    service.refresher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await service.refresher
    failures = await service.cache.close()
    await service.origin.close()
    await service.memfile.close()
    for failure in failures:
        ranges = ", ".join(f"[{a}, {b})" for a, b in failure.ranges) or "attributes"
        log.error(
            "could not write back %s (%s): %s",
            failure.path,
            ranges,
            failure.error,
            extra={"path": failure.path},
        )
    if failures:
        log.error("shutdown with %d file(s) not written back", len(failures))
        return 1
    log.info("shutdown complete; all data written back")
    return 0


async def run(config: Config) -> int:
    """Serves until SIGTERM/SIGINT; returns the exit status."""
    service = await start(config)
    addresses = bound_addresses(service)
    log.info(
        "cachesvc %s serving %s on http://%s (admin http://%s), cache size %d bytes",
        __version__,
        service.origin.description,
        addresses[0],
        addresses[1],
        config.cache_size,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("signal received; finishing in-flight requests and writing back")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    return await stop(service)


def serve_forever(config: Config) -> int:
    """Runs the server on uvloop; returns the exit status."""
    try:
        return uvloop.run(run(config))
    except OSError as exc:
        # Typically a listener that cannot bind.
        print(f"cachesvc: error: {exc}", file=sys.stderr)
        return 1
