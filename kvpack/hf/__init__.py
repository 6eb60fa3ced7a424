"""The transformers side: the packed cache, the paged cache, saving/loading caches, RoPE helpers."""
