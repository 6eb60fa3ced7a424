"""`kvpack.evaluation.sweep_config`: a `SweepConfig` carries a `CachePolicy` (or a preset or a peer)."""

import dataclasses

import pytest

from kvpack.evaluation.sweep_config import (
    CONFIG_FIELDS,
    NO_POLICY,
    SWEPT_FIELDS,
    SweepConfig,
    config_from_dict,
)
from kvpack.policy import CachePolicy


def test_swept_fields_are_the_policys_but_seed_and_window_dtype():
    names = [f.name for f in dataclasses.fields(CachePolicy)]
    assert list(SWEPT_FIELDS) == [n for n in names if n not in ("seed", "window_dtype")]
    assert CONFIG_FIELDS == ("name", *SWEPT_FIELDS, "preset")


def test_a_config_carries_its_policy():
    config = SweepConfig("a", "int:4", residual=8, layer_keys=("e8:3", None))
    assert config.policy == CachePolicy("int:4", None, 8, layer_keys=("e8:3", None))  # value: None, not fp16
    assert (config.key, config.value, config.residual, config.layer_keys) == ("int:4", None, 8, ("e8:3", None))
    assert CachePolicy(**config.policy_kwargs()) == config.policy and config.kind == "kvpack"
    assert SweepConfig("b", key="e8:3").value is None and SweepConfig("c", None, "int:2").key is None
    with pytest.raises(ValueError, match="bogus"):
        SweepConfig("d", "bogus:4")
    with pytest.raises(AttributeError, match="colour"):
        _ = config.colour


def test_presets_and_peers_read_as_no_policy():
    preset, peer = SweepConfig("p", preset="3bit"), SweepConfig("q", peer="quanto:4")
    assert preset.policy is None and preset.residual == NO_POLICY.residual == 128 and preset.key is None
    assert (preset.kind, peer.kind) == ("kvpack", "peer")
    with pytest.raises(ValueError, match="not a CachePolicy"):
        peer.policy_kwargs()
    with pytest.raises(ValueError, match="not both"):
        SweepConfig("x", preset="3bit", peer="fp8")
    with pytest.raises(ValueError, match="no CachePolicy arguments"):
        SweepConfig("x", "int:4", preset="3bit")
    with pytest.raises(TypeError, match="name"):
        SweepConfig("", preset="3bit")


def test_entry_name_keeps_its_order_and_the_policy_is_normalized():
    config = config_from_dict({"key": "int:4", "value": "none", "skip_layers": "3,1", "fp_heads": [[2, 1], [0, 0]]})
    assert config.name == "K=int:4 V=None r=128 s=4 skip=3,1 fp_heads=2"
    assert config.policy.skip_layers == (1, 3) and config.policy.fp_heads == ((0, 0), (2, 1))
    named = config_from_dict({"name": "mine", "head_values": [["int:4", "none"]], "pre_rope_keys": True})
    assert named.name == "mine" and named.head_values == (("int:4", None),) and named.pre_rope_keys
