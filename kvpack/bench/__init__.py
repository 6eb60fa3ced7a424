"""GPU speed benchmarks (`kvpack bench`): decode attention, fused encode, end-to-end generate."""
