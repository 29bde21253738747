"""cachesvc: an asyncio network file cache backed by a memory-file page cache."""

__version__ = "0.1.0"
