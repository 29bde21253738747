"""Entry point for ``python -m cachesvc``."""

from cachesvc.cli import main

raise SystemExit(main())
