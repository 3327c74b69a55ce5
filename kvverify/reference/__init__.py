"""The reference decoder: its configuration, the model with a cached and an uncached path, its numerics and
the checks on what a caller hands it."""
