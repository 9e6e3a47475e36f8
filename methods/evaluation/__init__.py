"""Evaluation: generation with a method's sampler, the metric contract and the registered metrics (one file per
metric family, found by orch.methods.catalog), and FID's Inception features."""
