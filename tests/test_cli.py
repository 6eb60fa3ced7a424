"""``kvpack`` (kvpack.cli.main): parsing, --help, and every error path -> one line on stderr, exit 2, no traceback."""

import os

import pytest

import kvpack.tuning.memory
from kvpack import cli
from kvpack.cli import build_parser, main
from kvpack.evaluation import models, peers

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def no_model(monkeypatch):
    """Any model load is a test failure: the command must stop before it."""
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model must not load"))


def one_error_line(capsys, command: str) -> str:
    """The stderr of a failed command: exactly one line ``kvpack COMMAND: error: ...`` (after argparse's usage, if
    any), never a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith((" ", "usage:"))]
    assert len(lines) == 1 and lines[0].startswith(f"kvpack {command}: error: "), err
    return lines[0]


def test_help_shows_defaults_and_preset_names(capsys):
    assert main(["eval", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 1024)" in out and "(default: smollm2)" in out and "(default: decode)" in out
    assert "4bit" in out and "2.5bit" in out and "--no-calibration" in out and "--block" in out
    assert "wikitext2-excerpt" in out and "(default: None)" not in out
    for command in ("sweep", "needle", "ruler"):
        assert main([command, "--help"]) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "--block" in out and "3bit" in out


def test_verbose_after_the_subcommand_too():
    assert build_parser().parse_args(["memory", "-v"]).verbose is True
    assert build_parser().parse_args(["-v", "memory"]).verbose is True
    assert build_parser().parse_args(["memory"]).verbose is False


def test_a_mistyped_flag_prints_the_subcommands_usage(capsys, no_model):
    assert main(["eval", "--ctxx", "3"]) == 2
    err = capsys.readouterr().err
    assert "usage: kvpack eval" in err and "kvpack eval: error: unrecognized arguments: --ctxx 3" in err
    assert "Traceback" not in err


@pytest.fixture
def paths(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    return {"dir": str(tmp_path), "dir/": str(tmp_path) + "/", "under a file": str(a_file / "out.json"),
            "missing dir": str(tmp_path / "absent" / "out.json")}  # fmt: skip


@pytest.mark.parametrize("kind", ["dir", "dir/", "under a file", "missing dir"])
@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--json"],
        ["sweep", "--key", "int:4", "--json"],
        ["sweep", "--key", "int:4", "--csv"],
        ["sweep", "--key", "int:4", "--markdown"],
        ["sweep", "--key", "int:4", "--plot"],
        ["needle", "--json"],
        ["needle", "--plot"],
        ["ruler", "--json"],
        ["ruler", "--plot"],
        ["inspect", "--json"],
        ["inspect", "--plot"],
        ["validate", "--codecs", "int:4", "--json"],
        ["bench", "attention", "--json"],
        ["allocate", "--budget", "3", "--out"],
        ["allocate", "--budget", "3", "--results"],
        ["allocate", "--budget", "3", "--sensitivity"],
        ["calibrate", "--name", "c", "--results"],
    ],
)
def test_bad_output_paths_fail_before_any_work(argv, kind, paths, capsys, no_model):
    assert main([*argv, paths[kind]]) == 2
    line = one_error_line(capsys, argv[0])
    assert f"argument {argv[-1]}" in line


def test_output_dirs_may_be_created_but_not_be_files(paths, tmp_path, capsys, no_model):
    assert cli.output_dir(str(tmp_path / "new" / "sub")) == str(tmp_path / "new" / "sub")
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert main(["calibrate", "--name", "c", "--dir", paths["under a file"]]) == 2
    assert "is a file" in one_error_line(capsys, "calibrate")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_directory_is_refused(tmp_path, capsys, no_model):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["eval", "--json", str(locked / "r.json")]) == 2
    assert "not writable" in one_error_line(capsys, "eval")


def test_good_output_path_is_accepted_and_nothing_is_written(tmp_path):
    out = tmp_path / "r.json"
    assert build_parser().parse_args(["eval", "--json", str(out)]).json == str(out)
    assert not out.exists()


@pytest.mark.parametrize(
    "error, code, expected",
    [
        (ValueError("--budget must be positive"), 2, "error: --budget must be positive"),
        (TypeError("text must be\na name"), 2, "error: text must be a name"),
        (FileNotFoundError("policy file not found: p.json"), 2, "error: policy file not found: p.json"),
        (PermissionError(13, "Permission denied", "/root/x"), 2, "error: [Errno 13] Permission denied: '/root/x'"),
        (ImportError("No module named 'hqq'", name="hqq"), 2, "install the missing package: pip install hqq"),
        (ImportError("needs it: pip install datasets", name="datasets"), 2, "error: needs it: pip install datasets"),
    ],
)
def test_user_errors_are_one_line_exit_2(error, code, expected, monkeypatch, capsys):
    def fail(args):
        raise error

    monkeypatch.setattr(kvpack.tuning.memory, "run", fail)
    assert main(["memory"]) == code
    assert expected in one_error_line(capsys, "memory")


def test_ctrl_c_exits_130_quietly(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(kvpack.tuning.memory, "run", interrupted)
    assert main(["memory"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip() == "kvpack memory: interrupted"


def test_a_bug_is_one_line_and_a_traceback_with_verbose(monkeypatch, capsys):
    def bug(args):
        return {}["missing"]

    monkeypatch.setattr(kvpack.tuning.memory, "run", bug)
    assert main(["memory"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "kvpack memory: internal error: KeyError: 'missing' (run with -v for the traceback)"
    with pytest.raises(KeyError):
        main(["memory", "-v"])


@pytest.mark.parametrize("content", ["[1, 2]", '{"a": 1}', "not json", '{"text_config": 3}'])
def test_memory_model_that_is_not_a_config(content, tmp_path, capsys):
    path = tmp_path / "list.json"
    path.write_text(content)
    assert main(["memory", "--model", str(path)]) == 2
    assert str(path) in one_error_line(capsys, "memory")


def test_sweep_peers_without_their_package_fail_before_the_model(monkeypatch, capsys, no_model):
    monkeypatch.setattr(peers, "available", lambda backend: None if backend == "fp8" else f"pip install {backend}")
    assert main(["sweep", "--peers", "hqq:4", "--no-progress"]) == 2
    assert "peer 'hqq:4' needs its backend package: pip install hqq" in one_error_line(capsys, "sweep")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--model", "smolm2"], "unknown model 'smolm2'; did you mean 'smollm2'?"),
        (["eval", "--model", "./nowhere"], "model path not found"),
        (["eval", "--text", "/no/such/file.txt"], "text file not found: /no/such/file.txt"),
        (["eval", "--text", "."], "is a directory, not a text file"),
        (["eval", "--block", "0"], "block"),
        (["eval", "--block", "1", "--protocol", "inforward"], "--block applies to the snapshot and decode"),
        (["eval", "--pre-rope-keys", "--protocol", "inforward"], "--pre-rope-keys works with --protocol decode or snapshot"),
        (["eval", "--preset", "4bit", "--block", "1"], "--preset 4bit replaces --block"),
        (["needle", "--block", "0"], "block"),
        (["sweep", "--block", "1"], "need --key and/or --value"),
    ],
)
def test_eval_errors_in_the_users_words(argv, message, capsys, monkeypatch):
    real_load = models.load

    def load_only_failing(name, **kwargs):  # the model-name checks run; a load that would succeed fails the test
        if str(name) == "smollm2":
            pytest.fail("the model must not load")
        return real_load(name, **kwargs)

    monkeypatch.setattr(models, "load", load_only_failing)
    assert main([*argv, "--no-progress"]) == 2
    line = one_error_line(capsys, argv[0])
    assert message in line and "text=None" not in line
