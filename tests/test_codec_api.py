import pytest
import torch

import kvpack
from kvpack.codec import parse_spec


def test_parse_spec():
    assert parse_spec("turbo_mse:3") == ("turbo_mse", 3, {})
    assert parse_spec("int:4:axis=channel,group=32") == ("int", 4, {"axis": "channel", "group": 32})
    assert parse_spec("fp16") == ("fp16", None, {})
    assert parse_spec("qjl:sketch_dim=256") == ("qjl", None, {"sketch_dim": 256})
    with pytest.raises(ValueError, match="not an int"):
        parse_spec("int:x:axis=token:y")
    with pytest.raises(ValueError, match="key=value"):
        parse_spec("int:4:axis")


def test_unknown_codec_and_option():
    with pytest.raises(ValueError, match="unknown codec 'nope'"):
        kvpack.get_codec("nope", head_dim=64)
    with pytest.raises(ValueError, match="unknown option"):
        kvpack.get_codec("fp8", head_dim=64, color="red")
    with pytest.raises(ValueError, match="takes no bits"):
        kvpack.get_codec("fp16:4", head_dim=64)
    with pytest.raises(ValueError, match="head_dim"):
        kvpack.get_codec("fp16", head_dim=0)


def test_fp16_exact_and_fp8_close():
    x = torch.randn(3, 5, 64, dtype=torch.float16)
    c = kvpack.get_codec("fp16", head_dim=64)
    assert torch.equal(c.decode(c.encode(x)), x)
    c8 = kvpack.get_codec("fp8", head_dim=64)
    y = c8.decode(c8.encode(x.float()))
    assert (y - x.float()).norm() / x.float().norm() < 0.04


def test_decode_rejects_packed_of_other_codec():
    x = torch.randn(4, 64)
    p = kvpack.get_codec("fp8", head_dim=64).encode(x)
    with pytest.raises(ValueError, match="made by codec 'fp8'"):
        kvpack.get_codec("fp16", head_dim=64).decode(p)
    with pytest.raises(TypeError, match="kvpack.Packed"):
        kvpack.get_codec("fp8", head_dim=64).decode({"codes": 1})


def test_decode_checks_structure_before_work():
    import dataclasses

    codec = kvpack.get_codec("outlier_sparse:4", head_dim=64)
    packed = codec.encode(torch.randn(3, 64))
    with pytest.raises(ValueError, match="head_dim"):
        codec.decode(dataclasses.replace(packed, shape=(3, 32)))
    with pytest.raises(TypeError, match="float torch.dtype"):
        dataclasses.replace(packed, dtype=torch.int32)
    with pytest.raises(ValueError, match="expects"):
        codec.decode(dataclasses.replace(packed, data={k: v for k, v in packed.data.items() if k != "inner.zero"}))
    bad = dict(packed.data, index=packed.data["index"].clone().fill_(200))
    with pytest.raises(ValueError, match="indices outside"):
        codec.decode(dataclasses.replace(packed, data=bad))
    nan = dict(packed.data, values=packed.data["values"].clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        codec.decode(dataclasses.replace(packed, data=nan))


def test_fp_codecs_refuse_out_of_range_and_16bit_results_saturate():
    with pytest.raises(ValueError, match="float16 range"):
        kvpack.get_codec("fp16", head_dim=8).encode(torch.full((2, 8), 1e5))
    with pytest.raises(ValueError, match="fp8"):
        kvpack.get_codec("fp8", head_dim=8).encode(torch.full((2, 8), 3e7))
    x = torch.randn(4, 64).to(torch.float16)
    x[0, 3] = 65504
    y = kvpack.get_codec("int:8", head_dim=64).decode(kvpack.get_codec("int:8", head_dim=64).encode(x))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("spec", ["fp16", "int:4", "turbo_mse:3"])
def test_decode_refuses_packed_on_meta(spec):
    """A Packed whose tensors are on the meta device raised RuntimeError (Tensor.item on meta) in the checks."""
    import dataclasses

    codec = kvpack.get_codec(spec, head_dim=32)
    packed = codec.encode(torch.randn(3, 32))
    meta = dataclasses.replace(packed, data={k: v.to("meta") for k, v in packed.data.items()})
    with pytest.raises(ValueError, match="meta"):
        codec.decode(meta)
