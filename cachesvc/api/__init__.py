"""HTTP layer: translates requests into core calls."""
