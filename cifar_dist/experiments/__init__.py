"""Many runs: sweeps, and comparisons of them with their statistics."""
