"""What a run leaves on disk: run directory, checkpoints, state.json, metrics, plots, atomic writes."""
