"""Training: the trainer's step (loss, weighting, optimiser), its EMA copies and its learned loss weight."""
