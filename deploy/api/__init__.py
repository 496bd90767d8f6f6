"""moray's APIs: OpenAI HTTP (`http.py`, `ingress.py`), gRPC (`grpc.py`, `moray.proto`), the Python
client (`client.py`), over one request translation (`admission.py`) and one engine client (`engine.py`).

Imports point one way: `deploy/api/` uses `deploy/serve/` (config, metrics, Serve's state), never the
app builder, the command-line tools or the benchmark.
"""
