"""`moray bench` (`main.py`): throughput and latency of moray and its peers; see `main.py` for the
one-way order in which this package's modules import each other."""
