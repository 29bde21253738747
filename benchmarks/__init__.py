"""Benchmarks of cachesvc pieces and of cachesvc against its peers."""
