"""Training methods, one file per method family: each registers its Method classes (found by orch.methods.catalog)."""
