"""Ray Tune search spaces and sweeps (learning rate, warm-up, guidance scale)."""
