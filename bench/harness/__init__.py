"""The bench's shared parts: servers, payloads, load drivers, slices, floors and reports.

bench/throughput.py and bench/swap_under_load.py run from the repository root as scripts, so
their own folder is on sys.path and they import this package as ``harness``.
"""
