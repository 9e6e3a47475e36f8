"""orch: experiment orchestration and benchmarking of few-step generative models.

This package (the folder orchestrator/) is the control plane: study files, trial identity, backends (local, Ray,
Slurm), MLflow tracking and the command line. The science is orch.methods (methods/), the dashboards
orch.dashboards (dashboards/); docs/architecture.md shows the layers and what may import what. Plugins import only
from orch.api.
"""
