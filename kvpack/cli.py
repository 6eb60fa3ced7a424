"""The ``kvpack`` command. Each subcommand lives in its own module exposing ``add_arguments(parser)``
and ``run(args) -> int``; this table is the whole registry."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

COMMANDS = {
    "validate": ("kvpack.evaluation.validate", "rate-distortion table of every codec (bits, MSE, bounds, IP bias, speed)"),
    "eval": ("kvpack.evaluation.eval_cli", "delta-perplexity / top-1 / KL of a cache policy on a real model and text"),
    "sweep": ("kvpack.evaluation.sweep", "many configurations and the peers on the same windows: table and plot"),
    "needle": (
        "kvpack.evaluation.needle",
        "passkey retrieval at several depths and lengths through the compressed cache",
    ),
    "inspect": ("kvpack.evaluation.inspect", "per-layer, per-head codec error and attention fidelity on real Q/K/V"),
    "bench": ("kvpack.bench.kernels", "GPU speed benchmarks (decode attention, fused encode)"),
    "calibrate": ("kvpack.tuning.calibrate", "fit codebooks / preconditioners on calibration text"),
    "allocate": ("kvpack.tuning.allocate", "per-layer bit allocation under a bits-per-value budget"),
    "memory": ("kvpack.tuning.memory", "cache bytes per token and the longest context that fits a GPU"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpack", description="KV-cache compression toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is None:  # command not built yet
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"kvpack {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
