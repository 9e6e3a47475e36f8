"""orch's control plane: study files, trial identity, backends (local, Ray), MLflow tracking, the CLI."""
