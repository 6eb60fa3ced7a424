"""Finding a policy for a model: bit allocation, calibration of codebooks, memory planning."""
