"""Named cache policies for `kvpack eval --preset NAME` (filled from measured sweeps)."""

from __future__ import annotations

PRESETS: dict[str, dict] = {}
