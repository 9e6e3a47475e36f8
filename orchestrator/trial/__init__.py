"""One trial of a study: its resolved config and identity, its spec in the grid, its status, and its directory
(state.json, the metrics log, checkpoints)."""
