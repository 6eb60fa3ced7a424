"""Triton kernels; each is tested against the pure-PyTorch reference of the same op."""
