"""Flow-map networks v(x; a, b), one file per architecture: each registers its builders (found by
orch.methods.catalog)."""
