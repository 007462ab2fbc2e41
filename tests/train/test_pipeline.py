"""Multi-phase experiments (`mmjax.train.pipeline`): one `mmjax train FILE` runs a prerequisite,
two training phases and an action between them; `--steps` / `--stop-at` count all phases' steps,
a stopped pipeline resumes in its phase, finished stages are not trained twice, and a changed
config of a finished stage is refused."""

import contextlib
import io
import json
import os

import pytest

from mmjax.errors import ConfigError
from mmjax.train.pipeline import Action, Phase, Pipeline, load_pipeline, phase_configs, split_steps

from support import LLM_TEXT, tiny_overrides  # noqa: E402

PIPELINE_FILE = '''
import json, os
from mmjax.train.experiment import apply_overrides, load_experiment
from mmjax.train.pipeline import Action, Phase, Pipeline, Requires

def base(steps):
    return apply_overrides(load_experiment({llm!r}), {over!r}).replace(steps=steps)

def _mid(results, root):
    path = os.path.join(root, "mid.json")
    with open(path, "w") as f:
        json.dump({{"a_loss": results["a"].metrics["val_loss"]}}, f)
    return {{"mid_file": path, "a_steps": results["a"].config.steps}}

def get_pipeline():
    return Pipeline(
        name="toy",
        requires=(Requires("pre.py", {pre_wd!r}),),
        stages=(Phase("a", base(4).replace(init_from={pre_wd!r})),  # reads the prerequisite
                Action("mid", _mid),
                Phase("b", base(2), prepare=lambda cfg, r: cfg.replace(init_from=r["a"].workdir))),
        summarize=lambda r: {{"a_val_loss": r["a"].metrics["val_loss"], "b_val_loss": r["b"].metrics["val_loss"],
                             "mid_file": r["mid"].metrics["mid_file"], "a_steps": r["mid"].metrics["a_steps"]}})
'''

PRE_FILE = '''
from mmjax.train.experiment import apply_overrides, load_experiment

def get_config():
    return apply_overrides(load_experiment({llm!r}), {over!r}).replace(steps=3, name="pre")
'''


@pytest.fixture
def toy(corpus, tmp_path):
    over = tiny_overrides(corpus, **{"sample.max_new_tokens": 2, "max_eval_batches": 1})
    pre_wd = str(tmp_path / "pre_wd")
    (tmp_path / "toy.py").write_text(PIPELINE_FILE.format(llm=LLM_TEXT, over=over, pre_wd=pre_wd))
    (tmp_path / "pre.py").write_text(PRE_FILE.format(llm=LLM_TEXT, over=over))
    return str(tmp_path / "toy.py"), pre_wd


def _train(*argv):
    from mmjax.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", *argv])
    last = out.getvalue().strip().splitlines()[-1] if out.getvalue().strip() else "{}"
    return code, (json.loads(last) if code == 0 else None), err.getvalue()


def _lines(path):
    with open(path) as f:
        return f.read().count("\n")


def test_split_steps_is_proportional_and_exact():
    assert split_steps(1750, [600, 400, 150, 600]) == [600, 400, 150, 600]
    parts = split_steps(30, [600, 400, 150, 600])
    assert sum(parts) == 30 and min(parts) >= 1 and parts[0] == parts[3] > parts[1] > parts[2]
    assert split_steps(4, [600, 400, 150, 600]) == [1, 1, 1, 1]
    with pytest.raises(ConfigError, match="fewer than the pipeline's 4 phases"):
        split_steps(3, [1, 1, 1, 1])


def test_overrides_go_to_every_phase_or_to_one(toy):
    pipe = load_pipeline(toy[0])
    cfgs = phase_configs(pipe, ["optimizer.learning_rate=0.01", "b.optimizer.learning_rate=0.02", "a.seed=7"])
    assert cfgs["a"].optimizer.learning_rate == 0.01 and cfgs["b"].optimizer.learning_rate == 0.02
    assert cfgs["a"].seed == 7 and cfgs["b"].seed == 0
    assert [c.steps for c in phase_configs(pipe, [], steps=12).values()] == [8, 4]
    with pytest.raises(ConfigError, match=r"phase 'a': .*data.nope.*for one phase write a.KEY=VALUE"):
        phase_configs(pipe, ["data.nope=1"])
    with pytest.raises(ConfigError, match="'mid' is an action"):
        phase_configs(pipe, ["mid.seed=1"])


def test_pipeline_declaration_errors():
    from mmjax.train.experiment import ExperimentConfig

    cfg = ExperimentConfig()
    with pytest.raises(ConfigError, match="used twice"):
        Pipeline("p", (Phase("a", cfg), Phase("a", cfg)), summarize=dict)
    with pytest.raises(ConfigError, match="not an ExperimentConfig field"):
        Pipeline("p", (Phase("data", cfg),), summarize=dict)
    with pytest.raises(ConfigError, match="no Phase"):
        Pipeline("p", (Action("x", lambda r, d: {}),), summarize=dict)
    with pytest.raises(ConfigError, match="no phase 'c'; its phases: a"):
        Pipeline("p", (Phase("a", cfg),), summarize=dict).phase("c")


def test_pipeline_runs_stops_resumes_and_skips_finished_stages(toy, tmp_path, monkeypatch):
    path, pre_wd = toy
    monkeypatch.setenv("MMJAX_TRAIN_PREREQUISITES", "train")  # the suite refuses by default
    root = str(tmp_path / "run")
    # --stop-at counts global steps: step 3 falls in phase a (4 steps)
    code, out, err = _train(path, "--workdir", root, "--stop-at", "3", "--json")
    assert code == 0 and out["step"] == 3 and out["stopped"] == "--stop-at 3" and out["phase"] == "a"
    assert "prerequisite" in err and os.path.isdir(os.path.join(pre_wd, "checkpoints"))
    assert not os.path.exists(os.path.join(root, "b"))
    pre_lines = _lines(os.path.join(pre_wd, "metrics.jsonl"))
    # the same command without --stop-at resumes phase a, runs the action and phase b
    code, out, err = _train(path, "--workdir", root, "--json")
    assert code == 0, err
    assert out["step"] == 6 and out["a_steps"] == 4 and out["phases"]["b"]["steps"] == 2
    assert "finished run found, reused" in err  # the prerequisite was not trained again
    assert _lines(os.path.join(pre_wd, "metrics.jsonl")) == pre_lines
    assert json.load(open(out["mid_file"]))["a_loss"] == out["a_val_loss"]
    assert json.load(open(os.path.join(root, "b", "experiment.json")))["init_from"] == os.path.join(root, "a")
    assert "resumed from" in err  # phase a continued from its step-3 checkpoint
    # the root loads as its last finished phase (what `mmjax generate --workdir ROOT` uses)
    from mmjax.train.inference import resolve_workdir

    assert resolve_workdir(root) == os.path.join(root, "b") and resolve_workdir(pre_wd) == pre_wd
    # a rerun of a finished pipeline trains nothing and reports the same summary
    a_lines = _lines(os.path.join(root, "a", "metrics.jsonl"))
    code, again, err = _train(path, "--workdir", root, "--json")
    assert code == 0 and again["a_val_loss"] == out["a_val_loss"] and again["b_val_loss"] == out["b_val_loss"]
    assert err.count("result reused") == 3 and _lines(os.path.join(root, "a", "metrics.jsonl")) == a_lines
    # a finished stage's config changed: refused (the later stages were built on it), exit 2
    code, _, err = _train(path, "--workdir", root, "--set", "a.optimizer.learning_rate=0.5")
    assert code == 2 and "phase 'a' finished" in err


def test_phase_alone_and_steps_split(toy, tmp_path):
    path, _ = toy
    code, out, err = _train(path, "--phase", "b", "--workdir", str(tmp_path / "b_alone"), "--steps", "3", "--json")
    assert code == 0 and out["step"] == 3 and "init_from" not in err  # declared config: no prepare
    code, _, err = _train(path, "--phase", "zz", "--workdir", str(tmp_path / "zz"))
    assert code == 2 and "no phase 'zz'; its phases: a, b" in err
    code, _, err = _train(LLM_TEXT, "--phase", "a", "--workdir", str(tmp_path / "x"))
    assert code == 2 and "defines no get_pipeline()" in err


def test_the_shipped_pipelines_declare_their_phases():
    from support import ROOT

    capfilt = load_pipeline(os.path.join(ROOT, "experiments", "blip_capfilt.py"))
    assert [s.name for s in capfilt.stages] == ["noisy", "filter", "captioner", "filter_and_caption", "capfilt"]
    steps = {k: c.steps for k, c in phase_configs(capfilt, [], steps=175).items()}
    assert sum(steps.values()) == 175 and steps["noisy"] == steps["capfilt"] == 60
    blip2 = load_pipeline(os.path.join(ROOT, "experiments", "blip2_digits.py"))
    assert [p.name for p in blip2.phases] == ["stage1", "stage2"]
    assert [r.workdir for r in blip2.requires] == ["workdirs/clip_digits", "workdirs/llm_text"]


def test_prerequisites_are_trained_only_when_read_and_unfinished(tmp_path, monkeypatch):
    """`ensure_prerequisites` (also behind a single-run file's REQUIRES): a prerequisite the
    config does not read is left alone, a finished one is reused; neither trains."""
    from mmjax.train.experiment import ExperimentConfig
    from mmjax.train.pipeline import Requires, ensure_prerequisites

    finished = tmp_path / "finished"
    (finished / "checkpoints" / "3").mkdir(parents=True)
    (finished / "experiment.json").write_text(json.dumps({"steps": 3}))
    unread = tmp_path / "unread"
    logs = []
    reqs = (Requires("missing_file.py", str(finished)), Requires("missing_file.py", str(unread)))
    ensure_prerequisites(reqs, [ExperimentConfig(init_from=str(finished))], str(tmp_path), logs.append)
    assert logs == [f"prerequisite {finished}: finished run found, reused"] and not unread.exists()
    # a path that merely starts like the prerequisite's is not a read of it
    logs.clear()
    ensure_prerequisites(reqs[1:], [ExperimentConfig(init_from=str(unread) + "_other")], str(tmp_path), logs.append)
    assert logs == [] and not unread.exists()
    # read and unfinished: the suite refuses to train it (MMJAX_TRAIN_PREREQUISITES=refuse) ...
    with pytest.raises(ConfigError, match="holds no finished run and MMJAX_TRAIN_PREREQUISITES=refuse"):
        ensure_prerequisites(reqs[1:], [ExperimentConfig(init_from=str(unread))], str(tmp_path), logs.append)
    # ... and otherwise trains it from its file (here missing: a clear error, nothing written)
    monkeypatch.setenv("MMJAX_TRAIN_PREREQUISITES", "train")
    from mmjax.train import run

    with pytest.raises(Exception, match="missing_file.py"):
        ensure_prerequisites(reqs[1:], [ExperimentConfig(init_from=str(unread))], str(tmp_path), logs.append,
                             run=run)
    assert not unread.exists()
