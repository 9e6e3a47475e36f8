"""One trial: its resolved config and identity, state, components, teacher and run_trial."""
