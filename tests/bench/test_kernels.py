"""``kvpack bench``'s command line (kvpack.bench.kernels.add_arguments): defaults, choices, output path; parsing only,
nothing is timed."""

import pytest

from kvpack.bench.kernels import DEFAULT_CODECS
from kvpack.cli import build_parser, main


def parse(*argv):
    return build_parser().parse_args(["bench", *argv])


def test_defaults():
    args = parse("attention")
    assert (args.what, args.contexts, args.batches, args.codecs) == (
        "attention", "4096,16384,32768,131072", "1,8,32", ",".join(DEFAULT_CODECS),
    )  # fmt: skip
    assert (args.q_heads, args.kv_heads, args.head_dim, args.block_size, args.window) == (32, 8, 128, 16, 132)
    assert (args.tokens, args.max_gib, args.json) == (65536, 60.0, None)


def test_options_and_the_generate_group(tmp_path):
    out = tmp_path / "b.json"
    args = parse("encode", "--codecs", "int:4", "--tokens", "1024", "--json", str(out))
    assert (args.what, args.codecs, args.tokens, args.json) == ("encode", "int:4", 1024, str(out))
    assert parse("generate").what == "generate" and hasattr(parse("generate"), "context")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nothing"], "invalid choice: 'nothing'"),
        ([], "the following arguments are required: what"),
        (["attention", "--q-heads", "many"], "argument --q-heads: invalid int value: 'many'"),
        (["attention", "--qheads", "8"], "unrecognized arguments: --qheads 8"),
    ],
)
def test_bad_command_lines_exit_2_with_the_bench_usage(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert "usage: kvpack bench" in err and message in err and "Traceback" not in err


def test_json_naming_a_directory_fails_before_any_timing(tmp_path, capsys):
    assert main(["bench", "attention", "--json", str(tmp_path)]) == 2
    assert "argument --json" in capsys.readouterr().err
