"""Where trials run: the backend contract (base.py), one file per backend (local.py, ray.py, slurm.py, found by
catalog.py), and the search block a backend may host (search_space.py). Adding a backend is one file: a Backend
subclass decorated with @register_backend (see docs/architecture.md). Modules whose names start with `_` are one
backend's own helpers."""
