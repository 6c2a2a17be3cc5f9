"""User and developer tools: weight importers, fixture writers, benchmarks."""
