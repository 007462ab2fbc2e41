"""The README opens with the two commands, and CI runs the second one verbatim."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_readme_opens_with_two_commands():
    cmds = readme_commands()
    assert len(cmds) >= 2
    main_job, tests = cmds[0], cmds[1]
    for cmd in (main_job, tests):
        assert cmd.startswith("python3 -m venv .venv && .venv/bin/pip install")
        assert "'.[test]'" in cmd
    assert "experiments/llm_text.py" in main_job
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci
