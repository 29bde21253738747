"""cachesvc core: memory file, range sets, caching inodes; no HTTP here."""
