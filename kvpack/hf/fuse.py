"""`fuse_projections`: a decoder's parallel projections of one input (``q_proj``/``k_proj``/``v_proj``,
``gate_proj``/``up_proj``) computed as one matrix product, for decode speed at small batch.

At one token per sequence a linear layer is a matrix-vector product bound by reading its weights, and a small one
does not reach the memory bandwidth: on an H200 (fp16, batch 1, graph replay; ``benchmarks/gemv_probe.py``) cuBLAS
reads Llama-3-8B's 8 MB ``k_proj`` at 1.2 TB/s and its 32 MB ``q_proj`` at 2.5 TB/s, but the three as one 48 MB
matrix at 3.2 TB/s (27 -> 16 us per layer); ``gate_proj`` and ``up_proj`` as one go from 3.7 to 4.1 TB/s. Inference
engines (vLLM, SGLang) hold these weights fused; transformers holds them apart for most families (Phi-3 already
fuses them), so this does it in place on a loaded model: each group's weights (and biases) are concatenated into one
`FusedLinear` registered beside them, and each former module becomes a `LinearPart` that returns its slice of the
fused product. The first part called with an input computes the product for all of them; the others, called with
the same tensor, take their slice (with another input, a part computes its own slice: never a stale answer). Once
every part has taken its slice the references are dropped, so no activation outlives the forward. Eager,
``torch.compile`` (fullgraph) and CUDA-graph replay all trace through it.

The values are the same products: only the GEMM's kernel (its summation order) can change, as it does between
batch sizes. What changes for the user: the state dict holds ``<parent>.fused_<names>.weight`` instead of each
projection's weight (a part's ``weight`` is a view of its rows), and the weights are one tensor per group (the
originals are freed). Training through it works (autograd flows into the fused parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PROJECTION_GROUPS", "FusedLinear", "LinearPart", "fuse_projections"]

# children of one module that take the same input, in the order the families' forwards call them
PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedLinear(nn.Module):
    """Several ``nn.Linear`` of one input as one: weights concatenated along the output features."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        super().__init__()
        with torch.no_grad():
            self.weight = nn.Parameter(torch.cat([m.weight for m in linears]),
                                       requires_grad=linears[0].weight.requires_grad)  # fmt: skip
            biases = [m.bias for m in linears]
            self.bias = None if biases[0] is None else nn.Parameter(torch.cat(biases), biases[0].requires_grad)
        self.in_features = linears[0].in_features
        self.splits = tuple(m.out_features for m in linears)
        self._input = self._parts = None
        self._taken = 0

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Output features of part ``index`` for input ``x`` (the product computed once per input)."""
        if self._input is not x:
            self._parts = F.linear(x, self.weight, self.bias).split(self.splits, dim=-1)
            self._input, self._taken = x, 0
        out = self._parts[index]
        self._taken += 1
        if self._taken == len(self.splits):  # every part taken (the usual order): keep no activation alive
            self._input = self._parts = None
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, splits={self.splits}, bias={self.bias is not None}"


class LinearPart(nn.Module):
    """What a projection becomes: its rows of a `FusedLinear` (held unregistered: the parent owns the weights)."""

    def __init__(self, fused: FusedLinear, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "fused", fused)  # not a submodule: one owner of the parameters, no double count
        self.index = index
        self.in_features, self.out_features = fused.in_features, fused.splits[index]
        self.start = sum(fused.splits[:index])

    @property
    def weight(self) -> torch.Tensor:
        return self.fused.weight[self.start : self.start + self.out_features]

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.fused.bias
        return None if b is None else b[self.start : self.start + self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(x, self.index)

    def extra_repr(self) -> str:
        return f"part {self.index} of the fused projection: out_features={self.out_features}"


def _fusable(linears: list) -> bool:
    """Plain ``nn.Linear`` (not a quantized subclass), one input size, dtype, device and bias presence."""
    if not all(type(m) is nn.Linear for m in linears):
        return False
    first = linears[0]
    return all(
        m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
        and m.weight.device == first.weight.device and (m.bias is None) == (first.bias is None)
        for m in linears
    )  # fmt: skip


def fuse_projections(model: nn.Module) -> int:
    """Fuse, in place, every group of `PROJECTION_GROUPS` found among one module's children (plain ``nn.Linear``
    of one input size, dtype, device and bias presence); returns the number of groups fused (0 on a second call, or
    on a family that already holds them fused, such as Phi-3)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    fused = 0
    for parent in list(model.modules()):
        for names in PROJECTION_GROUPS:
            linears = [getattr(parent, name, None) for name in names]
            if any(m is None for m in linears) or not _fusable(linears):
                continue
            group = FusedLinear(linears)
            parent.add_module("fused_" + "_".join(n.removesuffix("_proj") for n in names), group)
            for index, name in enumerate(names):
                setattr(parent, name, LinearPart(group, index))  # the original Linear (and its weight) is released
            fused += 1
    return fused
