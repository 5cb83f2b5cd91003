"""The training loop and what it runs: building a run, the step, control reads, evaluation, checkpoints."""
