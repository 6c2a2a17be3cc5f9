"""Training objectives: pure functions of parameter trees, a batch and a key that return (loss, metrics)."""
