"""`kvpack.hf.persist_checks`: the header's structure and a layer's fields against its tensors, checked apart."""

import pytest
import torch

from kvpack.hf.persist_checks import DTYPES, check_order, check_parts, check_structure


def header(**changes):
    h = {"format": "kvpack-cache", "version": 2, "sha256": "0" * 64, "policy": {"key": "int:4"},
         "model": {"model_id": "m", "num_layers": 1, "num_kv_heads": 2, "head_dim": 16, "layer_kinds": [None]},
         "layers": [{"initialized": False}]}  # fmt: skip
    h.update(changes)
    return h


def test_structure_accepts_a_well_formed_header_and_names_what_is_wrong():
    check_structure(header())
    cases = [
        (header(extra=1), "unknown fields"),
        (header(version="2"), r"header.version must be int"),
        (header(layers=[{"initialized": True}]), r"layers\[0\]: missing fields"),
        (header(layers=["x"]), r"layers\[0\] must be an object"),
        (header(policy={"key": [[[["deep"]]]]}), "nests deeper"),
    ]
    bad_model = header()
    bad_model["model"] = {**bad_model["model"], "num_layers": True}
    cases.append((bad_model, "model.num_layers must be int"))
    bad_dtype = header(layers=[{"initialized": True, "cumulative_length": 0, "dtype": "torch.int8",
                                "held_dtype": "torch.float16", "chunks": []}])  # fmt: skip
    cases.append((bad_dtype, r"layers\[0\].dtype must be one of"))
    for h, match in cases:
        with pytest.raises(ValueError, match=match):
            check_structure(h)


def test_parts_and_order():
    held = DTYPES["torch.float16"]
    parts = {name: torch.zeros(3, 2, n, 16, dtype=held) for name, n in
             (("sink_keys", 2), ("sink_values", 2), ("keys", 5), ("values", 5))}  # fmt: skip
    assert check_parts(parts, held, (2, 16), "layers.0.") == 3
    with pytest.raises(ValueError, match="layers.0.values"):
        check_parts({**parts, "values": parts["values"].float()}, held, (2, 16), "layers.0.")
    with pytest.raises(ValueError, match="differ in shape"):
        check_parts({**parts, "values": parts["values"][..., :4, :]}, held, (2, 16), "layers.0.")
    check_order(None, 3, 3, 3, "c")
    check_order(torch.tensor([2, 0, 0]), 3, 3, 3, "c")
    with pytest.raises(ValueError, match="packed batch"):
        check_order(None, 2, 3, 3, "c")
    with pytest.raises(ValueError, match="int64"):
        check_order(torch.tensor([0, 1, 2], dtype=torch.int32), 3, 3, 3, "c")
    with pytest.raises(ValueError, match="outside 0..2"):
        check_order(torch.tensor([0, 3, 1]), 3, 3, 3, "c")
