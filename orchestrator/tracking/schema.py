"""Every name orch writes to MLflow, in one place (docs/contracts.md lists them for users); the statuses in its
orch.status tag are orch/trial/status.py's. Nothing here imports MLflow: the dashboards read these names too."""

from __future__ import annotations

# Metric keys are built and parsed in orch.methods.contracts.metric_keys (the science layer writes them and may
# not import this module); re-exported here with every other name (its __all__): nothing else formats or splits one.
from orch.methods.contracts.metric_keys import *  # noqa: F403

# ---- tags of every run ---------------------------------------------------------------------------------------------
ROLE = "orch.role"
""""study" (the parent run) or "trial" (a child run)."""
GIT_COMMIT, PYTHON, HOST, DEVICE = "orch.git_commit", "orch.python", "orch.host", "orch.device"
VERSION = "orch.version."
"""Prefix: orch.version.<package> for the packages a result depends on."""
GENERATION = "orch.generation"
"""The version of the study file (a hash of it, resolved) that last planned a trial, or that a parent ran."""

# ---- tags of a study's parent run ----------------------------------------------------------------------------------
AXES, PROFILE, STUDY_YAML, DESCRIPTION = "orch.axes", "orch.profile", "orch.study_yaml", "orch.description"
SEARCH_METRIC, SEARCH_MODE = "orch.search.metric", "orch.search.mode"
BEST = "orch.best"
"""A search's best sample, JSON {trial_id, label, metric, value, params}."""
SEARCH_ARTIFACT = "study/search.json"
"""The parent run's artifact holding the search block (its space is not bounded in size, unlike a tag)."""

# ---- tags of a trial's child run -----------------------------------------------------------------------------------
TRIAL_ID, STATUS, REASON, STOPPED_STEP = "orch.trial_id", "orch.status", "orch.reason", "orch.stopped_step"
FACTORS = "orch.factors"
"""A trial's factor levels, JSON {axis: [index on the axis, label]}: what the dashboard groups by."""
FINGERPRINT, MEASURE, DIRECTION = "orch.fingerprint.", "orch.measure.", "orch.direction."
"""Prefixes, + a metric's name: what makes its values comparable, how it was measured in words, min or max."""
TEACHER, GUIDE, STAGE, TRIAL_DIR = "orch.teacher", "orch.guide", "orch.stage", "orch.trial_dir"
CLASSES = "orch.classes"
"""A class-conditional trial's class names, JSON [name of label 0, name of label 1, …] (image datasets)."""
PRECISION = "orch.precision"
"""The resolved train.precision of the run ("bf16", "fp32", …; "+compile" when train.compile)."""

# ---- metric keys: imported above; the tag of `orch eval`'s protocols ----------------------------------------------
FINAL_TAG = "orch.final."
"""Prefix, + a metric's name: how `orch eval` measured its final/<metric>/… values (JSON: fingerprint, measured_as,
num_samples, checkpoint, seeds, dataset)."""

# ---- MLflow's own names orch sets -----------------------------------------------------------------------------------
EXPERIMENT_KIND, TRAINING = "mlflow.experimentKind", "custom_model_development"
PARENT_RUN, RUN_NAME = "mlflow.parentRunId", "mlflow.runName"
SOURCE_NAME, SOURCE_TYPE, SOURCE_COMMIT, USER = (
    "mlflow.source.name",
    "mlflow.source.type",
    "mlflow.source.git.commit",
    "mlflow.user",
)
