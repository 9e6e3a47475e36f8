"""Tracking in MLflow: the names orch writes (schema) and the writes themselves (store)."""
