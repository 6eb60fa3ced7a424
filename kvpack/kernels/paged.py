"""The packed paged KV layout that the Triton kernels read and write, and its PyTorch reference.

A cache stream (K or V) is a uint8 tensor ``[num_blocks, block_size, num_kv_heads, row_bytes]``
(the paged layout of vLLM, Kwon et al., arXiv 2309.06180): token ``t`` of sequence ``b`` lives in
block ``block_tables[b, t // block_size]`` at row ``t % block_size``. One row holds one token of
one KV head: the ``head_dim`` codes, then the per-token side data. Rows are a multiple of 4 bytes
so that a kernel reads and writes them as int32 words (byte loads cost an instruction per byte).

Code planes (``head_dim * bits / 8`` bytes in all): the codes split into bit planes of width 8, 4, 2
or 1 (``PLANES``: 8 -> (8,) (``int`` only), 4 -> (4,), 3 -> (2, 1) low bits first, 2 -> (2,), 1 -> (1,)), each plane packed by
`kvpack.pack_bits` (code ``i`` at plane bits ``[i w, (i + 1) w)``, least significant first), so a
little-endian int32 word of a plane holds ``32 / w`` whole codes and a kernel unpacks it with
shifts. For 1, 2, 4 and 8 bits the bytes are exactly the codec's ``"codes"``. ``turbo_prod`` at ``b`` bits: the
codes are ``b``-bit, the low ``b - 1`` bits the index of its ``turbo_mse`` stage (planes ``PLANES[b - 1]``)
and the top bit the QJL sign of sketch coordinate ``i`` (one more 1-bit plane: the codec's ``"qjl_signs"``).

Side data (4 bytes, after the codes): ``turbo_mse``: float16 ``norm`` and 2 zero bytes of padding
(value = ``norm * unrotate(codebook[code])``); ``int`` (axis token, one group): float16 ``scale``,
``zero`` (value = ``code * scale + zero``); ``turbo_prod``: float16 ``norm`` and ``residual_norm`` (value =
``norm * unrotate(codebook[low]) + residual_norm * sqrt(pi/2) / D * S^T (2 sign - 1)``). A `PagedCodec`
carries what a kernel needs besides the bytes: the codebook (``turbo_mse``; ``turbo_prod``: its mse
stage's), the rotation as a matrix ``M`` with ``rotate(x) = x @ M`` and the QJL sketch ``S`` (``turbo_prod``);
each codec the rows can hold hands these tables over itself (``codec.paged_tables(device)``, read by `paged_codec`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvpack.codec import Codec, Packed
from kvpack.ops.packing import pack_bits, unpack_bits

__all__ = [
    "KINDS",
    "PAGED_BITS",
    "PagedCodec",
    "choose_splits",
    "dequantize_rows",
    "graph_capturing",
    "pack_rows",
    "paged_codec",
    "rows_from_packed",
    "unpack_rows",
    "write_slots",
]

KINDS = ("turbo_mse", "int", "turbo_prod")
KIND_IDS = {kind: i for i, kind in enumerate(KINDS)}  # the kernels' KIND constexpr: 0 turbo_mse, 1 int, 2 turbo_prod
SIDE_BYTES = 4  # turbo_mse: float16 norm + 2 bytes of padding; int: float16 scale and zero; turbo_prod: both norms
SIDE_VALUES = {"turbo_mse": 1, "int": 2, "turbo_prod": 2}  # float16 side values (turbo_prod: norm, residual_norm)
PLANES = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}  # bit-plane widths, low bits first
# the bits each kind's rows hold: codebook index 1-4 bits (turbo_prod: one more, its sign); int codes 1-4 or 8 bits
CODEBOOK_BITS = (1, 2, 3, 4)  # the encoder compares against 2^bits - 1 edges one by one: no 256-entry codebooks
PAGED_BITS = {"turbo_mse": CODEBOOK_BITS, "int": tuple(PLANES), "turbo_prod": tuple(b + 1 for b in CODEBOOK_BITS)}


@dataclass(frozen=True)
class PagedCodec:
    """What the kernels need to read or write one stream: codec kind, bits, head_dim and its tables.

    ``codebook``: float32 ``(2^mse_bits,)`` sorted centroids (``turbo_mse``, ``turbo_prod``; ``None`` for
    ``int``); ``boundaries``: the float32 cell edges, used by the encoder; ``rotation``: float32 ``(D, D)``
    matrix ``M`` with ``rotate(x) = x @ M`` and ``unrotate(y) = y @ M.T`` (``int``: ``None`` unless
    the codec rotates, ``int:...:rotation=hadamard``); ``sketch``: float32 ``(D, D)`` QJL matrix ``S``
    (``turbo_prod`` only).
    """

    kind: str
    head_dim: int
    bits: int
    codebook: torch.Tensor | None = None
    boundaries: torch.Tensor | None = None
    rotation: torch.Tensor | None = None
    sketch: torch.Tensor | None = None
    # derived once (not per call): float16 codebook, float16 M, float32 M.T for the kernels
    codebook16: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    rotation16: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    unrotation: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        d = self.head_dim
        if isinstance(d, bool) or not isinstance(d, int) or d < 32 or d & (d - 1):
            raise ValueError(f"head_dim must be a power of two >= 32 for the paged kernels, got {d!r}")
        allowed = PAGED_BITS[self.kind]
        if isinstance(self.bits, bool) or self.bits not in allowed:
            raise ValueError(f"bits must be one of {allowed} for {self.kind} in the paged kernels, got {self.bits!r}")
        if self.kind == "turbo_prod" and not (isinstance(self.sketch, torch.Tensor) and self.sketch.shape == (d, d)):
            got = None if not isinstance(self.sketch, torch.Tensor) else tuple(self.sketch.shape)
            raise ValueError(f"turbo_prod needs sketch of shape ({d}, {d}), got {got}")
        if self.kind != "turbo_prod" and self.sketch is not None:
            raise ValueError(f"only turbo_prod takes a sketch, not {self.kind}")
        if self.kind != "int":
            for name, shape in (("codebook", (1 << self.mse_bits,)), ("rotation", (d, d))):
                t = getattr(self, name)
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                    raise ValueError(f"{self.kind} needs {name} of shape {shape}, got {t if t is None else t.shape}")
            if self.boundaries is None:
                cb = self.codebook.float()
                object.__setattr__(self, "boundaries", (cb[1:] + cb[:-1]) / 2)
            object.__setattr__(self, "codebook16", self.codebook.to(torch.float16).contiguous())
        elif self.rotation is not None and (
            not isinstance(self.rotation, torch.Tensor) or tuple(self.rotation.shape) != (d, d)
        ):
            raise ValueError(f"int's rotation must be None or a ({d}, {d}) tensor, got {self.rotation!r}")
        if self.rotation is not None:
            object.__setattr__(self, "rotation16", self.rotation.to(torch.float16).contiguous())
            object.__setattr__(self, "unrotation", self.rotation.float().T.contiguous())

    @property
    def mse_bits(self) -> int:
        """Bits of the codebook index: ``bits - 1`` for ``turbo_prod`` (its top code bit is the QJL sign), else ``bits``."""
        return self.bits - 1 if self.kind == "turbo_prod" else self.bits

    @property
    def planes(self) -> tuple[int, ...]:
        """Bit-plane widths of the codes, low bits first (``turbo_prod``: the mse stage's, then the sign plane)."""
        return PLANES[self.mse_bits] + ((1,) if self.kind == "turbo_prod" else ())

    @property
    def code_bytes(self) -> int:
        return self.head_dim * self.bits // 8

    @property
    def row_bytes(self) -> int:
        """Bytes of one token of one KV head: code planes plus 4 bytes of side data (a multiple of 4)."""
        return self.code_bytes + SIDE_BYTES

    def to(self, device: torch.device | str) -> PagedCodec:
        move = {k: None if t is None else t.to(device) for k, t in self._tables().items()}
        return PagedCodec(self.kind, self.head_dim, self.bits, **move)

    def _tables(self) -> dict[str, torch.Tensor | None]:
        return {"codebook": self.codebook, "boundaries": self.boundaries, "rotation": self.rotation,
                "sketch": self.sketch}  # fmt: skip


def paged_codec(codec: Codec, device: torch.device | str = "cpu") -> PagedCodec:
    """The `PagedCodec` of a kvpack codec that hands the kernels its tables (``codec.paged_tables(device)``):
    ``turbo_mse``, ``turbo_prod`` (any rotation) or ``int`` (axis token, one group), at the bits of `PAGED_BITS`."""
    if not isinstance(codec, Codec):
        raise TypeError(f"codec must be a kvpack Codec, got {type(codec).__name__}")
    tables = getattr(codec, "paged_tables", None)
    if codec.name not in KINDS or tables is None:
        raise ValueError(f"the paged kernels support turbo_mse, turbo_prod and int, not {codec.spec!r}")
    tables = tables(device)  # raises ValueError for a layout the rows cannot hold (int: axis=channel, ...)
    allowed = PAGED_BITS[codec.name]
    if codec.bits not in allowed:
        raise ValueError(f"the paged kernels take {codec.name} with bits in {allowed}, got {codec.spec!r}")
    return PagedCodec(codec.name, codec.head_dim, codec.bits, **tables)


def _check_codes(codes: torch.Tensor, fmt: PagedCodec) -> None:
    if codes.shape[-1] != fmt.head_dim:
        raise ValueError(f"codes' last dim must be head_dim={fmt.head_dim}, got shape {tuple(codes.shape)}")


def pack_rows(codes: torch.Tensor, side: torch.Tensor, fmt: PagedCodec) -> torch.Tensor:
    """Codes ``(..., D)`` in ``[0, 2^bits)`` and float16 side data ``(..., side_values)`` -> rows uint8 ``(..., row_bytes)``.

    ``turbo_prod``: code ``i`` = mse index ``| sign_i << (bits - 1)``; side = (norm, residual_norm).
    """
    _check_codes(codes, fmt)
    if side.shape[-1] != SIDE_VALUES[fmt.kind]:
        raise ValueError(f"{fmt.kind} side data must hold {SIDE_VALUES[fmt.kind]} float16 values, got {side.shape[-1]}")
    side = side.to(torch.float16)
    if fmt.kind == "turbo_mse":
        side = torch.cat([side, torch.zeros_like(side)], dim=-1)  # padding: rows stay a multiple of 4 bytes
    codes = codes.to(torch.uint8)
    planes, low = [], 0
    for width in fmt.planes:
        planes.append(pack_bits((codes >> low) & ((1 << width) - 1), width))
        low += width
    return torch.cat([*planes, side.contiguous().view(torch.uint8)], dim=-1)


def unpack_rows(rows: torch.Tensor, fmt: PagedCodec) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_rows`: rows uint8 ``(..., row_bytes)`` -> codes uint8 ``(..., D)``, side float16."""
    if rows.dtype != torch.uint8 or rows.shape[-1] != fmt.row_bytes:
        raise ValueError(f"rows must be uint8 (..., {fmt.row_bytes}), got {rows.dtype} {tuple(rows.shape)}")
    codes = torch.zeros(*rows.shape[:-1], fmt.head_dim, dtype=torch.uint8, device=rows.device)
    start = low = 0
    for width in fmt.planes:
        nbytes = fmt.head_dim * width // 8
        codes |= unpack_bits(rows[..., start : start + nbytes].contiguous(), width, fmt.head_dim) << low
        start, low = start + nbytes, low + width
    side = rows[..., fmt.code_bytes :].contiguous().view(torch.float16)[..., : SIDE_VALUES[fmt.kind]]
    return codes, side


def rows_from_packed(packed: Packed, fmt: PagedCodec) -> torch.Tensor:
    """Rows ``(..., row_bytes)`` holding exactly the codes and side data of a codec's `Packed` (shape ``(..., D)``)."""
    data, d = packed.data, fmt.head_dim
    if fmt.kind == "turbo_mse":
        side = data["norm"]
    elif fmt.kind == "turbo_prod":
        side = torch.cat([data["norm"], data["residual_norm"]], -1)
    else:
        side = torch.cat([data["scale"], data["zero"]], -1)
    codes = unpack_bits(data["codes"], fmt.mse_bits, d)
    if fmt.kind == "turbo_prod":
        codes = codes | (unpack_bits(data["qjl_signs"], 1, d) << fmt.mse_bits)
    return pack_rows(codes, side, fmt)


def dequantize_rows(rows: torch.Tensor, fmt: PagedCodec) -> torch.Tensor:
    """Rows ``(..., row_bytes)`` -> float32 values ``(..., D)``, as the codec decodes them (in float32)."""
    codes, side = unpack_rows(rows, fmt)
    side = side.float()
    if fmt.kind == "turbo_mse":
        return (fmt.codebook.float()[codes.long()] @ fmt.rotation.float().T) * side
    if fmt.kind == "turbo_prod":  # the codec's arithmetic: mse decode, then the QJL estimate of the residual
        low = (codes & ((1 << fmt.mse_bits) - 1)).long()
        mse = (fmt.codebook.float()[low] @ fmt.rotation.float().T) * side[..., :1]
        pm1 = (codes >> fmt.mse_bits).float() * 2 - 1
        return mse + (pm1 @ fmt.sketch.float()) * (side[..., 1:] * (math.sqrt(math.pi / 2) / fmt.head_dim))
    values = codes.float() * side[..., :1] + side[..., 1:]
    return values if fmt.rotation is None else values @ fmt.rotation.float().T


def write_slots(cache: torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store rows ``(tokens, kv_heads, row_bytes)`` at flat slots ``block * block_size + offset`` (negative: skipped)."""
    flat = cache.view(-1, *cache.shape[2:])
    keep = slot_mapping >= 0
    flat[slot_mapping[keep].long()] = rows[keep]


def graph_capturing(x: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on ``x``'s device: host checks (syncs) must be skipped there, as a sync
    invalidates the capture; a captured graph's inputs are the caller's to keep in range."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def choose_splits(
    batch: int, kv_heads: int, capacity: int, block_n: int, num_sms: int = 132, waves: float = 2.0
) -> int:
    """Splits of the packed tokens so that ``batch * kv_heads * splits`` programs (CTAs) fill about ``waves`` waves of
    the GPU, each split at least 4 tiles of ``block_n`` tokens: the split-K of both decode kernels."""
    want = max(1, math.ceil(waves * num_sms / max(1, batch * kv_heads)))
    return max(1, min(want, math.ceil(capacity / (4 * block_n))))
