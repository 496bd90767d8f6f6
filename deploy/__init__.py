"""moray.deploy: serving, by role. `serve/` (Serve wiring: config, deployments, router, autoscaling,
metrics, Serve's state) <- `api/` (HTTP, gRPC, the Python client) <- `app.py` (the Serve application)
<- `cli/` and `bench/` (the `moray` commands). Imports point that way only; docs/design.md is the map.
"""
