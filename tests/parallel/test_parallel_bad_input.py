"""Bad parallelism input gets one clear error naming the axis, the sizes and a fix."""

import os

import jax
import numpy as np
import pytest

from mmjax.cli import main
from mmjax.errors import ConfigError
from mmjax.models.llama import Llama, LlamaConfig
from mmjax.parallel import Preset, activate, check_mesh, get_preset, make_mesh, validate_rules
from mmjax.tasks.lm import lm_init_fn
from mmjax.train.experiment import ExperimentConfig, OptimizerConfig
from mmjax.train.optimizer import make_optimizer
from mmjax.train.state import abstract_boxed_params, state_shardings
from mmjax.train.step import shard_batch

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

from support import ROOT  # noqa: E402
LLM_TEXT = os.path.join(ROOT, "experiments", "llm_text.py")


def _shardings(cfg, preset, mesh_spec):
    init = lm_init_fn(Llama(cfg), 8)
    tx, _ = make_optimizer(OptimizerConfig(), 10, abstract_boxed_params(init))
    p = get_preset(preset)
    return state_shardings(init, tx, make_mesh(mesh_spec), p.rules, p.opt_rules)


def test_mesh_product_must_equal_the_device_count():
    with pytest.raises(ConfigError, match=r"data=2,tensor=2\) multiply to 4 but there are 8 "
                                          r"devices; make the product equal .* or use -1"):
        make_mesh("data=2,tensor=2")
    with pytest.raises(ConfigError, match="8 devices are not divisible by the other axes' product 3"):
        make_mesh("data=-1,tensor=3")


def test_dimension_not_divisible_by_its_mesh_axis():
    tiny = LlamaConfig.from_variant("tiny")  # mlp_dim 172 = 4 x 43
    with pytest.raises(ConfigError) as e:
        _shardings(tiny, "fsdp_tp", "tensor=8")
    msg = str(e.value)
    for needle in ("layers_0/attn/key/kernel", "'kv_heads', size 2", "mesh axis 'tensor' (size 8)",
                   "use a mesh where tensor divides 2"):
        assert needle in msg, msg
    with pytest.raises(ConfigError, match=r"'mlp', size 172\) is not divisible by mesh axis "
                                          r"'tensor' \(size 8\)"):
        _shardings(tiny.replace(num_heads=8, num_kv_heads=8), "tp_sp", "tensor=8")
    # ZeRO-1: params are replicated, but the optimizer state's own layout is checked too
    with pytest.raises(ConfigError, match=r"optimizer state of param embed/embedding \(256, 36\): "
                                          r"dimension 1 \('embed', size 36\) is not divisible by "
                                          r"mesh axis 'data' \(size 8\)"):
        _shardings(tiny.replace(dim=36, num_heads=2, num_kv_heads=2), "zero1", "data=8")


def test_experts_not_divisible_by_the_expert_axis():
    cfg = LlamaConfig(vocab_size=64, dim=32, num_layers=1, num_heads=4, mlp_dim=16, max_len=32,
                      num_experts=6)
    with pytest.raises(ConfigError) as e:
        _shardings(cfg, "expert", "expert=4,data=2")
    msg = str(e.value)
    for needle in ("layers_0/moe/", "'expert', size 6", "mesh axis 'expert' (size 4)",
                   "--mesh expert=2", "num_experts a multiple of 4"):
        assert needle in msg, msg


def test_unknown_logical_axis_or_mesh_axis_in_rules():
    with pytest.raises(ConfigError, match=r"unknown logical axis 'embd' \(did you mean 'embed'\?\)"):
        validate_rules((("embd", "fsdp"),))
    with pytest.raises(ConfigError, match="'mlp' maps to unknown mesh axis 'model'; mesh axes are"):
        validate_rules((("mlp", "model"),))
    with pytest.raises(ConfigError, match="unknown logical axis 'mlp_dim'"):
        Preset("mine", "a typo in a custom preset", rules=(("mlp_dim", "tensor"),))
    with pytest.raises(ConfigError, match="unknown logical axis 'headz'"):
        with activate(make_mesh("data=8"), (("headz", "tensor"),)):
            pass


def test_unknown_preset_suggests_the_closest(capsys, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown parallelism 'zero' \(did you mean 'zero1'\?\)"):
        ExperimentConfig(parallelism="zero")
    code = main(["train", LLM_TEXT, "--workdir", str(tmp_path / "wd"), "--set", "parallelism=fsdpp"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'fsdp'" in err, err


def test_mesh_axis_the_preset_never_uses(capsys, tmp_path):
    with pytest.raises(ConfigError, match=r"parallelism='data' does not use mesh axis 'tensor' "
                                          r"\(size 2\).*--mesh data=8.*fsdp_tp"):
        check_mesh(make_mesh("data=4,tensor=2"), get_preset("data"))
    # the same through the CLI: exit 2, one line, before any data is prepared
    code = main(["train", LLM_TEXT, "--workdir", str(tmp_path / "wd"), "--mesh", "fsdp=8",
                 "--set", "parallelism=zero1"])
    err = capsys.readouterr().err
    assert code == 2 and "does not use mesh axis 'fsdp' (size 8)" in err, err
    assert len(err.strip().splitlines()) == 1
    code = main(["train", LLM_TEXT, "--workdir", str(tmp_path / "wd"), "--mesh", "data=3"])
    err = capsys.readouterr().err
    assert code == 2 and "multiply to 3 but there are 8 devices" in err, err


def test_batch_rows_not_divisible_by_the_batch_axes():
    batch = {"inputs": np.zeros((6, 4), np.int32)}
    with pytest.raises(ConfigError, match=r"6 rows per process cannot be split over mesh axes "
                                          r"data \(8 devices across 1 process\(es\)\); make the "
                                          r"batch size a multiple of 8"):
        shard_batch(batch, make_mesh("data=8"), get_preset("data").rules)
