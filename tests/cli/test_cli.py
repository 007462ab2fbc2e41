"""Command-line bad input: exit status 2 and one line on stderr that names the problem."""

import os
import subprocess
import sys

import pytest

from mmjax.cli import main

from support import ROOT  # noqa: E402
LLM_TEXT = os.path.join(ROOT, "experiments", "llm_text.py")


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, needle", [
    (["generate", "--workdir", "/nonexistent/wd", "--prompt", "x"], "/nonexistent/wd"),
    (["train", "/nonexistent/exp.py"], "/nonexistent/exp.py"),
    (["train", LLM_TEXT, "--set", "model.dimm=3"], "did you mean 'model.dim'"),
    (["train", LLM_TEXT, "--set", "steps=0"], "steps"),
    (["train", LLM_TEXT, "--mesh", "data=3,bogus=2"], "bogus"),
    (["bench", "decod"], "did you mean 'decode'"),
    (["bench", "decode", "--set", "batch_size=2"], "batch_sizes"),
])
def test_bad_input_exits_2_with_one_line(capsys, argv, needle, tmp_path):
    if argv[0] == "train":
        argv = argv + ["--workdir", str(tmp_path / "wd")]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert needle in lines[0]
    assert "Traceback" not in err


def test_generate_from_a_dir_that_is_not_a_workdir(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--workdir", str(tmp_path), "--prompt", "x")
    assert code == 2 and "not a training workdir" in err


def test_subprocess_error_has_no_traceback():
    """The real console entry point: `python -m mmjax` with a missing workdir."""
    p = subprocess.run([sys.executable, "-m", "mmjax", "generate", "--workdir", "/nonexistent/wd",
                        "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "/nonexistent/wd" in lines[0], p.stderr


def test_version_and_help():
    p = subprocess.run([sys.executable, "-m", "mmjax", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0
    for cmd in ("compare", "convert", "export", "train", "generate", "bench"):
        assert cmd in p.stdout
