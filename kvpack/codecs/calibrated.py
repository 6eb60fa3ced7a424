"""``calibrated``: a TurboQuant-MSE-shaped codec whose basis and codebooks were fitted by `kvpack calibrate`.

Per KV head ``h`` of one layer and stream, a calibration (loaded by name) holds a basis ``M_h``
(d x d) and, per bit width, one Lloyd-Max codebook per coordinate ``c_{h,j}`` (2^b levels). A vector
``x`` of head ``h`` is stored as its norm ``n = ||x M_h||`` (float16) and the codes
``idx_j = nearest level of c_{h,j} to (x M_h / n)_j``; decode is ``x^ = (c_{h,j}[idx_j] * n) M_h^-1``.
Storage equals `turbo_mse` at the same bits (``b + 16/d``), so the two compare at equal bits. Bases
(``basis=``):

- ``rotation``: the Haar rotation of `turbo_mse` (seed 0): only the codebooks differ from turbo's
  sphere codebooks (Lloyd-Max fitted to the real rotated coordinates, Max 1960 / Lloyd 1982);
- ``whiten`` (keys): ``M = L R^T`` with ``L L^T`` = the second moment of the GQA group's post-RoPE
  queries, so that ``||(k - k^) L||^2 = E_q[(q . (k - k^))^2]``: MSE in the whitened space is the
  error of the attention scores (query-aware preconditioning, as in the key quantization of
  QuaRot / SpinQuant / KVQuant's Fisher-weighted objectives, here in closed form);
- ``pca``: the eigenvectors of the head's own second moment (a PCA basis; coordinates of very
  different scales each get their own codebook).

Spec: ``calibrated:3:calib=NAME,layer=5,stream=k,basis=whiten``. With a calibration the input must be
``(..., kv_heads, tokens, head_dim)`` (a cache's layout), since the basis is per head. Without one
(``calib`` empty, the default) the basis is the seeded Haar rotation and every codebook the sphere
codebook (`kvpack.ops.lloyd_max`): exactly what `turbo_mse` stores, the uncalibrated reference.
`kvpack.tuning.calibrate.calibrated_policy` builds the per-layer `CachePolicy`.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from kvpack.codec import Codec, Layout, Packed, register_codec
from kvpack.ops.lloyd_max import sphere_codebook
from kvpack.ops.packing import pack_bits, packed_nbytes, unpack_bits
from kvpack.ops.rotation import rotation_matrix

__all__ = ["BASES", "Calibrated", "calibration_dir", "calibration_paths", "load_calibration"]

BASES = ("rotation", "whiten", "pca")
STREAMS = ("k", "v")
FORMAT = "kvpack-calibration"


def calibration_dir() -> Path:
    """Where calibrations are stored by name: ``$KVPACK_CALIBRATIONS`` or ``~/.cache/kvpack/calibrations``."""
    return Path(os.environ.get("KVPACK_CALIBRATIONS", Path.home() / ".cache" / "kvpack" / "calibrations"))


def calibration_paths(name: str) -> tuple[Path, Path]:
    """``(tensors .safetensors, meta .json)`` of calibration ``name`` (a name in `calibration_dir` or a path stem)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"calibration name must be a non-empty str, got {name!r}")
    stem = Path(name).expanduser()
    if not stem.with_suffix(".safetensors").is_file():
        stem = calibration_dir() / name
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


@functools.lru_cache(maxsize=8)
def _load(tensor_path: str, mtime: float) -> tuple[dict, dict[str, torch.Tensor]]:
    meta_path = Path(tensor_path).with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} is not a kvpack calibration (format {FORMAT!r})")
    return meta, load_file(tensor_path)


def load_calibration(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of a calibration written by `kvpack calibrate` (cached while the file is unchanged)."""
    tensors, meta = calibration_paths(name)
    if not tensors.is_file() or not meta.is_file():
        raise FileNotFoundError(
            f"no calibration {name!r}: expected {tensors.name} and {meta.name} in {tensors.parent} "
            f"(run `kvpack calibrate --name {name}`, or set KVPACK_CALIBRATIONS)"
        )
    return _load(str(tensors), tensors.stat().st_mtime)


@functools.lru_cache(maxsize=512)
def _parameters(name: str, layer: int, stream: str, basis: str, bits: int, head_dim: int, seed: int, device: str):
    """``(M, M^-1, codebooks, boundaries)`` float32 on ``device``: per head ``(H, d, d)``, ``(H, 1, d, 2^b)``,
    ``(H, 1, d, 2^b - 1)`` from a calibration, or shared ``(d, d)``, ``(d, 2^b)``, ``(d, 2^b - 1)`` without one."""
    if name:
        _, tensors = load_calibration(name)
        prefix = f"layer{layer}.{stream}.{basis}"
        basis_m = tensors[f"{prefix}.basis"].double()
        codebook = tensors[f"{prefix}.codebook{bits}"].double()[:, None]
    else:
        basis_m = rotation_matrix(head_dim, seed, dtype=torch.float64).T  # rotate() computes x @ R.T
        codebook = sphere_codebook(head_dim, bits).double().expand(head_dim, 1 << bits)
    inverse = torch.linalg.inv(basis_m)
    edges = (codebook[..., 1:] + codebook[..., :-1]) / 2
    return tuple(t.to(device=device, dtype=torch.float32).contiguous() for t in (basis_m, inverse, codebook, edges))


@register_codec
@dataclass(frozen=True)
class Calibrated(Codec):
    """Norm + fitted per-head basis + fitted per-coordinate Lloyd-Max codebooks (see the module docstring)."""

    calib: str = ""
    layer: int = 0
    stream: str = "k"
    basis: str = "rotation"

    name = "calibrated"
    allowed_bits = (1, 2, 3, 4)
    default_bits = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, got {self.stream!r}")
        if self.basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {self.basis!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be an int >= 0, got {self.layer!r}")
        if not isinstance(self.calib, str):
            raise TypeError(f"calib must be a calibration name (str), got {self.calib!r}")
        if not self.calib:
            if self.basis != "rotation":
                raise ValueError(f"basis={self.basis!r} needs a calibration (calib=NAME); without one only 'rotation'")
            return
        meta, tensors = load_calibration(self.calib)  # fails here, not mid-forward, for a missing calibration
        key = f"layer{self.layer}.{self.stream}.{self.basis}.codebook{self.bits}"
        if key not in tensors:
            raise ValueError(
                f"calibration {self.calib!r} has no {key} (it has {meta['num_layers']} layers, bases "
                f"{meta['bases']}, bits {meta['bits']}; whiten is for keys only)"
            )

    def _params(self, device: torch.device, shape: tuple[int, ...]):
        if not self.calib:
            return _parameters("", 0, self.stream, self.basis, self.bits, self.head_dim, self.seed, str(device))
        meta, _ = load_calibration(self.calib)
        num_heads = shape[-3] if len(shape) >= 3 else None
        if self.head_dim != meta["head_dim"] or num_heads != meta["num_kv_heads"]:
            raise ValueError(
                f"calibration {self.calib!r} is for {meta['num_kv_heads']} KV heads of head_dim {meta['head_dim']}, "
                f"got {num_heads} heads of head_dim {self.head_dim}"
            )
        return _parameters(self.calib, self.layer, self.stream, self.basis, self.bits, self.head_dim, 0, str(device))

    def layout(self, shape: tuple[int, ...]) -> Layout:
        lead = shape[:-1]
        return {
            "norm": (lead + (1,), torch.float16),
            "codes": (lead + (packed_nbytes(self.head_dim, self.bits),), torch.uint8),
        }

    def encode(self, x: torch.Tensor) -> Packed:
        self.check_input(x, min_dim=3 if self.calib else 1)
        basis, _, _, edges = self._params(x.device, tuple(x.shape))
        z = x.float() @ basis if basis.dim() == 2 else torch.einsum("...htd,hde->...hte", x.float(), basis)
        norm = z.norm(dim=-1, keepdim=True)
        norm16 = norm.to(torch.float16)
        if not torch.isfinite(norm16).all():
            raise ValueError("x's transformed norm exceeds the float16 range the calibrated codec stores it in")
        unit = z / torch.where(norm > 0, norm, torch.ones_like(norm))
        # level index = number of boundaries below the coordinate (per head and coordinate)
        idx = (unit[..., None] > edges).sum(-1).to(torch.uint8)
        return self.make_packed(x, norm=norm16, codes=pack_bits(idx, self.bits))

    def _decode(self, packed: Packed) -> torch.Tensor:
        _, inverse, codebook, _ = self._params(packed.device, tuple(packed.shape))
        idx = unpack_bits(packed.data["codes"], self.bits, self.head_dim).long()[..., None]
        levels = codebook.reshape((1,) * (idx.dim() - codebook.dim()) + tuple(codebook.shape))
        z = torch.take_along_dim(levels, idx, dim=-1)[..., 0] * packed.data["norm"].float()
        x = z @ inverse if inverse.dim() == 2 else torch.einsum("...hte,hed->...htd", z, inverse)
        return x
