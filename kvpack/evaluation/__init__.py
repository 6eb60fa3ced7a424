"""Quality evaluation on real models and text: eval, sweep, needle, inspect."""
