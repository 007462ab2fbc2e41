"""Reading a training workdir outside `mmjax.train`: `mmjax.checkpoint.load_workdir`, what
`load_for_inference`, `init_from` and `mmjax export` build on."""

import json
import os

import jax
import numpy as np
import pytest

from mmjax import checkpoint
from mmjax.cli import main
from mmjax.errors import InputError
from mmjax.models import abstract_params
from mmjax.train import loop, run
from mmjax.train.checkpointing import Checkpointer
from mmjax.train.inference import load_for_inference

from support import LLM_TEXT, tiny_overrides


@pytest.fixture(scope="module")
def workdir(corpus, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("workdir") / "run")
    run(LLM_TEXT, workdir=wd, steps=2, overrides=tiny_overrides(corpus, eval_at_start=False))
    return wd


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _tree_listing(root):
    return sorted(os.path.join(d, f) for d, dirs, files in os.walk(root) for f in dirs + files)


def test_the_layout_constants_are_one_set():
    assert (loop.MODEL_FILE, loop.TOKENIZER_FILE, loop.CHECKPOINT_DIR) == (
        checkpoint.WORKDIR_MODEL_FILE, checkpoint.WORKDIR_TOKENIZER_FILE,
        checkpoint.WORKDIR_CHECKPOINT_DIR) == ("mmjax_model.json", "tokenizer.model", "checkpoints")


def test_load_workdir_gives_the_latest_params_and_writes_nothing(workdir):
    before = _tree_listing(workdir)
    module, config, params = checkpoint.load_workdir(workdir)
    assert _tree_listing(workdir) == before
    info = checkpoint.read_workdir_info(workdir)
    assert checkpoint.is_workdir(workdir) and info["family"] == "llama"
    assert module.config == config and config.to_dict() == info["config"]
    ckpt = Checkpointer(os.path.join(workdir, loop.CHECKPOINT_DIR), keep=1000)
    try:
        assert ckpt.latest_step() == 2
        want = ckpt.restore_params(None, abstract_params("llama", module, config))
    finally:
        ckpt.close()
    got, expected = _leaves(params), _leaves(want)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert np.array_equal(got[name], expected[name]), name
    inf_module, inf_params, tokenizer = load_for_inference(workdir)
    assert inf_module.config == config and tokenizer is not None
    for name, value in _leaves(inf_params).items():
        assert np.array_equal(value, expected[name]), name


def test_load_workdir_errors(tmp_path):
    with pytest.raises(InputError, match="not a training workdir"):
        checkpoint.load_workdir(str(tmp_path))
    (tmp_path / "mmjax_model.json").write_text(json.dumps(
        {"family": "llama", "config": {"vocab_size": 64, "dim": 16, "num_layers": 1,
                                       "num_heads": 2, "num_kv_heads": 1, "mlp_dim": 32,
                                       "max_len": 16}}))
    with pytest.raises(InputError, match="holds no checkpoint yet"):
        checkpoint.load_workdir(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(InputError, match="holds no checkpoint yet"):
        checkpoint.load_workdir(str(tmp_path))


def test_export_of_a_training_workdir(workdir, tmp_path, capsys):
    from mmjax.convert import from_hf

    out = tmp_path / "hf"
    assert main(["export", workdir, str(out)]) == 0, capsys.readouterr().err
    assert (out / "tokenizer.model").is_file() and (out / "config.json").is_file()
    _, _, params = checkpoint.load_workdir(workdir)
    _, exported = from_hf(str(out))
    got, want = _leaves(exported), _leaves(params)
    assert sorted(got) == sorted(want)
    for name in want:
        assert np.array_equal(got[name], want[name].astype(np.float32)), name
