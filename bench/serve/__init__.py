"""`enrollbench serve`: the CA as a service on the wire (state, worker processes, metrics)."""
