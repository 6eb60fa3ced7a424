import json

import pytest
import torch

from kvpack.cli import main
from kvpack.evaluation.validate import inner_product_stats, measure, random_unit_vectors


def test_inner_product_stats_detects_shrinkage_and_not_noise():
    k = random_unit_vectors(20000, 64, 0)
    q = torch.randn(20000, 64, generator=torch.Generator().manual_seed(1))
    shrunk = inner_product_stats(k, 0.9 * k, q)
    assert shrunk["ip_slope"] == pytest.approx(0.9, abs=1e-6)
    noisy = inner_product_stats(k, k + 0.05 * torch.randn(k.shape, generator=torch.Generator().manual_seed(2)), q)
    assert abs(noisy["ip_z"]) < 4 and noisy["ip_slope"] == pytest.approx(1.0, abs=0.02)
    assert noisy["ip_corr"] < 1.0


def test_measure_fp8():
    r = measure("fp8", 64, n=2000, speed=False)
    assert r.bits_per_value == 8.25 and r.measured_bits == pytest.approx(8.25)
    assert 0 < r.mse < 1e-3
    assert r.shannon_ratio == pytest.approx(r.mse / 4**-8.25)


def test_cli_json(tmp_path, capsys):
    out = tmp_path / "v.json"
    assert (
        main(
            ["validate", "--codecs", "fp16", "fp8", "--head-dims", "64", "-n", "500", "--no-speed", "--json", str(out)]
        )
        == 0
    )
    rows = json.loads(out.read_text())
    assert [r["spec"] for r in rows] == ["fp16", "fp8"]
    assert "bits/val" in capsys.readouterr().out


def test_cli_errors(capsys):
    assert main(["validate", "--codecs", "nope", "-n", "100", "--no-speed"]) == 2
    assert "unknown codec 'nope'" in capsys.readouterr().err
    assert main(["validate", "-n", "1", "--no-speed"]) == 2


def test_ip_z_column_shows_the_shrinkage_of_turbo_mse():
    # turbo_mse shrinks inner products (slope < 1); with queries correlated with the keys the z column shows it
    report = measure("turbo_mse:2", 64, n=4000, speed=False)
    assert report.ip_slope < 0.95 and report.ip_z < -10


def test_cli_progress_names_each_codec_and_can_be_silenced(capsys):
    argv = ["validate", "--codecs", "fp16", "fp8", "--head-dims", "64", "-n", "500", "--no-speed"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "validate" in err and "fp8 d=64" in err
    assert main([*argv, "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "bits/val" in captured.out
