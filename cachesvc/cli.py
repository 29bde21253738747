"""The ``cachesvc`` command: ``cachesvc serve [flags]`` and ``--version``.

Every way of failing before the server starts (an unknown flag, a bad value,
an origin directory that cannot be created) prints exactly one line,
``cachesvc: error: ...``, to stderr and exits with status 2. ``cachesvc``
without a subcommand prints the help to stderr and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from cachesvc import __version__
from cachesvc.config import Config, ConfigError, add_arguments, load_config
from cachesvc.logs import setup_logging
from cachesvc.origins import local_root, origin_kind

log = logging.getLogger("cachesvc.cli")

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like ConfigError's."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"cachesvc: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cachesvc",
        description="An asyncio network file cache: a page cache in a memory file in front"
        " of remote files, served over HTTP.",
    )
    parser.add_argument("--version", action="version", version=f"cachesvc {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the cache server",
        allow_abbrev=False,
        description="Run the cache server. Precedence: flag > environment > --config file"
        " > default. Sizes are bytes or IEC units (512KiB, 64MiB, 2GiB); durations are"
        " seconds or 500ms, 30s, 5m, 1h.",
    )
    add_arguments(serve)
    return parser


def prepare_origin(config: Config) -> None:
    """Creates a local origin directory if it is missing."""
    if origin_kind(config.origin) != "local":
        return
    root = local_root(config.origin)
    if os.path.isdir(root):
        return
    try:
        os.makedirs(root)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError("--origin", f"cannot create directory {root!r}: {reason}") from None
    log.info("created origin directory %s", root)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return EXIT_USAGE if isinstance(exc.code, str) else exc.code or 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(args, os.environ)
        setup_logging(config.log_level, config.log_format)
        prepare_origin(config)
    except ConfigError as exc:
        print(f"cachesvc: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    log.debug("configuration: %r", config)
    # Imported here: the server pulls in aiohttp, uvloop and the whole cache.
    from cachesvc.server import serve_forever

    return serve_forever(config)
