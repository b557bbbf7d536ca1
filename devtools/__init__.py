"""Helpers shared by the tests and the benchmarks (never installed, never imported by the
product): canned snapshots, tiny models, a live vLLM server, vLLM's block pool driven by hand.

Benchmarks import these, not test modules, so a test's refactoring cannot break a benchmark.
"""
