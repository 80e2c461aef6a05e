"""Benchmarks of the Ola implementation, each measured side by side against a baseline; see ``bench/README.md``."""
