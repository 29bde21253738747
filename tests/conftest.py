"""Suite-wide settings: the lock-order checker is on for every test."""

from __future__ import annotations

import os

from cachesvc.core.locks import set_lock_order_checking

# Subprocesses (the real server in e2e tests) inherit this and check too.
os.environ["CACHESVC_LOCK_CHECK"] = "1"
set_lock_order_checking(True)
