"""Experiment configs: loading a file, --set overrides, unknown keys with suggestions."""

import os

import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.train.experiment import ExperimentConfig, apply_overrides, load_experiment, parse_override

from support import ROOT  # noqa: E402
LLM_TEXT = os.path.join(ROOT, "experiments", "llm_text.py")


def test_llm_text_config_loads_and_documents_itself():
    cfg = load_experiment(LLM_TEXT)
    assert isinstance(cfg, ExperimentConfig) and cfg.name == "llm_text"
    import importlib.util

    spec = importlib.util.spec_from_file_location("llm_text", LLM_TEXT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    doc = mod.__doc__ or ""
    assert "mmjax train experiments/llm_text.py" in doc
    assert "runtime" in doc.lower() and "val_bpb" in doc


def test_nested_overrides_are_parsed_as_literals():
    cfg = load_experiment(LLM_TEXT, [
        "optimizer.learning_rate=1e-4", "model.num_layers=3", "data.corpus=shakespeare",
        "optimizer.freeze=['^embed/']", "steps=7", "optimizer.grad_clip=None", "model.dtype='float32'",
    ])
    assert cfg.optimizer.learning_rate == 1e-4
    assert cfg.model.num_layers == 3
    assert cfg.data.corpus == "shakespeare"
    assert cfg.optimizer.freeze == ("^embed/",)
    assert cfg.steps == 7 and cfg.optimizer.grad_clip is None


def test_int_given_for_float_field_is_converted():
    cfg = apply_overrides(ExperimentConfig(), ["optimizer.learning_rate=1"])
    assert isinstance(cfg.optimizer.learning_rate, float)


def test_float_given_for_a_float_field_holding_an_int_is_kept():
    # a config file may write `time_budget_s=540`: the field's type (float | None) decides
    cfg = apply_overrides(ExperimentConfig(time_budget_s=540), ["time_budget_s=0.5"])
    assert cfg.time_budget_s == 0.5
    with pytest.raises(ConfigError, match="expected an integer"):
        apply_overrides(ExperimentConfig(), ["steps=2.5"])


def test_unknown_key_suggests_closest_name():
    with pytest.raises(ConfigError, match=r"did you mean 'optimizer.learning_rate'"):
        apply_overrides(ExperimentConfig(), ["optimizer.learning_rat=1e-3"])
    with pytest.raises(ConfigError, match=r"did you mean 'model.num_layers'"):
        apply_overrides(ExperimentConfig(), ["model.num_layer=2"])
    with pytest.raises(ConfigError, match="unknown config key"):
        apply_overrides(ExperimentConfig(), ["nonsense=1"])


def test_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("steps")
    with pytest.raises(ConfigError, match="expected an integer"):
        apply_overrides(ExperimentConfig(), ["steps=2.5"])
    with pytest.raises(ConfigError, match="expected"):
        apply_overrides(ExperimentConfig(), ["data.seq_len='long'"])
    with pytest.raises(ConfigError, match="must be positive"):
        apply_overrides(ExperimentConfig(), ["model.dim=0"])
    with pytest.raises(ConfigError, match="not a group"):
        apply_overrides(ExperimentConfig(), ["steps.x=1"])


def test_missing_config_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_experiment(str(tmp_path / "nope.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        load_experiment(str(bad))


@pytest.mark.parametrize("order", [1, -1])
def test_overrides_are_validated_together_in_any_order(order):
    items = ["model.num_heads=6", "model.num_kv_heads=3", "model.dim=192",
             "model.max_len=1024", "data.seq_len=1024"][::order]
    cfg = apply_overrides(ExperimentConfig(), items)
    assert (cfg.model.num_heads, cfg.model.num_kv_heads, cfg.data.seq_len) == (6, 3, 1024)


def test_an_invalid_final_combination_names_the_overrides():
    with pytest.raises(ConfigError, match="model.num_heads=8, model.num_kv_heads=3: .*multiple of"):
        apply_overrides(ExperimentConfig(), ["model.num_heads=8", "model.num_kv_heads=3"])
