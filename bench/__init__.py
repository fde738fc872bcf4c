"""chatfb benchmarks: `python -m bench.<name> [--smoke]` from the repository root (see bench/README.md)."""
