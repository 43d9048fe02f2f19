"""Operator tools that run the real daemons but are neither tests nor benchmarks."""
