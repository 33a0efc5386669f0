"""Benchmarks and the real-process harness (daemons as subprocesses on loopback)."""
