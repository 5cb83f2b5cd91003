"""Many runs: sweeps, comparisons with their statistics, the data-parallel scaling plan."""
