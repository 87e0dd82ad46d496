"""The salr command line: complete --help, one-line errors for user mistakes, run-dir refusal."""

import subprocess
import sys

import pytest

from salr import cli

SUBCOMMANDS = ["prune", "finetune", "eval", "bench", "demo"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "salr", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"salr {command}" in out and "--out" in out and "--overwrite" in out


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in SUBCOMMANDS)


@pytest.mark.parametrize("args, message", [
    (["finetune", "--method", "qlora"], "invalid choice: 'qlora'"),
    (["prune", "--sparsity", "1.5"], "must be in [0, 1)"),
    (["prune", "--calib-windows", "0"], "must be a positive integer"),
])
def test_bad_arguments_are_one_clear_line(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--method", "losa", "--criterion", "sparsegpt"], "--criterion sparsegpt: LoSA prunes with Wanda"),
    (["--method", "losa", "--steps", "5"], "final_share"),
    (["--method", "losa", "--layerwise", "owl"], "--layerwise owl: LoSA takes its block sparsities from RMI"),
])
def test_demo_losa_refuses_bad_flags_before_the_run_directory(args, message, tmp_path, capsys):
    assert cli.main(["demo", *args, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_existing_run_directory_is_refused_without_a_traceback(tmp_path):
    (tmp_path / "old").write_text("x")
    result = run_cli("eval", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path))
    assert result.returncode == 2
    assert "already exists" in result.stderr and "--overwrite" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_model_path_is_one_line(tmp_path):
    result = run_cli("eval", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "no-such-model" in result.stderr and "Traceback" not in result.stderr
