"""Calibrated recipe presets shipped as package data: `kvpack.tuning.recipe` policy files named
``{key}-{preset}.json`` (key: model hash, calibration tokens, recipe version), read before calibrating."""
