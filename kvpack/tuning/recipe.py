"""Preset recipes: ``4bit`` / ``3bit`` / ``2.5bit`` derived for the model at hand, not a table of one model.

A recipe is a budget (``BUDGETS``: average bits per value of K and V as a `KVPackCache` holds them after a
prefill of ``BUDGET_CTX`` tokens, everything counted: 16-bit sinks and residual window, packed codes, scales
and norms) and a fixed cache shape (``SINKS`` attention sinks, a ``RESIDUAL``-token 16-bit window of the newest
tokens packed in blocks of ``BLOCK``). What varies per model is the codec of each (layer, stream), chosen from
``CANDIDATES`` (codecs the paged decode kernels read: ``turbo_mse`` 1-4 bits, ``int`` 2-4 bits with a Hadamard
rotation, ``int:8``; keys from ``KEY_CANDIDATES``, values from ``VALUE_CANDIDATES``) by the exact
multiple-choice knapsack of `kvpack.tuning.allocate` over a sensitivity table ``D[layer, stream, codec]``:

- ``calibration=True`` (default): ``D`` measured on the model (:func:`measure_sensitivity`): on
  ``CALIB_WINDOWS`` windows of the calibration text (`kvpack.evaluation.text.load_text(None)`, spans disjoint
  from the evaluation windows), a clean prefill of ``CALIB_CTX`` tokens stored with ONE layer's K or V through a
  candidate codec, the recipe's own sinks/residual/block, everything else exact, and ``CALIB_TOKENS`` tokens
  teacher-forced through it: mean KL(exact || compressed) per token. The result is cached as a policy file by
  model hash (:func:`model_hash`) under :func:`cache_dir` and reused.
- ``calibration=False``: ``D`` from the config alone (:func:`rule_sensitivity`): ``STREAM_WEIGHT[stream] *
  mse(codec, head_dim)``, the relative MSE of the codec on seeded Gaussian vectors of the model's head_dim
  (what `turbo_mse`'s rotation makes K/V look like), weighted per layer by the tokens the layer holds at the
  budget context (a sliding-window layer holds at most its window).

The budget is solved with the residual window included: the codec bits per value the knapsack may spend are
``(budget * held - 16 * held_16bit) / packed`` tokens, lowered until :func:`held_bits` (which mirrors
`KVPackLayer`'s accounting; tests check it against a real cache) is within the budget.

Why this shape. Measured on SmolLM2-135M (float32, CPU, 2026-12-01); "decode" numbers are generation-like
teacher forcing (clean prefill of 1024 tokens, then each of 256 tokens attends to the past as `KVPackCache`
holds it during `generate`: sinks, the 16-bit window, the packed blocks; checked against one-token-per-forward
decoding through `KVPackCache` to 1e-5 on a tiny model), WikiText-2 test, 2 windows:

- In-forward (every position attends to codec K/V, no residual window), K alone: ``turbo_mse:3`` +46% ppl
  (top-1 77.9%), ``int:3:rotation=hadamard`` +42% (78.5%), ``turbo_mse:4`` +9.3% (89.6%): K cannot be packed
  right up to the newest token at 3-4 bits, hence a 16-bit window of the newest tokens in every recipe.
- The calibration table (``D`` summed over layers, K over V at the same codec): 7.6x at ``turbo_mse:2``, 11x at
  ``turbo_mse:3``, 15.6x at ``turbo_mse:4``: K is the stream that needs the bits (``STREAM_WEIGHT`` of the rule
  sits in that range). The largest K entries are layers 18 and 20 (``turbo_mse:2``: 0.018, 0.021; most layers
  1e-3), the largest V entries layers 0 and 1 at 1 bit (0.018, 0.026): what calibration finds and the rule
  cannot see.
- On Gaussian vectors ``turbo_mse`` has a lower MSE than ``int`` with a Hadamard rotation at fewer bits per
  value (head_dim 64: ``turbo_mse:3`` 0.033 at 3.25 bits against ``int:3:rotation=hadamard`` 0.037 at 3.5; at
  4 bits 0.0091 at 4.25 against 0.0080 at 4.5) because ``int`` stores a scale and a zero per vector. On the
  model it is closer (pydoc text, decode, residual 16, one stream compressed, the other 16-bit; KL vs exact):
  K ``turbo_mse:4`` 0.0099 / ``int:4:rotation=hadamard`` 0.0074 (unrotated ``int:4`` 0.0163), ``turbo_mse:3``
  0.033 / ``int:3`` rotated 0.041, ``turbo_mse:2`` 0.176 / ``int:2`` rotated 0.609; V ``turbo_mse`` 4/3/2
  0.00077 / 0.0038 / 0.0247 against rotated ``int`` 0.00048 / 0.0024 / 0.0153. Rotated ``int`` also decodes
  about 1.6x faster than ``turbo_mse`` in the GPU kernel, so (``RECIPE_VERSION`` 2) the candidates are
  ``turbo_mse`` 1-4, rotated ``int`` 2-4 for values and 4 for keys (rotated int:2/int:3 lose to turbo_mse on K),
  and ``int:8`` for the few keys that need it; at 0.25 more bits per value the knapsack decides where int pays.
- The 16-bit window: K ``turbo_mse:4`` alone (V exact), decode: residual 0 +4.57% / top-1 90.0% / KL 0.041;
  residual 16 (block 16) +1.58% / 94.5% / KL 0.014. The old SmolLM2 ``4bit`` table (residual 0, block 1, e8 per
  head, 4.246 bits): +4.95% / 89.5% / KL 0.037 on the same windows.
- The recipes, decode, ctx 1024, n_eval 256, 2 windows (bits as held at 1024 tokens):
  calibrated ``4bit`` (4.250 bits) +2.31% / 94.7% / KL 0.0128; ``3bit`` (3.245) +4.50% / 87.3% / 0.051;
  ``2.5bit`` (2.486) +33.6% / 79.7% / 0.223. Rule ``4bit`` +2.59% / 94.7% / 0.0196; ``3bit`` +14.2% / 86.7% /
  0.109 (with weight 16 and 1-bit values allowed: +39%, V at 1 bit in 25 layers, hence the 1-bit exclusion);
  ``2.5bit`` (2.486, 1-bit values in every layer: the budget needs them) +119% / 65.6% / 0.684.
  Those are ``RECIPE_VERSION`` 1 (``turbo_mse`` and ``int:8`` only). Version 2 against version 1 on the
  shipped WikiText-2 excerpt (``--text wikitext2-excerpt``, other windows than the above), same protocol:
  ``4bit`` +2.73% / 94.7% / KL 0.0119 against +2.55% / 94.9% / 0.0139; ``3bit`` +6.47% / 89.7% / 0.052
  against +6.35% / 87.9% / 0.056; ``2.5bit`` +32.1% / 80.7% / 0.208 against +35.5% / 79.5% / 0.231; the
  embedded text, ``4bit``: +0.73% / 94.9% / 0.0077 against +1.23% / 95.1% / 0.0090 (KL lower in all four,
  delta-ppl and top-1 within the 2-window spread).
  All miss the SmolLM2 targets (4bit <= +0.5% / >= 97%, 3bit <= +1.5% / >= 94%, 2.5bit <= +5%): at head_dim
  64 the window, sink and block slack (32 16-bit tokens at 1024) cost 0.38-0.44 bits of the budget, leaving
  3.87 / 2.84 / 2.06 codec bits per value.
- Values (``RECIPE_VERSION`` 3): rotated ``int`` only, and ``turbo_mse:1``. The next-token KL after 512 tokens
  ranks ``turbo_mse`` and rotated ``int`` values alike (summed over layers, ``turbo_mse:3`` 0.0022, ``int:3``
  0.0017), but at 4K tokens far-token content goes through V and ``turbo_mse`` values lose it: passkey at 4096
  tokens (``kvpack needle``, depths 0/25/50/75%, 3 trials, K exact, residual 16, sinks 1, block 16), accuracy and
  the passkey's NLL (nats per token; uncompressed 100%, 0.333): V ``turbo_mse:2`` 33% / 0.584, ``:3`` 50% /
  0.414, ``:4`` 92% / 0.341; V rotated ``int:2`` 58% / 0.379, ``int:3`` 100% / 0.331, ``int:4`` 100% / 0.324.
  Rotated ``int`` at b bits keeps as much as ``turbo_mse`` at b + 1. Not the norm shrinkage alone: ``turbo_mse``
  decodes to ``(1 - mse) x`` on average (``<x^, x> / |x|^2`` 0.64 / 0.88 / 0.97 / 0.99 at 1-4 bits, rotated
  ``int`` 1.00), but storing the unbiased norm ``|x| / <y^, y>`` moved V ``turbo_mse:3`` only from 0/50/50% to
  0/50/100% at depths 0/25/50 (2 trials). On 8 windows of WikiText-2 (decode) the version-3 presets against
  version 2: ``4bit`` +1.54% / 93.95% / KL 0.0095 against +1.74% / 94.97% / 0.0088; ``3bit`` +3.87% / 87.99% /
  0.0424 against +4.79% / 88.77% / 0.0421; ``2.5bit`` +23.1% / 79.0% / 0.184 against +21.6% / 78.8% / 0.179.
- Keys relative to the prefill's mean key (``RECIPE_VERSION`` 4, ``CENTER_KEYS``; `CachePolicy.center_keys`). On
  SmolLM2 the mean key of a (layer, KV head) over a 1K WikiText-2 context holds 30-74% of a key's energy (median
  ~58%); a per-vector codec spends its range on it, and attention does not need it (``q . mu`` shifts every score
  of a query alike). Decode protocol, WikiText-2, 8 windows, K alone (V exact), residual 16, sinks 1, block 16,
  measured with a scratch codec that subtracted the first packed chunk's mean (2026-12-07): rotated ``int:4`` KL
  0.0083 -> 0.0049 (+0.83% -> +0.53% ppl, top-1 94.8% -> 96.7%), ``turbo_mse:4`` 0.0086 -> 0.0070,
  ``turbo_mse:3`` 0.0423 -> 0.0281, rotated ``int:3`` centered 0.0238 (below plain ``turbo_mse:3``). After a
  64-token prompt with 1024 tokens generated (4 windows), rotated ``int:4`` 0.0075 -> 0.0055. Alternatives
  measured and left out: a mean per 16-token block stored in 16 bits (KL 0.0025, but +1 bit per value: at equal
  bits worse than a wider codec) and a running mean over all packed keys (0.0045; 0.0041 after a short prompt),
  which would need a mean per segment of tokens in the kernels; one frozen mean needs none, because the paged
  caches shift the 16-bit window by ``-mu`` instead. Rotated ``int:3`` joins the key candidates. The presets,
  decode, 8 windows of WikiText-2 (``kvpack eval --preset P --windows 8 --text wikitext2-test.txt``): ``4bit``
  +1.01% / 94.92% / KL 0.0074 at 4.242 bits (version 3: +1.54% / 93.95% / 0.0095 at 4.250), ``3bit`` +4.92% /
  91.16% / 0.0308 (+3.87% / 87.99% / 0.0424), ``2.5bit`` +17.0% / 83.06% / 0.127 (+23.1% / 79.0% / 0.184); without
  the ``int:3`` keys 4bit +1.11% / 95.75% / 0.0076, 3bit +4.92% / 90.82% / 0.0309, 2.5bit +18.5% / 82.8% / 0.138.
  K over V in the centered calibration table, both rotated ``int:4``: 9.2x (``STREAM_WEIGHT`` 11 kept).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import safetensors.torch
import torch

from kvpack.codec import get_codec
from kvpack.hf.cache import layer_kinds
from kvpack.hf.config import model_heads, text_config
from kvpack.ops.rotation import hadamard_takes
from kvpack.policy import FP16_BITS, CachePolicy, layer_bits, load_policy, save_policy
from kvpack.tuning import sensitivity
from kvpack.tuning.knapsack import BudgetTooSmall, allocate_bits, policy_for

__all__ = [
    "BUDGETS",
    "BUDGET_CTX",
    "CANDIDATES",
    "RECIPE_VERSION",
    "cache_dir",
    "calibrated_policy",
    "candidates_for",
    "held_bits",
    "measure_sensitivity",
    "model_hash",
    "recipe_policy",
    "rule_policy",
    "rule_sensitivity",
    "solve_budget",
]

logger = logging.getLogger(__name__)

RECIPE_VERSION = 4  # part of the cache key: a new recipe never reads an old recipe's cached policy
BUDGETS = {"4bit": 4.25, "3bit": 3.25, "2.5bit": 2.5}
BUDGET_CTX = 1024
SINKS = 1
RESIDUAL = 16
BLOCK = 16
CENTER_KEYS = True  # keys packed relative to the prefill's mean key (`CachePolicy.center_keys`; docstring)
_INT_ROTATED = tuple(f"int:{b}:rotation=hadamard" for b in (2, 3, 4))
CANDIDATES = ("turbo_mse:1", "turbo_mse:2", "turbo_mse:3", "turbo_mse:4", *_INT_ROTATED, "int:8")
# keys never at 1 bit (K carries almost all of the loss); rotated int at 3-4 bits (int:2 loses to turbo_mse:2; int:3
# lost to turbo_mse:3 until keys were centered: centered, K-only decode KL 0.0238 against 0.0281)
KEY_CANDIDATES = ("turbo_mse:2", "turbo_mse:3", "turbo_mse:4", "int:3:rotation=hadamard", "int:4:rotation=hadamard",
                  "int:8")
# values: rotated int (far-token content survives it; turbo_mse 2-4 values lose passkeys at 4K, see the docstring),
# turbo_mse:1 where a budget needs 1 bit; no 8-bit values: fewer items keep the calibration short
VALUE_CANDIDATES = ("turbo_mse:1", *_INT_ROTATED)
def candidates_for(head_dim: int, specs: tuple[str, ...] = CANDIDATES) -> tuple[str, ...]:
    """``specs`` (by default ``CANDIDATES``) as a model of ``head_dim`` takes them, index for index: a Hadamard
    rotation needs a power-of-two head_dim, so elsewhere (Phi-3-mini's 96, 80) the rotated ``int`` codecs take the
    seeded Haar rotation (the same distribution of rotated vectors, a D x D matrix instead of butterflies; the paged
    kernels take neither such head_dim: those models run on `KVPackCache`)."""
    if hadamard_takes(head_dim):
        return tuple(specs)
    return tuple(s.replace("rotation=hadamard", "rotation=haar") for s in specs)


STREAM_WEIGHT = (11.0, 1.0)  # rule: K's KL per unit of codec MSE over V's (measured 7.6-15.6x, 11x at 3 bits)
CALIB_WINDOWS, CALIB_CTX, CALIB_TOKENS = 2, 512, 32
HASH_VALUES = 4096  # leading values of each hashed weight tensor


def cache_dir() -> Path:
    """Where calibrated presets are cached: ``$KVPACK_CACHE_DIR/presets``, else ``~/.cache/kvpack/presets``."""
    root = os.environ.get("KVPACK_CACHE_DIR")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "kvpack") / "presets"


def _check_name(name) -> float:
    if name not in BUDGETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(BUDGETS)}")
    return BUDGETS[name]


def _recipe_fields(seed: int) -> dict:
    return {"residual": RESIDUAL, "sinks": SINKS, "block": BLOCK, "seed": seed, "center_keys": CENTER_KEYS}


# ---- bits as held -------------------------------------------------------------------------------------


def _held_tokens(config, ctx: int, policy: CachePolicy) -> list[tuple[int, int]]:
    """Per layer ``(tokens held, of them packed)`` after a prefill of ``ctx`` tokens, as `KVPackLayer` stores it."""
    out = []
    for window in layer_kinds(config):
        tokens = ctx if window is None else min(ctx, window - 1)
        sinks = 0 if window is not None else min(policy.sinks, tokens)
        block = policy.block or 1  # the recipes set block; None would depend on the codecs
        out.append((tokens, max(tokens - sinks - policy.residual, 0) // block * block))
    return out


def held_bits(policy: CachePolicy, config, ctx: int = BUDGET_CTX) -> float:
    """Average bits per value of K and V that a `KVPackCache` under ``policy`` holds after a prefill of ``ctx``
    tokens (per-token codecs: their ``bits_per_value`` is exact per packed token; 16-bit for the rest)."""
    from kvpack.codecs.compose import IdentityCodec

    num_kv_heads, head_dim = model_heads(config)
    bits = values = 0.0
    for i, ((tokens, packed), window) in enumerate(zip(_held_tokens(config, ctx, policy), layer_kinds(config))):
        for stream_bits in layer_bits(policy, i, num_kv_heads, head_dim):
            bits += packed * stream_bits + (tokens - packed) * FP16_BITS
            values += tokens
        # `KVPackLayer` holds a 16-bit mean key (one token's worth of K) once a non-sink token is stored
        sinks = 0 if window is not None else policy.sinks
        if policy.center_keys and tokens > sinks:
            bits += FP16_BITS * (not isinstance(policy.codecs(head_dim, i, num_kv_heads)[0], IdentityCodec))
    return bits / values


def solve_budget(sensitivity: torch.Tensor, config, budget: float, seed: int = 0) -> CachePolicy:
    """The per-(layer, stream) policy minimizing the summed ``sensitivity`` ``(layers, 2, len(CANDIDATES))``
    (NaN: not a candidate) with :func:`held_bits` at ``BUDGET_CTX`` within ``budget``."""
    num_layers = text_config(config).num_hidden_layers
    if sensitivity.shape != (num_layers, 2, len(CANDIDATES)):
        raise ValueError(f"sensitivity must be (layers, 2, {len(CANDIDATES)}), got {tuple(sensitivity.shape)}")
    _, head_dim = model_heads(config)
    candidates = candidates_for(head_dim)
    bits = [get_codec(c, head_dim=head_dim).bits_per_value() for c in candidates]
    fields = _recipe_fields(seed)
    layout = _held_tokens(config, BUDGET_CTX, CachePolicy(None, None, **fields))
    held, packed = sum(t for t, _ in layout), sum(p for _, p in layout)
    if packed == 0:
        raise ValueError(f"nothing is packed at {BUDGET_CTX} tokens with residual {RESIDUAL}")
    codec_budget = (budget * held - FP16_BITS * (held - packed)) / packed
    for _ in range(32):  # sliding layers weigh less than full ones in held_bits: tighten until it fits
        try:
            choice = allocate_bits(sensitivity.reshape(2 * num_layers, -1), bits, codec_budget)
        except BudgetTooSmall:
            break  # no choice of allowed (non-NaN) candidates is within the codec budget
        policy = policy_for(choice, candidates, num_layers, **fields)
        excess = held_bits(policy, config) - budget
        if excess <= 1e-9:
            return policy
        codec_budget -= max(excess * held / packed, 1 / 64)
    windows = [w for w in layer_kinds(config) if w is not None]
    sliding = (f"; {len(windows)} of its {num_layers} layers slide over at most {min(windows)} tokens, of which the "
               f"16-bit ones are a large share" if windows else "")  # fmt: skip
    raise ValueError(
        f"budget {budget} bits cannot be met with a {RESIDUAL}-token 16-bit window and {SINKS} sink(s) at "
        f"{BUDGET_CTX} tokens on this model (cheapest codec {min(bits)} bits{sliding})"
    )


# ---- the config-only rule ---------------------------------------------------------------------------------


def _gaussian_mse(spec: str, head_dim: int) -> float:
    """Relative MSE ``|x - decode(encode(x))|^2 / |x|^2`` of ``spec`` on 1024 seeded Gaussian vectors."""
    x = torch.randn(1024, head_dim, generator=torch.Generator().manual_seed(0))
    codec = get_codec(spec, head_dim=head_dim)
    return float(((codec.decode(codec.encode(x)) - x) ** 2).sum() / (x**2).sum())


def rule_sensitivity(config) -> torch.Tensor:
    """``D`` float64 ``(layers, 2, len(CANDIDATES))`` from the config alone: ``STREAM_WEIGHT[stream] *
    tokens held by the layer / BUDGET_CTX * gaussian mse(codec)``; NaN where a candidate is not one for that stream."""
    _, head_dim = model_heads(config)
    mse = torch.tensor([_gaussian_mse(c, head_dim) for c in candidates_for(head_dim)], dtype=torch.float64)
    layout = _held_tokens(config, BUDGET_CTX, CachePolicy(None, None, **_recipe_fields(0)))
    weight = torch.tensor([t / BUDGET_CTX for t, _ in layout], dtype=torch.float64)
    d = weight[:, None, None] * torch.tensor(STREAM_WEIGHT, dtype=torch.float64)[None, :, None] * mse
    return _mask_key_candidates(d)


def _mask_key_candidates(d: torch.Tensor) -> torch.Tensor:
    d = d.clone()
    for stream, allowed in enumerate((KEY_CANDIDATES, VALUE_CANDIDATES)):
        d[:, stream, [j for j, c in enumerate(CANDIDATES) if c not in allowed]] = float("nan")
    return d


def rule_policy(name: str, config, seed: int = 0) -> CachePolicy:
    """Preset ``name``'s policy for a model of ``config`` without calibration (:func:`rule_sensitivity`); 1-bit
    values only where the budget cannot be met without them (their real cost is 6-15x their Gaussian MSE's)."""
    d = rule_sensitivity(config)
    no_one_bit = d.clone()
    no_one_bit[:, 1, CANDIDATES.index("turbo_mse:1")] = float("nan")
    try:
        return solve_budget(no_one_bit, config, _check_name(name), seed)
    except ValueError:
        return solve_budget(d, config, _check_name(name), seed)


# ---- calibration ------------------------------------------------------------------------------------------


def measure_sensitivity(
    model, windows: list[torch.Tensor], ctx: int, progress: bool = True, batch: int = 8
) -> torch.Tensor:
    """``D`` float64 ``(layers, 2, len(CANDIDATES))``: `kvpack.tuning.sensitivity.measure_sensitivity` with the
    recipe's cache shape (``SINKS``, ``RESIDUAL``, ``BLOCK``) and candidates (keys from ``KEY_CANDIDATES``, values
    from ``VALUE_CANDIDATES``; NaN elsewhere): mean KL(exact || compressed) per continuation token with only that
    layer's K (0) or V (1) through that candidate, after a clean prefill of ``ctx`` tokens (the candidates as
    :func:`candidates_for` the model's head_dim gives them)."""
    _, head_dim = model_heads(model.config)
    specs = [candidates_for(head_dim, c) for c in (CANDIDATES, KEY_CANDIDATES, VALUE_CANDIDATES)]
    return sensitivity.measure_sensitivity(model, windows, ctx, specs[0], RESIDUAL, SINKS, progress, specs[1],
                                           specs[2], BLOCK, batch, center_keys=CENTER_KEYS)  # fmt: skip


def model_hash(model) -> str:
    """sha256 over the config (its path and the transformers version left out) and the leading ``HASH_VALUES``
    values of every 8th weight."""
    config = model.config.to_dict()
    for name in ("_name_or_path", "transformers_version"):
        config.pop(name, None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for k, (name, p) in enumerate(model.named_parameters()):
        if k % 8 == 0:
            h.update(name.encode())
            h.update(p.detach().flatten()[:HASH_VALUES].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _calibration_windows(model, text, tokenizer) -> list[torch.Tensor]:
    from kvpack.tuning.calibrate import calibration_ids

    if isinstance(text, torch.Tensor):
        ids = text.long().flatten()
    else:
        if tokenizer is None:
            raise ValueError("calibration needs the tokenizer (or token ids as text=, or calibration=False)")
        from kvpack.evaluation.text import load_text, tokenize

        ids = tokenize(tokenizer, load_text(text))
    return calibration_ids(ids, CALIB_CTX + CALIB_TOKENS, CALIB_WINDOWS)


def calibrated_policy(name: str, model, tokenizer=None, text=None, seed: int = 0, progress: bool = True) -> CachePolicy:
    """Preset ``name``'s policy for ``model``, calibrated (:func:`measure_sensitivity`) on ``text`` (``None``: the
    embedded text; or 1-D token ids) and cached under :func:`cache_dir` (or shipped in ``kvpack/presets``) by
    :func:`model_hash`, the calibration tokens' digest and ``RECIPE_VERSION``; the sensitivity table is cached
    too, so the other presets of the same model reuse it."""
    budget = _check_name(name)
    windows = _calibration_windows(model, text, tokenizer)
    digest = hashlib.sha256(b"".join(w.cpu().numpy().tobytes() for w in windows)).hexdigest()
    key = hashlib.sha256(f"{model_hash(model)}|{digest}|{RECIPE_VERSION}".encode()).hexdigest()[:24]
    for path in (cache_dir() / f"{key}-{name}.json", _shipped(f"{key}-{name}.json")):
        if path is not None and path.is_file():
            logger.info("preset %s: cached calibration %s", name, path)
            return _with_seed(load_policy(path), seed)
    path, table = cache_dir() / f"{key}-{name}.json", cache_dir() / f"{key}-sensitivity.safetensors"
    if table.is_file():
        d = safetensors.torch.load_file(table)["sensitivity"]
    else:
        d = measure_sensitivity(model, windows, CALIB_CTX, progress)
        table.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file({"sensitivity": d.contiguous()}, table)
    policy = solve_budget(d, model.config, budget, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_policy(policy, path, preset=name, budget=budget, budget_ctx=BUDGET_CTX, recipe_version=RECIPE_VERSION,
                calibration_digest=digest, held_bits=held_bits(policy, model.config))  # fmt: skip
    return _with_seed(policy, seed)


def _shipped(name: str) -> Path | None:
    """A calibrated policy shipped as package data (``kvpack/presets``), e.g. SmolLM2's, or ``None``."""
    from importlib import resources

    entry = resources.files("kvpack.presets") / name
    return Path(str(entry)) if entry.is_file() else None


def _with_seed(policy: CachePolicy, seed: int) -> CachePolicy:
    from dataclasses import replace

    return policy if policy.seed == seed else replace(policy, seed=seed)


def recipe_policy(
    name: str, model, tokenizer=None, *, calibration: bool = True, text=None, seed: int = 0, progress: bool = True
) -> CachePolicy:
    """Preset ``name`` for ``model`` (a transformers model, or a ``(model, tokenizer)`` pair): calibrated and
    cached (default), or from its config alone (``calibration=False``; ``model`` may then be a config)."""
    _check_name(name)
    if isinstance(model, tuple) and len(model) == 2:
        model, tokenizer = model
    if not calibration:
        return rule_policy(name, getattr(model, "config", model), seed)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"calibration needs the model itself (or calibration=False), got {type(model).__name__}")
    return calibrated_policy(name, model, tokenizer, text, seed, progress)
