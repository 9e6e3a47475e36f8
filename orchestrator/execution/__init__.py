"""Running one trial: its components built from the registries, run_trial (train, evaluate, checkpoint, record),
the teachers of distillation methods, and the ranks of a data-parallel trial."""
