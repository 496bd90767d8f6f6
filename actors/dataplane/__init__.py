"""moray's data plane: each layer's rows between a dispatcher and the expert-shard replicas, point to point
(shared memory on a node, TCP across nodes), with Ray only as the control plane (`docs/design.md`)."""
