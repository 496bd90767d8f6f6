"""The Serve side of moray: config, the served dispatcher and shard deployments, the shards' request
router, the autoscaling policies, Prometheus metrics, and the one reader of Serve's state.

Imports point one way: `deploy/serve/` never imports `deploy/api/`, the tools or the benchmark.
"""
