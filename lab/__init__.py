"""The lab: everything that drives streamserve from outside, as users do.

The demo, the benchmark, the load generator, a worker-fleet helper and an
embedded Redis-compatible server. Nothing here runs in a production worker.
"""
