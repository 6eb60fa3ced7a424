"""kvpack calibrate: calibration spans disjoint from evaluation, capture of Q/K/V, Lloyd-Max fit, whitening."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvpack.evaluation.protocol import window_starts
from kvpack.tuning.calibrate import (
    EVAL_LENGTH,
    EVAL_WINDOW_COUNTS,
    calibration_ids,
    calibration_qkv,
    evaluation_spans,
    fit_calibration,
    lloyd_max_fit,
    save_calibration,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def windows(n=2, length=80, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (length,), generator=g) for _ in range(n)]


@pytest.mark.parametrize("n_tokens", [300_000, 40_000])
def test_calibration_windows_avoid_every_evaluation_window(n_tokens):
    ids = torch.arange(n_tokens)
    calib = calibration_ids(ids, 576, 4)
    assert len(calib) == 4 and all(w.numel() == 576 for w in calib)
    used = torch.zeros(n_tokens, dtype=torch.bool)
    for w in EVAL_WINDOW_COUNTS:
        if w * EVAL_LENGTH <= n_tokens:
            for s in window_starts(n_tokens, EVAL_LENGTH, w):
                used[s : s + EVAL_LENGTH] = True
    for w in calib:
        assert not used[w].any()
    assert evaluation_spans(n_tokens) == sorted(evaluation_spans(n_tokens))


def test_calibration_ids_errors():
    with pytest.raises(ValueError, match="avoid the evaluation windows"):
        calibration_ids(torch.arange(3000), 576, 8)
    with pytest.raises(ValueError, match=">= 1"):
        calibration_ids(torch.arange(3000), 0, 1)


def _mse(samples, levels):
    edges = (levels[:, 1:] + levels[:, :-1]) / 2
    idx = torch.searchsorted(edges.contiguous(), samples.contiguous())
    return ((samples - levels.gather(1, idx)) ** 2).mean().item()


def test_lloyd_max_fit_finds_the_gaussian_quantizer():
    samples = torch.randn(2, 200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # Max (1960): 2 levels +-0.7979 (MSE 0.3634), 4 levels +-0.4528, +-1.510 (MSE 0.1175)
    for table, mse in (([-0.7979, 0.7979], 0.3634), ([-1.510, -0.4528, 0.4528, 1.510], 0.1175)):
        fitted = lloyd_max_fit(samples, len(table))
        known = torch.tensor([table] * 2, dtype=torch.float64)
        # the distortion is flat near the optimum, so a sample's levels sit within ~0.02 of the table
        assert fitted == pytest.approx(known, abs=0.02)
        assert _mse(samples, fitted) <= _mse(samples, known) + 1e-12  # at least as good on its own data
        assert _mse(samples, fitted) == pytest.approx(mse, rel=0.01)
    with pytest.raises(ValueError, match="levels"):
        lloyd_max_fit(samples, 1)
    with pytest.raises(ValueError, match="samples"):
        lloyd_max_fit(samples[0], 4)


def test_capture_gives_the_cached_keys_and_the_values():
    model = tiny_llama()
    ws = windows(2)
    qkv = calibration_qkv(model, ws, skip=4)
    assert len(qkv) == 2 and model.config._attn_implementation == "sdpa"  # restored
    q, k, v = qkv[1]
    assert q.shape == (4, 2 * 76, 16) and k.shape == v.shape == (2, 2 * 76, 16)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(ws[0][None], past_key_values=cache)
    assert torch.allclose(k[:, :76], cache.layers[1].keys[0, :, 4:], atol=1e-6)  # post-RoPE, as cached
    assert torch.allclose(v[:, 76:].abs().sum(), v[:, 76:].abs().sum())
    with pytest.raises(ValueError, match="windows"):
        calibration_qkv(model, [torch.arange(3)])


def test_whitening_basis_measures_the_attention_score_error():
    model = tiny_llama()
    qkv = calibration_qkv(model, windows(2))
    tensors = fit_calibration(qkv, bits=(2,), progress=False)
    q = qkv[0][0]
    basis = tensors["layer0.k.whiten.basis"].double()
    err = torch.randn(2, 50, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for h in range(2):
        group = q[2 * h : 2 * h + 2].double().reshape(-1, 16)  # GQA: query heads 2h, 2h+1 read KV head h
        score_err = ((err[h] @ group.T) ** 2).mean(dim=1)  # mean over queries of (q . e)^2, per error vector
        assert torch.allclose(((err[h] @ basis[h]) ** 2).sum(-1), score_err, rtol=1e-4)
    assert "layer0.v.whiten.basis" not in tensors  # values are not whitened
    pca = tensors["layer1.v.pca.basis"].double()
    assert torch.allclose(pca[0].T @ pca[0], torch.eye(16, dtype=torch.float64), atol=1e-6)  # float32 stored
    assert tensors["layer1.k.rotation.codebook2"].shape == (2, 16, 4)
    with pytest.raises(ValueError, match="bits"):
        fit_calibration(qkv, bits=(5,))


def test_save_calibration_rejects_bad_names(tmp_path):
    with pytest.raises(ValueError, match="name"):
        save_calibration("a:b", {}, {}, tmp_path)
