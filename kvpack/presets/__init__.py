"""The shipped presets: policy files (package data), loaded by `kvpack.evaluation.presets`."""
