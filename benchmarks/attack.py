"""Adversarial attack on kvpack's public surfaces (issue 14's re-attack): generated bad inputs, classified.

``python benchmarks/attack.py --json out.json [--seed 0] [--only codecs,decode,...]`` runs, on the CPU and a tiny
random Llama (`tests/tiny_models.py`), cases of these classes: codecs' encode/decode and corrupted `Packed`
objects (``codecs``), the paged decode and its reference (``decode``; a few through ``TRITON_INTERPRET=1`` in
subprocesses, so that a process death is seen), saved caches (``persist``), policies and policy files
(``policy``), the cache API (``cache``) and the CLI (``cli``; in-process and a few subprocesses).

Each case ends in one outcome:

- ``clear``: ``ValueError``/``TypeError`` raised by kvpack itself (``OSError`` for a bad path,
  ``NotImplementedError`` for a documented limit), or for the CLI exit status 2 ending in one ``error:`` line;
- ``correct``: a result equal (to the stated tolerance) to the truth the harness computes on its own;
- ``documented``: a wrong but finite result where the docs say so (a flipped bit in code bytes or side data);
- ``crash``: any other exception, or one of those types raised inside torch/transformers instead of kvpack
  (an unchecked input reaching a library), or CLI exit status 1 / a traceback;
- ``death``: a subprocess killed by a signal;
- ``silent_wrong``: a finite result that differs from the truth for a structurally corrupt input, or NaN/Inf;
- ``late_error``: a clear error, but only after work started (a policy that fails mid-forward);
- ``false_error``: an error on a valid input.

The first three are clean. The cases are generated from ``--seed`` (same seed, same cases).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # unknown models must fail fast, offline
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(Path(__file__).resolve().parent)]

import torch

CLEAN = ("clear", "correct", "documented")
OUTCOMES = ("clear", "correct", "documented", "crash", "death", "silent_wrong", "late_error", "false_error")
CLEAR_TYPES = (ValueError, TypeError)
PATH_TYPES = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)
HARNESS = ("benchmarks/attack", "<string>")
MEMORY_LIMIT = 8 * 2**30  # address space of the harness and its subprocesses


class Wrong(Exception):
    """A check of a result against the truth failed: a silent wrong answer."""


class Late(Exception):
    """A clear error, raised after work started."""


def raised_by_kvpack(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc`` is kvpack's (or the harness's: a call's own signature error)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return True
    name = frames[-1].filename.replace(os.sep, "/")
    return "/kvpack/" in name and "site-packages" not in name or any(h in name for h in HARNESS)


class Attack:
    """Runs cases and records their outcomes."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.results: list[dict] = []

    def case(self, group: str, name: str, fn, expect: str = "error") -> str:
        """Run ``fn()``; it returns ``"correct"``/``"documented"`` or raises `Wrong`. ``expect``: ``"error"`` (the
        input is bad: an error is right, a result must still be the truth), ``"ok"`` (valid input) or ``"either"``."""
        detail = ""
        try:
            outcome = fn() or "correct"
        except Wrong as exc:
            outcome, detail = "silent_wrong", str(exc)
        except Late as exc:
            outcome, detail = "late_error", str(exc)
        except CLEAR_TYPES + PATH_TYPES + (NotImplementedError,) as exc:
            detail = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, PATH_TYPES) and not raised_by_kvpack(exc):  # a bad path's OSError is the right one
                outcome, detail = (
                    "crash",
                    detail + " [raised in " + traceback.extract_tb(exc.__traceback__)[-1].filename + "]",
                )
            else:
                outcome = "false_error" if expect == "ok" else "clear"
        except Exception as exc:  # noqa: BLE001 (classifying every failure is the point)
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            outcome, detail = "crash", f"{type(exc).__name__}: {exc} [{frame.filename}:{frame.lineno}]"
        self.results.append(
            {"group": group, "case": name, "outcome": outcome, "detail": " ".join(detail.split())[:400]}
        )
        return outcome

    def record(self, group: str, name: str, outcome: str, detail: str = "") -> None:
        self.results.append({"group": group, "case": name, "outcome": outcome, "detail": detail[:400]})


# ---- checks -------------------------------------------------------------------------------------------------


def finite(y: torch.Tensor, what: str) -> None:
    if y.numel() and not bool(torch.isfinite(y.float()).all()):
        raise Wrong(f"{what}: NaN/Inf in the result")


def same(y: torch.Tensor, truth: torch.Tensor, what: str, atol: float = 0.0, rtol: float = 0.0) -> str:
    finite(y, what)
    if tuple(y.shape) != tuple(truth.shape):
        raise Wrong(f"{what}: shape {tuple(y.shape)}, truth {tuple(truth.shape)}")
    if not torch.allclose(y.double(), truth.double(), atol=atol, rtol=rtol):
        raise Wrong(f"{what}: max |diff| {float((y.double() - truth.double()).abs().max()):.3g}")
    return "correct"


# ---- codecs -------------------------------------------------------------------------------------------------

CODEC_SPECS = [
    "fp16", "fp8", "int:4", "int:2", "int:8", "int:3:axis=channel,group=8", "int:4:axis=head",
    "int:4:group=8", "int:4:rotation=hadamard", "turbo_mse:1", "turbo_mse:3", "turbo_mse:4:rotation=hadamard",
    "turbo_prod:2", "turbo_prod:5", "qjl", "polar:3", "e8:3", "e8:2", "outlier_channels:4",
    "outlier_sparse:3", "outlier_sparse:4:mode=residual",
]  # fmt: skip


def codec_cases(a: Attack) -> None:
    import kvpack
    from kvpack.codec import Packed

    g = torch.Generator().manual_seed(a.seed)
    for spec in CODEC_SPECS:
        d = a.rng.choice([32, 64])
        codec = kvpack.get_codec(spec, head_dim=d)
        x = torch.randn(2, 3, 16, d, generator=g)
        packed = codec.encode(x)
        truth = codec.decode(packed)
        encode_cases(a, spec, codec, x, g)
        packed_cases(a, spec, codec, packed, truth, Packed)
    spec_cases(a)


def encode_cases(a: Attack, spec: str, codec, x: torch.Tensor, g: torch.Generator) -> None:
    d = codec.head_dim

    def roundtrip(inp, bound: float = 2.5):
        def run():
            y = codec.decode(codec.encode(inp)).detach()
            finite(y, "decode(encode(x))")
            if y.shape != inp.shape or y.dtype != inp.dtype:
                raise Wrong(f"decode gave {tuple(y.shape)} {y.dtype} for {tuple(inp.shape)} {inp.dtype}")
            ref = inp.detach().double()
            err = float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)) if ref.numel() else 0.0
            if err > bound:
                raise Wrong(f"relative error {err:.3g} > {bound}")
            return "correct"

        return run

    big = x * 0
    bad_inputs = {
        "list": [[0.0] * d],
        "int tensor": torch.ones(3, d, dtype=torch.int32),
        "bool tensor": torch.ones(3, d, dtype=torch.bool),
        "complex": torch.ones(3, d, dtype=torch.complex64),
        "0-dim": torch.tensor(1.0),
        "last dim +1": torch.randn(4, d + 1, generator=g),
        "last dim 1": torch.randn(4, 1, generator=g),
        "NaN": x.clone().index_put_((torch.tensor([0]),), torch.tensor(float("nan"))),
        "+Inf": x.clone().index_put_((torch.tensor([1]),), torch.tensor(float("inf"))),
        "-Inf one value": _set(x, (0, 0, 0, 0), float("-inf")),
        "3e38": _set(x, (1, 2, 3, 4), 3e38),
        "float64 1e300": _set(x.double(), (0, 1, 2, 3), 1e300),
        "numpy": x.numpy(),
        "None": None,
    }
    for name, inp in bad_inputs.items():
        a.case("codecs", f"{spec} encode {name}", lambda inp=inp: codec.decode(codec.encode(inp)) and "correct")
    for value in (1e5, 3e7, 65504.0, 65519.0, 6e4):
        a.case("codecs", f"{spec} encode huge {value:g} (float32)", roundtrip(_set(x, (0, 0, 5, 3), value)), "either")
    half = x.half()
    a.case("codecs", f"{spec} encode 65504 in float16", roundtrip(_set(half, (0, 1, 1, 1), 65504.0)), "either")
    a.case("codecs", f"{spec} encode -65504 bf16", roundtrip(_set(x.bfloat16(), (1, 1, 1, 1), -65504.0)), "either")
    for name, inp in {
        "zeros": big,
        "constant 7": big + 7,
        "denormal 1e-40": big + 1e-40,
        "mixed scales": x * torch.logspace(-4, 3, d),
        "non-contiguous": x.transpose(1, 2),
        "one token": x[:1, :1, :1],
        "no tokens": x[:, :, :0],
        "requires_grad": x.clone().requires_grad_(True),
        "float64": x.double(),
        "bfloat16": x.bfloat16(),
    }.items():
        bound = 1e9 if name in ("mixed scales",) else 2.5  # a vector spanning 7 decades: finiteness only
        a.case("codecs", f"{spec} encode {name}", roundtrip(inp, bound), "ok")


def _set(x: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    y = x.clone()
    y[index] = value
    return y


def packed_cases(a: Attack, spec: str, codec, packed, truth: torch.Tensor, Packed) -> None:
    import dataclasses

    def decodes(p, flip: bool = False):
        def run():
            y = codec.decode(p() if callable(p) else p)
            finite(y, "decode")
            if tuple(y.shape) == tuple(truth.shape) and torch.equal(y, truth):
                return "correct"
            if flip:
                return "documented"  # codec.py: a flipped bit in codes or a finite scale decodes wrong but finite
            raise Wrong(f"decode of a corrupt Packed returned a finite {tuple(y.shape)} tensor unlike the original")

        return run

    rep = dataclasses.replace
    shape = packed.shape
    lying = {
        "another codec's spec": lambda: rep(packed, codec="int:4" if spec != "int:4" else "fp16"),
        "spec with seed=1": lambda: rep(
            packed,
            codec=packed.codec
            + (",seed=1" if ":" in packed.codec.split(":", 1)[-1] and "=" in packed.codec else ":seed=1"),
        ),
        "shape dims swapped": lambda: rep(packed, shape=(shape[1], shape[0], *shape[2:])),
        "shape tokens +1": lambda: rep(packed, shape=(*shape[:-2], shape[-2] + 1, shape[-1])),
        "shape tokens -1": lambda: rep(packed, shape=(*shape[:-2], shape[-2] - 1, shape[-1])),
        "shape head_dim*2": lambda: rep(packed, shape=(*shape[:-1], shape[-1] * 2)),
        "shape extra dim": lambda: rep(packed, shape=(1, *shape)),
        "shape dropped dim": lambda: rep(packed, shape=shape[1:]),
        "shape flattened": lambda: rep(packed, shape=(shape[0] * shape[1] * shape[2], shape[3])),
        "shape negative": lambda: rep(packed, shape=(-1, *shape[1:])),
        "shape float": lambda: rep(packed, shape=(2.0, *shape[1:])),
        "shape empty": lambda: rep(packed, shape=()),
        "shape None": lambda: rep(packed, shape=None),
        "dtype int32": lambda: rep(packed, dtype=torch.int32),
        "dtype float8": lambda: rep(packed, dtype=torch.float8_e4m3fn),
        "dtype str": lambda: rep(packed, dtype="float32"),
        "dtype float16 (declared)": lambda: rep(packed, dtype=torch.float16),
        "data None": lambda: rep(packed, data=None),
        "data list": lambda: rep(packed, data=list(packed.data.values())),
        "no data": lambda: rep(packed, data={}),
        "extra field": lambda: rep(packed, data={**packed.data, "extra": torch.zeros(1)}),
        "codec None": lambda: rep(packed, codec=None),
        "not a Packed (dict)": lambda: dict(packed.data),
    }
    for name, make in lying.items():
        expect = "ok" if name == "dtype float16 (declared)" else "error"
        if name == "dtype float16 (declared)":
            a.case(
                "codecs",
                f"{spec} Packed {name}",
                lambda make=make: same(codec.decode(make()).float(), truth.half().float(), "declared f16"),
                expect,
            )
            continue
        a.case("codecs", f"{spec} Packed {name}", decodes(make), expect)
    for key, t in packed.data.items():
        others = {k: v for k, v in packed.data.items() if k != key}
        variants = {
            "missing": lambda others=others: rep(packed, data=others),
            "renamed": lambda t=t, key=key, others=others: rep(packed, data={**others, key + "_x": t}),
            "as float32": lambda t=t, key=key, others=others: rep(packed, data={**others, key: t.float()}),
            "as int64": lambda t=t, key=key, others=others: rep(packed, data={**others, key: t.long()}),
            "bytes reinterpreted": lambda t=t, key=key, others=others: rep(
                packed, data={**others, key: _reinterpret(t)}
            ),
            "last row cut": lambda t=t, key=key, others=others: rep(
                packed, data={**others, key: t[..., :-1, :] if t.dim() > 1 else t[:-1]}
            ),
            "last dim cut": lambda t=t, key=key, others=others: rep(packed, data={**others, key: t[..., :-1]}),
            "flattened": lambda t=t, key=key, others=others: rep(packed, data={**others, key: t.reshape(-1)}),
            "extra dim": lambda t=t, key=key, others=others: rep(packed, data={**others, key: t.unsqueeze(0)}),
            "numpy": lambda t=t, key=key, others=others: rep(packed, data={**others, key: t.numpy()}),
            "meta device": lambda t=t, key=key, others=others: rep(packed, data={**others, key: t.to("meta")}),
            "all 0xFF bytes": lambda t=t, key=key, others=others: rep(
                packed, data={**others, key: _fill_bytes(t, 0xFF)}
            ),
            "all zero bytes": lambda t=t, key=key, others=others: rep(packed, data={**others, key: _fill_bytes(t, 0)}),
        }
        if t.is_floating_point():
            variants["one NaN"] = lambda t=t, key=key, others=others: rep(
                packed, data={**others, key: _flat_set(t, 0, float("nan"))}
            )
            variants["one Inf"] = lambda t=t, key=key, others=others: rep(
                packed, data={**others, key: _flat_set(t, -1, float("inf"))}
            )
            variants["one 6e4"] = lambda t=t, key=key, others=others: rep(
                packed, data={**others, key: _flat_set(t, 1, 6e4)}
            )
        for vname, make in variants.items():
            flip = vname in ("all 0xFF bytes", "all zero bytes", "one 6e4") and t.numel() > 0
            kind = "either" if flip or vname == "non-contiguous" else "error"
            a.case("codecs", f"{spec} tensor {key} {vname}", decodes(make, flip), kind)
        a.case(
            "codecs",
            f"{spec} tensor {key} non-contiguous",
            decodes(lambda t=t, o=others, key=key: rep(packed, data={**o, key: _noncontig(t)})),
            "ok",
        )
        for _ in range(4):  # bit flips at random positions
            n = t.numel() * t.element_size()
            if not n:
                continue
            pos, bit = a.rng.randrange(n), a.rng.randrange(8)
            a.case("codecs", f"{spec} tensor {key} bit flip byte {pos} bit {bit}",
                   decodes(lambda t=t, o=others, pos=pos, bit=bit, key=key: rep(packed, data={**o, key: _flip(t, pos, bit)}), True),
                   "either")  # fmt: skip


def _reinterpret(t: torch.Tensor) -> torch.Tensor:
    """The same bytes under another dtype of the same width (uint8 <-> int8, float16 <-> bfloat16)."""
    other = {torch.uint8: torch.int8, torch.int8: torch.uint8, torch.float16: torch.bfloat16,
             torch.bfloat16: torch.float16, torch.int16: torch.float16, torch.float32: torch.int32,
             torch.int32: torch.float32, torch.int64: torch.float64}.get(t.dtype, torch.uint8)  # fmt: skip
    return t.contiguous().view(other) if other != torch.uint8 else t.contiguous().view(torch.uint8)


def _fill_bytes(t: torch.Tensor, byte: int) -> torch.Tensor:
    y = t.clone().contiguous()
    y.view(torch.uint8).fill_(byte)
    return y


def _flat_set(t: torch.Tensor, i: int, value: float) -> torch.Tensor:
    y = t.clone()
    if y.numel():
        y.view(-1)[i] = value
    return y


def _flip(t: torch.Tensor, pos: int, bit: int) -> torch.Tensor:
    y = t.clone().contiguous()
    y.reshape(-1).view(torch.uint8)[pos] ^= 1 << bit
    return y


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    if t.dim() < 2:
        return t.clone()
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)  # same shape and values, other strides


def spec_cases(a: Attack) -> None:
    import kvpack

    bad = ["", "nope", "int:9", "int:x", "int:4:axis=bogus", "int:4:group=5", "int:4:group=-1", "int:4:axis",
           "int:4:a=1:b=2", "turbo_mse:3:rotation=xyz", "turbo_mse:0", "qjl:2", "fp16:4", "e8:3:rotation=1",
           "outlier_sparse:4:count=99", "outlier_sparse:4:inner=nope", "outlier_channels:4:channels=0",
           "outlier_channels:4:inner=outlier_channels", "polar:3:levels=0", "calibrated:3", "int:4:seed=-1",
           "int:4:seed=x", "int:4:seed=1.5", "int:99999999999999999999", "int:4:group=1e3", "int:4:axis=channel,group=0.5"]  # fmt: skip
    for spec in bad:
        a.case("codecs", f"get_codec {spec!r}", lambda spec=spec: kvpack.get_codec(spec, head_dim=32) and None)
    for name, kwargs in {"head_dim 0": {"head_dim": 0}, "head_dim -4": {"head_dim": -4}, "head_dim 1.0": {"head_dim": 1.0},
                         "head_dim True": {"head_dim": True}, "head_dim '32'": {"head_dim": "32"}, "bits '4'": {"head_dim": 32, "bits": "4"},
                         "bits 4.0": {"head_dim": 32, "bits": 4.0}, "seed 2**70": {"head_dim": 32, "seed": 2**70},
                         "head_dim 24 e8": {"head_dim": 24}, "head_dim 7": {"head_dim": 7}}.items():  # fmt: skip
        for spec in ("int:4", "turbo_mse:3", "e8:3", "polar:3", "turbo_prod:3", "qjl"):

            def run(spec=spec, kwargs=kwargs):
                c = kvpack.get_codec(spec, **kwargs)
                x = torch.randn(2, 4, c.head_dim)
                return roundtrip_ok(c, x)

            a.case("codecs", f"get_codec {spec} {name}", run, "either")


def roundtrip_ok(codec, x: torch.Tensor) -> str:
    y = codec.decode(codec.encode(x))
    finite(y, "roundtrip")
    err = float((y - x).norm() / x.norm())
    if err > 2.5:
        raise Wrong(f"relative error {err:.3g}")
    return "correct"


# ---- paged decode ---------------------------------------------------------------------------------------------


def make_decode_case(spec: str, seed: int, batch=3, hq=4, hkv=2, d=32, block=16, num_blocks=12, window=6):
    """Pools filled through the codec, the truth computed from the codec's own decode (float64 attention)."""
    import kvpack
    from kvpack.kernels.paged import paged_codec, rows_from_packed

    g = torch.Generator().manual_seed(seed)
    codec = kvpack.get_codec(spec, head_dim=d, seed=seed)
    fmt = paged_codec(codec)
    max_blocks = 4
    perm = torch.randperm(num_blocks, generator=g)[: batch * max_blocks].reshape(batch, max_blocks).int()
    seq_lens = torch.randint(1, max_blocks * block + 1, (batch,), generator=g).int()
    window_lens = torch.randint(0, window + 1, (batch,), generator=g).int()
    kc = torch.randint(0, 256, (num_blocks, block, hkv, fmt.row_bytes), dtype=torch.uint8, generator=g)
    kc[..., fmt.code_bytes :] = 0  # garbage codes, zero side data in unused rows (finite)
    vc = kc.clone()
    keys_true, values_true = [], []
    for b in range(batch):
        n = int(seq_lens[b])
        k = torch.randn(n, hkv, d, generator=g)
        v = torch.randn(n, hkv, d, generator=g)
        pk, pv = codec.encode(k), codec.encode(v)
        keys_true.append(codec.decode(pk).double())
        values_true.append(codec.decode(pv).double())
        rk, rv = rows_from_packed(pk, fmt), rows_from_packed(pv, fmt)
        for t in range(n):
            blk = int(perm[b, t // block])
            kc[blk, t % block], vc[blk, t % block] = rk[t], rv[t]
    q = torch.randn(batch, hq, d, generator=g).half()
    wk = torch.randn(batch, window, hkv, d, generator=g).half()
    wv = torch.randn(batch, window, hkv, d, generator=g).half()
    inputs = {"query": q, "key_cache": kc, "value_cache": vc, "block_tables": perm, "seq_lens": seq_lens,
              "window_keys": wk, "window_values": wv, "window_lens": window_lens, "fmt": fmt}  # fmt: skip
    return inputs, (keys_true, values_true)


def decode_truth(inputs: dict, true_kv) -> torch.Tensor:
    q, wk, wv = inputs["query"].double(), inputs["window_keys"].double(), inputs["window_values"].double()
    batch, hq, d = q.shape
    hkv = wk.shape[2]
    outs = []
    for b in range(batch):
        w = int(inputs["window_lens"][b])
        k = torch.cat([true_kv[0][b], wk[b, :w]]).transpose(0, 1).repeat_interleave(hq // hkv, 0)
        v = torch.cat([true_kv[1][b], wv[b, :w]]).transpose(0, 1).repeat_interleave(hq // hkv, 0)
        p = (torch.einsum("hd,htd->ht", q[b], k) / d**0.5).softmax(-1)
        outs.append(torch.einsum("ht,htd->hd", p, v))
    return torch.stack(outs)


def call_decode(inputs: dict, fn_name: str = "decode", use_kernel: bool = False) -> torch.Tensor:
    from kvpack.kernels import attention

    i = dict(inputs)
    fmt = i.pop("fmt")
    kwargs = {"use_kernel": use_kernel} if fn_name == "decode" else {}
    return getattr(attention, fn_name)(
        i["query"], i["key_cache"], i["value_cache"], i["block_tables"], i["seq_lens"], key_codec=fmt,
        value_codec=fmt, window_keys=i["window_keys"], window_values=i["window_values"],
        window_lens=i["window_lens"], **kwargs,
    )  # fmt: skip


def decode_mutations(inputs: dict, rng: random.Random) -> dict:
    """name -> (mutated inputs, expect): structural corruption expects an error; harmless edits the truth."""
    kc, bt, sl, wl = inputs["key_cache"], inputs["block_tables"], inputs["seq_lens"], inputs["window_lens"]
    nb, bs = kc.shape[0], kc.shape[1]
    cap = bt.shape[1] * bs
    out = {}

    def m(name, expect="error", **changes):
        out[name] = ({**inputs, **changes}, expect)

    b = rng.randrange(bt.shape[0])
    for bad in (nb, nb + 3, -1, -nb, 2**31 - 1, -(2**31), 10**6):
        t = bt.clone()
        t[b, 0] = bad
        m(f"block id {bad} (reached)", block_tables=t)
        t = bt.clone()
        t[b, -1] = bad
        m(
            f"block id {bad} (past seq_lens[{b}]={int(sl[b])})",
            "either" if int(sl[b]) <= (bt.shape[1] - 1) * bs else "error",
            block_tables=t,
        )
    for bad in (cap + 1, cap * 10, -1, 2**31 - 1):
        s = sl.clone()
        s[b] = bad
        m(f"seq_lens {bad}", seq_lens=s)
    for bad in (inputs["window_keys"].shape[1] + 1, -3, 2**31 - 1):
        w = wl.clone()
        w[b] = bad
        m(f"window_lens {bad}", window_lens=w)
    z = sl.clone()
    z[b] = 0
    zw = wl.clone()
    zw[b] = 0
    m("seq_lens and window_lens 0", seq_lens=z, window_lens=zw)
    m("seq_lens 0 window only", "ok", seq_lens=z, window_lens=wl.clamp_min(1))
    m("block_tables int64", block_tables=bt.long())
    m("block_tables float", block_tables=bt.float())
    m("block_tables 1-D", block_tables=bt.flatten())
    m("block_tables one row short", block_tables=bt[:-1])
    m("block_tables extra unused columns", "ok", block_tables=torch.cat([bt, torch.full_like(bt, -7)], 1))
    m("block_tables non-contiguous", "ok", block_tables=bt.t().contiguous().t())
    m("seq_lens int64", seq_lens=sl.long())
    m("seq_lens (B,1)", seq_lens=sl[:, None])
    m("seq_lens list", seq_lens=sl.tolist())
    m("window_lens float", window_lens=wl.float())
    m("query float32", query=inputs["query"].float())
    m("query bfloat16", "ok", query=inputs["query"].bfloat16(), window_keys=inputs["window_keys"].bfloat16(),
      window_values=inputs["window_values"].bfloat16())  # fmt: skip
    m("query (B, D)", query=inputs["query"][:, 0])
    m("query head_dim 64", query=torch.randn(*inputs["query"].shape[:2], 64).half())
    m("query 3 heads (not multiple of kv)", query=inputs["query"][:, :3])
    m("query batch +1", query=torch.cat([inputs["query"], inputs["query"][:1]]))
    m("query NaN", query=_set(inputs["query"], (b, 0, 0), float("nan")))
    m("query Inf", query=_set(inputs["query"], (b, 1, 3), float("inf")))
    m("query 6e4", "either", query=_set(inputs["query"], (b, 1, 3), 6e4))
    m(
        "window NaN (valid row)",
        window_keys=_set(inputs["window_keys"], (b, 0, 0, 0), float("nan")),
        window_lens=wl.clamp_min(1),
    )
    m("window NaN (beyond window_lens)", "ok", window_keys=_set(inputs["window_keys"], (b, -1, 0, 0), float("nan")),
      window_lens=wl.clamp_max(inputs["window_keys"].shape[1] - 1))  # fmt: skip
    m("window float32", window_keys=inputs["window_keys"].float(), window_values=inputs["window_values"].float())
    m("window keys/values dtypes differ", window_values=inputs["window_values"].bfloat16())
    m(
        "window kv_heads wrong",
        window_keys=inputs["window_keys"][:, :, :1],
        window_values=inputs["window_values"][:, :, :1],
    )
    m("window non-contiguous", window_keys=inputs["window_keys"].transpose(0, 1).contiguous().transpose(0, 1))
    m("key_cache int8", key_cache=kc.view(torch.int8))
    m("key_cache row bytes -4", key_cache=kc[..., :-4].contiguous())
    m("key_cache 3-D", key_cache=kc.flatten(0, 1))
    m("key/value pools differ in blocks", value_cache=inputs["value_cache"][:-1].contiguous())
    m("key_cache non-contiguous", key_cache=kc.transpose(0, 1).contiguous().transpose(0, 1))
    m("key_cache on meta", key_cache=kc.to("meta"))
    for name, byte in (
        ("side data NaN", (0x00, 0x7E)),
        ("side data Inf", (0x00, 0x7C)),
        ("side data 6e4", (0x80, 0x7B)),
    ):
        kc2 = kc.clone()
        t0 = 0
        blk = int(bt[b, t0 // bs])
        fmt = inputs["fmt"]
        kc2[blk, t0 % bs, 0, fmt.code_bytes] = byte[0]
        kc2[blk, t0 % bs, 0, fmt.code_bytes + 1] = byte[1]
        m(f"pool {name} (reached row)", "either", key_cache=kc2)
    return out


def decode_cases(a: Attack) -> None:
    for spec in ("int:4", "turbo_mse:3", "turbo_prod:3", "int:2:rotation=hadamard"):
        inputs, true_kv = make_decode_case(spec, a.seed)
        truth = decode_truth(inputs, true_kv)
        for fn_name in ("decode", "decode_ref"):
            a.case("decode", f"{spec} {fn_name} valid",
                   lambda fn_name=fn_name, i=inputs, t=truth: same(call_decode(i, fn_name).float(), t, "valid", 2e-2, 2e-2), "ok")  # fmt: skip
            for name, (mutated, expect) in decode_mutations(inputs, a.rng).items():

                def run(mutated=mutated, fn_name=fn_name, name=name, truth=truth, true_kv=true_kv):
                    y = call_decode(mutated, fn_name)
                    if "6e4" in name or "pool side" in name:
                        finite(y, name)
                        return "documented" if "pool" in name else "correct"
                    if name.startswith("query bfloat16") or "seq_lens 0" in name and "window only" in name:
                        return same(y.float(), decode_truth(mutated, _cut(true_kv, mutated)), name, 3e-2, 3e-2)
                    return same(y.float(), truth, name, 2e-2, 2e-2)

                a.case("decode", f"{spec} {fn_name} {name}", run, expect)
    bad_call_cases(a)
    interpreter_cases(a)


def _cut(true_kv, inputs):
    lens = inputs["seq_lens"].tolist()
    return [t[:n] for t, n in zip(true_kv[0], lens)], [t[:n] for t, n in zip(true_kv[1], lens)]


def bad_call_cases(a: Attack) -> None:
    from kvpack.kernels import attention
    from kvpack.kernels.paged import PagedCodec

    inputs, _ = make_decode_case("int:4", a.seed + 1)
    i = dict(inputs)
    fmt = i.pop("fmt")
    base = {"key_codec": fmt, "value_codec": fmt, "window_keys": i["window_keys"], "window_values": i["window_values"],
                "window_lens": i["window_lens"]}  # fmt: skip
    pos = (i["query"], i["key_cache"], i["value_cache"], i["block_tables"], i["seq_lens"])
    cases = {
        "key_codec None": {**base, "key_codec": None},
        "window_keys only": {"key_codec": fmt, "value_codec": fmt, "window_keys": i["window_keys"]},
        "scale string": {**base, "scale": "x"},
        "scale NaN": {**base, "scale": float("nan")},
        "scale 0": {**base, "scale": 0.0},
        "num_splits 0": {**base, "num_splits": 0},
        "kernel bogus": {**base, "kernel": "bogus"},
        "out wrong shape": {**base, "out": torch.empty(1)},
        "codec head_dim 64": {**base, "key_codec": PagedCodec("int", 64, 4)},
        "value codec turbo vs int pool": {**base, "value_codec": PagedCodec("int", 32, 2)},
    }
    for name, kwargs in cases.items():
        for fn_name in ("decode", "decode_ref"):
            kw = dict(kwargs)
            if fn_name == "decode_ref":
                for k in ("num_splits", "kernel", "out"):
                    if k in kw:
                        kw = None
                        break
            if kw is None:
                continue
            a.case("decode", f"{fn_name} {name}",
                   lambda fn_name=fn_name, kw=kw: _finite_out(getattr(attention, fn_name)(*pos, **kw)), "error")  # fmt: skip
    for name, kwargs in {"kind bogus": {"kind": "x", "head_dim": 32, "bits": 4}, "head_dim 48": {"kind": "int", "head_dim": 48, "bits": 4},
                         "bits 8": {"kind": "int", "head_dim": 32, "bits": 8}, "turbo without codebook": {"kind": "turbo_mse", "head_dim": 32, "bits": 3},
                         "bits True": {"kind": "int", "head_dim": 32, "bits": True}}.items():  # fmt: skip
        a.case("decode", f"PagedCodec {name}", lambda kwargs=kwargs: PagedCodec(**kwargs) and None)
    a.case("decode", "decode use_kernel=True on CPU without TRITON_INTERPRET",
           lambda: _finite_out(attention.decode(*pos, **base, use_kernel=True)), "either")  # fmt: skip


def _finite_out(y) -> str:
    finite(y, "decode")
    return "correct"


INTERP_SCRIPT = r"""
import sys, json, torch
sys.path[:0] = {paths!r}
import attack
inputs, true_kv = attack.make_decode_case({spec!r}, {seed})
muts = attack.decode_mutations(inputs, __import__("random").Random({seed}))
mutated, expect = muts[{name!r}] if {name!r} != "valid" else (inputs, "ok")
y = attack.call_decode(mutated, "decode", use_kernel=True)
truth = attack.decode_truth(inputs, true_kv)
print(json.dumps({{"finite": bool(torch.isfinite(y.float()).all()), "err": float((y.double() - truth).abs().max())}}))
"""


def interpreter_cases(a: Attack) -> None:
    """The Triton kernel through its interpreter, one subprocess per case: a bad load can kill the process."""
    import subprocess

    paths = [str(ROOT), str(ROOT / "tests"), str(Path(__file__).resolve().parent)]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(paths)}
    for spec, name in (("int:4", "valid"), ("turbo_mse:3", "valid"), ("int:4", "block id 1000000 (reached)"),
                       ("int:4", "block id -1 (reached)"), ("turbo_prod:3", "block id 12 (reached)"),
                       ("int:4", "seq_lens 2147483647"), ("int:4", "window_lens 7"), ("turbo_mse:3", "query NaN"),
                       ("int:4", "pool side data NaN (reached row)")):  # fmt: skip
        script = INTERP_SCRIPT.format(paths=paths, spec=spec, seed=a.seed, name=name)
        start = time.time()
        proc = subprocess.run(
            [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=300
        )
        case = f"{spec} decode kernel (TRITON_INTERPRET=1) {name}"
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        if proc.returncode < 0:
            a.record("decode", case, "death", f"signal {-proc.returncode}")
        elif proc.returncode != 0:
            clear = last.startswith(("ValueError", "TypeError")) and "kvpack" in proc.stderr.splitlines()[-3]
            outcome = ("false_error" if name == "valid" else "clear") if clear else "crash"
            a.record("decode", case, outcome, last)
        else:
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            ok = res["finite"] and res["err"] < 3e-2
            outcome = "correct" if ok else "silent_wrong"
            a.record("decode", case, outcome, f"{res} in {time.time() - start:.0f} s")


# ---- main -----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write every case and the counts to this file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="codecs,decode,persist,policy,cache,cli", help="comma-separated groups")
    args = parser.parse_args(argv)
    sys.modules.setdefault("attack", sys.modules[__name__])  # one module object: attack_io's Wrong is this one
    import attack_io

    groups = {"codecs": codec_cases, "decode": decode_cases, "persist": attack_io.persist_cases,
              "policy": attack_io.policy_cases, "cache": attack_io.cache_cases, "cli": attack_io.cli_cases}  # fmt: skip
    import resource

    # an unchecked length makes a reference allocate without bound: an allocation error (a crash), not the OOM killer
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, resource.getrlimit(resource.RLIMIT_AS)[1]))
    a = Attack(args.seed)
    torch.manual_seed(args.seed)
    times = {}
    for name in args.only.split(","):
        start = time.time()
        try:
            groups[name](a)
        except Exception as exc:  # noqa: BLE001 (the harness itself must not hide a group's failure)
            a.record(name, "<group setup>", "crash", f"{type(exc).__name__}: {exc} {traceback.format_exc()[-300:]}")
        times[name] = round(time.time() - start, 1)
        print(f"{name}: {sum(r['group'] == name for r in a.results)} cases in {times[name]} s", flush=True)
    counts = Counter(r["outcome"] for r in a.results)
    per_group = {g: dict(Counter(r["outcome"] for r in a.results if r["group"] == g)) for g in times}
    print(f"\n{len(a.results)} cases: " + ", ".join(f"{o} {counts.get(o, 0)}" for o in OUTCOMES))
    for g, c in per_group.items():
        print(f"  {g}: {c}")
    bad = [r for r in a.results if r["outcome"] not in CLEAN]
    for r in bad:
        print(f"[{r['outcome']}] {r['group']}: {r['case']} -- {r['detail']}")
    if args.json:
        doc = {"seed": args.seed, "counts": {o: counts.get(o, 0) for o in OUTCOMES}, "per_group": per_group,
               "seconds": times, "cases": a.results}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
