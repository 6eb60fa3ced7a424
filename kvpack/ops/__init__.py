"""Shared math of the codecs: bit packing, rotations, Lloyd-Max codebooks."""
