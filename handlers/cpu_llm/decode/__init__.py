"""Engine primitives: a request's decode state, token choice, incremental detokenization and stop strings."""
