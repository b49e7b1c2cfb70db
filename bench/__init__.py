"""Benchmarks of log-bridge: `make bench` (`python -m bench.run`) writes docs/benchmarks.md."""
