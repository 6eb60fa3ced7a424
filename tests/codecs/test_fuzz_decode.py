"""Structurally corrupted `Packed` given to decode: only ValueError/TypeError, never another exception or a result."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack import get_codec
from kvpack.codecs.compose import IdentityCodec, PerHeadCodec

D = 32
SPECS = ["int:4", "turbo_mse:3", "e8:3", "outlier_sparse:4", "fp8"]
OTHER_DTYPES = [torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16, torch.float32, torch.bfloat16]


def make(name: str):
    if name == "per_head":
        return PerHeadCodec((get_codec("int:2", head_dim=D), None, get_codec("e8:3", head_dim=D)), D)
    if name == "none":
        return IdentityCodec(D)
    return get_codec(name, head_dim=D)


def corrupt(packed, how: str, data):
    """One structural corruption of ``packed``: the `Packed` no longer describes what its codec made."""
    names = sorted(packed.data)
    key = data.draw(st.sampled_from(names))
    t = packed.data[key]
    fields = dict(packed.data)
    if how == "drop":
        del fields[key]
    elif how == "extra":
        fields[data.draw(st.sampled_from(["junk", "g9.codes", f"{key}x"]))] = t.clone()
    elif how == "rename":
        fields[key + "_"] = fields.pop(key)
    elif how == "truncate":
        fields[key] = t.reshape(-1)[: max(t.numel() - 1, 0)]
    elif how == "reshape":
        fields[key] = t.reshape(-1) if t.dim() > 1 else t.unsqueeze(0)
    elif how == "dtype":
        fields[key] = t.to(data.draw(st.sampled_from([d for d in OTHER_DTYPES if d != t.dtype])))
    elif how == "shape":
        shape = list(packed.shape)
        k = data.draw(st.integers(0, len(shape) - 1))
        change = data.draw(st.sampled_from(["+1", "-1", "add", "drop"]))
        if change == "add":
            shape.insert(k, 1)
        elif change == "drop" and len(shape) > 1:
            shape.pop(k)
        else:
            shape[k] += 1 if change == "+1" or shape[k] == 0 else -1
        return dataclasses.replace(packed, shape=tuple(shape))
    elif how == "codec":
        return dataclasses.replace(packed, codec=data.draw(st.sampled_from(["int:3", "fp16", "heads[int:2]", ""])))
    elif how == "nonfinite":
        floats = [k for k in names if packed.data[k].is_floating_point()]
        if not floats:
            return None
        key = data.draw(st.sampled_from(floats))
        bad = fields[key].clone()
        bad.view(-1)[data.draw(st.integers(0, bad.numel() - 1))] = data.draw(
            st.sampled_from([float("nan"), float("inf")])
        )
        fields[key] = bad
    return dataclasses.replace(packed, data=fields)


@settings(max_examples=50, deadline=None)
@given(
    name=st.sampled_from([*SPECS, "per_head", "none"]),
    how=st.sampled_from(["drop", "extra", "rename", "truncate", "reshape", "dtype", "shape", "codec", "nonfinite"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    data=st.data(),
)
def test_fuzz_structurally_corrupted_packed_is_refused(name, how, dtype, data):
    codec = make(name)
    x = torch.randn(2, 3, 4, D, generator=torch.Generator().manual_seed(0)).to(dtype)
    packed = codec.encode(x)
    assert codec.decode(packed).shape == x.shape  # the uncorrupted one decodes
    if name == "none" and how == "nonfinite":
        return  # an uncompressed stream holds the model's values as they are: inf is data, not corruption
    with pytest.raises((ValueError, TypeError)):
        bad = corrupt(packed, how, data)
        if bad is None:
            raise ValueError("no float field to corrupt")
        codec.decode(bad)


@pytest.mark.parametrize("name", [*SPECS, "per_head"])
def test_out_of_range_index_and_group_tensors_named(name):
    codec = make(name)
    packed = codec.encode(torch.randn(2, 3, 4, D))
    if name == "outlier_sparse:4":
        fields = dict(packed.data, index=packed.data["index"].clone().fill_(D + 1))
        with pytest.raises(ValueError, match="indices outside"):
            codec.decode(dataclasses.replace(packed, data=fields))
    if name == "per_head":
        fields = {k: v for k, v in packed.data.items() if k != "g1.scale"}
        with pytest.raises(ValueError, match=r"group 1 \(heads \(2,\), 'e8:3'\)"):
            codec.decode(dataclasses.replace(packed, data=fields))
        with pytest.raises(ValueError, match="16-bit heads"):
            codec.encode(torch.full((1, 3, 1, D), 1e5))


def test_identity_checks_its_one_tensor():
    codec = IdentityCodec(D)
    packed = codec.encode(torch.randn(2, 5, D))
    with pytest.raises(ValueError, match="expected"):
        codec.decode(dataclasses.replace(packed, data={"values": packed.data["values"][:, :4]}))
    with pytest.raises(ValueError, match="'values'"):
        codec.decode(dataclasses.replace(packed, data={}))
