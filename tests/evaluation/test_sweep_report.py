"""`kvpack.evaluation.sweep_report`: a row's configuration columns, the tables and the CSV."""

import csv
import json

from kvpack.evaluation.sweep_config import SweepConfig
from kvpack.evaluation.sweep_report import CONFIG_COLUMNS, config_columns, format_markdown, write_csv

METRICS = {"bits_k": 5.0, "bits_v": 3.0, "bits_per_value": 4.0, "ppl_ref": 10.0, "ppl": 10.1, "delta_ppl_pct": 1.0,
           "delta_ppl_pct_std": 0.1, "top1": 0.97, "kl": 0.01, "verdict": "MARGINAL"}  # fmt: skip


def test_config_columns_in_order_and_jsonable():
    config = SweepConfig("a", "int:4", "e8:3", 8, skip_layers=(2, 0), head_keys=(None, ("e8:3", None)))
    columns = config_columns(config)
    assert tuple(columns) == CONFIG_COLUMNS
    assert columns["skip_layers"] == [0, 2] and columns["head_keys"] == [None, ["e8:3", None]]
    assert json.loads(json.dumps(columns)) == columns and columns["kind"] == "kvpack" and columns["peer"] is None
    peer = config_columns(SweepConfig("peer fp8", peer="fp8"))
    assert (peer["kind"], peer["peer"], peer["key"], peer["residual"], peer["layer_keys"]) == ("peer", "fp8", None,
                                                                                             128, [])  # fmt: skip


def test_csv_and_markdown(tmp_path):
    rows = [{**config_columns(SweepConfig(n, "int:4", layer_keys=("e8:3",))), **METRICS, "bits_per_value": b}
            for n, b in (("b", 4.5), ("a", 3.0))]  # fmt: skip
    path = tmp_path / "rows.csv"
    write_csv(rows, path)
    with open(path) as f:
        read = list(csv.DictReader(f))
    assert [r["name"] for r in read] == ["b", "a"] and read[0]["layer_keys"] == '["e8:3"]'
    assert list(read[0]) == list(rows[0])
    table = format_markdown(rows).splitlines()
    assert table[2].startswith("| `a` | 5.000 | 3.000 | 3.000 |") and table[3].startswith("| `b` ")
