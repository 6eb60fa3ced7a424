"""``kvpack sweep``: many cache configurations and the peers on the same windows -> a table and a rate-distortion plot.

Every configuration runs through `kvpack.evaluate` on the same model, text and windows; one
``reference_memo`` is shared by all of them, so the uncompressed prefill and reference logits of
each window are computed once and every configuration only pays for its own compressed pass.

Configurations come from the command line (the cartesian product of ``--key``, ``--value``,
``--residual``, ``--sinks``, ``--skip-layers`` and ``--block``, each taking several values), from ``--preset NAME``
and from a config file (``--config FILE``, JSON or TOML; the format: `kvpack.evaluation.sweep_config`). A
configuration with only the plain fields (key, value, residual, sinks, skip_layers, center_keys) goes to
`kvpack.evaluate` as they are (the sweep's ``--seed`` seeds its codecs); any other policy goes to it whole
(``policy=``), on every protocol.
``--peers`` adds transformers' `QuantizedCache` backends (`kvpack.evaluation.peers`; ``--peers`` alone: all of
``PEERS``), measured with their true bits, and llama.cpp's cache types (``llamacpp:q4_0``, ``llamacpp:q8_0/q4_0``,
``llamacpp:f16:fa=off``: `kvpack.evaluation.llamacpp`, llama-cpp-python on the model's GGUF file; in-forward, as
llama.cpp works, against its own f16 cache).

Output (`kvpack.evaluation.sweep_report`): a table on stdout, ``--json``/``--csv``/``--markdown`` rows, and
``--plot`` a PNG with delta-ppl (symlog) and top-1 agreement against the average bits per value of K and V as held.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from kvpack.evaluation import llamacpp
from kvpack.evaluation.sweep_config import (
    DEFAULT_RESIDUAL,
    DEFAULT_SINKS,
    SweepConfig,
    configs_from_args,
    load_config_file,
)
from kvpack.evaluation.sweep_report import config_columns, format_markdown, format_table, plot, write_csv
from kvpack.policy import CachePolicy

__all__ = [
    "SweepConfig",
    "add_arguments",
    "configs_from_args",
    "format_markdown",
    "format_table",
    "load_config_file",
    "plot",
    "run",
    "run_sweep",
]

METRIC_COLUMNS = (
    "ppl_ref", "ppl", "delta_ppl_pct", "delta_ppl_pct_std", "top1", "top1_std", "kl", "kl_std", "bits_k", "bits_v",
    "bits_per_value", "verdict", "seconds_per_window",
)  # fmt: skip


def _evaluate_kwargs(config: SweepConfig) -> dict:
    """`kvpack.evaluate`'s arguments for one configuration: a peer's cache factory, a preset, the plain policy
    fields (seeded by the sweep's seed), or the whole policy (its own seed, 0)."""
    if config.peer is not None:
        from kvpack.evaluation.peers import peer_factory

        return {"cache_factory": peer_factory(config.peer)}
    if config.preset is not None:
        return {"preset": config.preset}
    policy = config.policy
    fields = {"key": policy.key, "value": policy.value, "residual": policy.residual, "sinks": policy.sinks,
              "skip_layers": policy.skip_layers, "center_keys": policy.center_keys}  # fmt: skip
    if policy == CachePolicy(**fields):
        return fields
    return {"policy": policy}  # the whole policy, on every protocol


def run_sweep(
    model,
    configs: list[SweepConfig],
    text=None,
    ctx: int = 1024,
    n_eval: int = 256,
    windows: int = 8,
    seed: int = 0,
    progress: bool = True,
    protocol: str = "decode",
    calibration: bool = True,
    gguf: str | Path | None = None,
) -> list[dict]:
    """Evaluate every configuration on the same windows under ``protocol``; one row (dict) per configuration.

    Peers' own caches cannot run ``decode`` (it needs a `KVPackCache`): under ``decode`` they run ``snapshot``,
    and every row records the protocol it ran (``protocol``).

    ``model``: a ``(model, tokenizer)`` pair or a name for `kvpack.evaluation.models.load` (loaded once). A row
    holds the configuration, the `EvalResult` metrics and ``kind`` (``kvpack`` or ``peer``). ``gguf``: the model's
    GGUF file, for llama.cpp peers (which run ``inforward`` whatever ``protocol`` is).
    """
    from tqdm.auto import tqdm

    from kvpack.evaluation.evaluate import evaluate

    if not configs:
        raise ValueError("configs must hold at least one SweepConfig")
    if not all(isinstance(c, SweepConfig) for c in configs):
        raise TypeError("configs must be a list of SweepConfig")
    llama_peers = [c for c in configs if c.peer is not None and c.peer.startswith(llamacpp.PREFIX)]
    if llama_peers and (gguf is None or not Path(gguf).is_file()):
        raise ValueError(f"{llama_peers[0].name}: llama.cpp reads the model from a GGUF file; gguf must name one "
                         f"(--model smollm2 or a .gguf path), got {gguf!r}")  # fmt: skip
    if isinstance(model, (str, Path)):
        from kvpack.evaluation.models import load

        model = load(model)
    memo: dict = {}
    rows = []
    bar = tqdm(configs, desc="sweep", unit="config", disable=not progress)
    for config in bar:
        bar.set_postfix_str(config.name[:60])
        if config in llama_peers:
            rows.append(_row(config, _llamacpp_result(model, gguf, config.peer, text, ctx, n_eval, windows, memo)
                             .to_dict(), "inforward"))  # fmt: skip
            continue
        ran = "snapshot" if protocol == "decode" and config.peer is not None else protocol
        result = evaluate(
            model, text=text, ctx=ctx, n_eval=n_eval, windows=windows, protocol=ran, seed=seed,
            progress=progress, reference_memo=memo, **_evaluate_kwargs(config),
            **({"calibration": calibration} if config.preset is not None else {}),
        )  # fmt: skip
        rows.append(_row(config, result.to_dict(), ran))
    return rows


def _llamacpp_result(model, gguf, spec: str, text, ctx: int, n_eval: int, windows: int, memo: dict):
    """`kvpack.evaluation.llamacpp.evaluate_llamacpp` on the token ids `kvpack.evaluate` scores."""
    from kvpack.evaluation.text import load_text, text_label, tokenize

    _, tokenizer = model
    ids = text.long().flatten() if isinstance(text, torch.Tensor) else tokenize(tokenizer, load_text(text))
    label = "token ids" if isinstance(text, torch.Tensor) else text_label(text)
    return llamacpp.evaluate_llamacpp(gguf, ids, spec, ctx, n_eval, windows, model_name=Path(gguf).name,
                                      text_label=label, reference_memo=memo)  # fmt: skip


def _row(config: SweepConfig, metrics: dict, protocol: str) -> dict:
    """One row: the configuration's columns (a preset's: the policy it stands for on this model), then its
    metrics, the model, the text and the protocol it ran."""
    row = config_columns(config)
    if config.preset is not None:
        row.update({k: v for k, v in metrics["policy"].items() if k in row})
    row.update({k: metrics[k] for k in METRIC_COLUMNS})
    row["model"], row["text"], row["protocol"] = metrics["model"], metrics["text"], protocol
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvpack.cli import output_file
    from kvpack.evaluation.eval_cli import CENTER_KEYS_HELP, MODEL_HELP, TEXT_HELP, preset_names

    parser.add_argument("--model", default="smollm2", help=MODEL_HELP)
    parser.add_argument("--text", default=None, help=TEXT_HELP)
    parser.add_argument("--config", default=None, metavar="FILE", help="JSON/TOML file of configs (and peers)")
    parser.add_argument(
        "--key", action="extend", nargs="+", help="codec spec for K (several: the product of all lists is swept)"
    )
    parser.add_argument("--value", action="extend", nargs="+", help="codec spec for V (several)")
    parser.add_argument(
        "--residual",
        type=int,
        action="extend",
        nargs="+",
        help=f"full-precision recent tokens (several; default {DEFAULT_RESIDUAL})",
    )
    parser.add_argument("--sinks", type=int, action="extend", nargs="+",
                        help=f"full-precision first tokens (several; default {DEFAULT_SINKS})")  # fmt: skip
    parser.add_argument("--block", type=int, action="extend", nargs="+",
                        help="tokens packed at once as the residual window ages (several; default 32, 1 with "
                             "--residual 0 packs every token past the sinks)")  # fmt: skip
    parser.add_argument("--skip-layers", action="extend", nargs="+", help="comma-separated 16-bit layers (several)")
    parser.add_argument("--center-keys", action="store_true", help=f"--key/--value configs: {CENTER_KEYS_HELP}")
    parser.add_argument("--preset", action="extend", nargs="+", help=f"named presets (several): {preset_names()}")
    parser.add_argument("--no-calibration", action="store_true", help="presets from the model's config alone")
    parser.add_argument("--peers", nargs="*", default=None, metavar="SPEC",
                        help="peers: transformers QuantizedCache backends, e.g. quanto:4 hqq:2 fp8 (alone: all of "
                        "those), and llama.cpp cache types, e.g. llamacpp:q4_0 llamacpp:q8_0/q4_0 llamacpp:f16:fa=off "
                        "(llama-cpp-python, in-forward)")  # fmt: skip
    parser.add_argument("--ctx", type=int, default=1024, help="context tokens per window")
    parser.add_argument("--n-eval", type=int, default=256, help="continuation tokens scored per window")
    parser.add_argument("--windows", type=int, default=8, help="non-overlapping windows evenly spread over the text")
    parser.add_argument("--seed", type=int, default=0, help="codec seed")
    parser.add_argument("--protocol", choices=("decode", "snapshot", "inforward"), default="decode",
                        help="decode: as generate sees the cache; snapshot: a stored context; inforward")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda)")
    parser.add_argument("--json", default=None, metavar="OUT", type=output_file, help="write setup + rows as JSON")
    parser.add_argument("--csv", default=None, metavar="OUT", type=output_file, help="write the rows as CSV")
    parser.add_argument("--markdown", default=None, metavar="OUT", type=output_file, help="write the table as markdown")
    parser.add_argument("--plot", default=None, metavar="PNG", type=output_file, help="write the rate-distortion plot")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _gguf_of(model: str) -> Path | None:
    """The GGUF file behind ``--model`` (``smollm2`` or a ``.gguf`` path), else None."""
    from kvpack.evaluation.models import MODELS, smollm2_gguf

    if str(model).lower() in MODELS:
        return smollm2_gguf()
    return Path(model).expanduser() if str(model).lower().endswith(".gguf") else None


def run(args: argparse.Namespace) -> int:
    from kvpack.evaluation.evaluate import VERDICT

    configs = configs_from_args(args)  # every config is checked before the model loads
    from kvpack.evaluation.text import load_text

    load_text(args.text)  # a bad path fails before the model loads
    from kvpack.evaluation.models import load

    gguf = _gguf_of(args.model)
    if gguf is None and any(c.peer and c.peer.startswith(llamacpp.PREFIX) for c in configs):
        raise ValueError(f"llama.cpp peers read a GGUF file: --model must be 'smollm2' or a .gguf path, "
                         f"got {args.model!r}")  # fmt: skip
    model = load(args.model, device=args.device)
    started = datetime.datetime.now(datetime.UTC)
    rows = run_sweep(model, configs, text=args.text, ctx=args.ctx, n_eval=args.n_eval, windows=args.windows,
                     seed=args.seed, progress=not args.no_progress, protocol=args.protocol,
                     calibration=not args.no_calibration, gguf=gguf)  # fmt: skip
    from kvpack.evaluation.text import describe_text

    print(f"kvpack sweep  model={args.model}  ctx={args.ctx}  n_eval={args.n_eval}  windows={args.windows}  "
          f"text: {describe_text(rows[0]['text'])}")  # fmt: skip
    print(format_table(rows))
    print(f"vs fp16: times smaller than fp16 the K+V cache is held at ctx {args.ctx} (16 / avg bits, measured bytes); "
          f"verdict: {VERDICT.describe()}")  # fmt: skip
    setup = {
        "command": "kvpack " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("kvpack") else None,
        "date": started.strftime("%Y-%m-%d %H:%M UTC"), "model": args.model, "text": rows[0]["text"],
        "ctx": args.ctx, "n_eval": args.n_eval, "windows": args.windows, "protocol": args.protocol, "seed": args.seed,
        "device": args.device,
    }  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.csv:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    if args.markdown:
        Path(args.markdown).write_text(format_markdown(rows) + "\n")
        print(f"wrote {args.markdown}")
    if args.plot:
        title = f"{args.model}, {rows[0]['text']}, ctx {args.ctx}, n_eval {args.n_eval}, {args.windows} windows"
        print(f"wrote {plot(rows, args.plot, title)}")
    return 0
