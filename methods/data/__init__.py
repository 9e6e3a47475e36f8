"""Datasets, one file per kind: each registers its builders (found by orch.methods.catalog), plus the VAE and
the encoding pipeline of latent datasets."""
