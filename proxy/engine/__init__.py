"""Running inference: run threads, micro-batching, mirror lanes, and the engine's counters."""
