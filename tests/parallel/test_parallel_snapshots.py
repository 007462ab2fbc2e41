"""Sharding snapshots: the partition spec of every param and optimizer-state leaf under each
parallelism preset, for a small LLaMA and a small MoE LLaMA, is recorded in
`tests/snapshots/sharding_<preset>.json`; a silent layout change fails here.

After an intended change, regenerate and review the diff:

    MMJAX_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest -q tests/test_parallel_snapshots.py
    git diff tests/snapshots/
"""

import json
import os

import jax
import pytest
from jax.sharding import PartitionSpec

from mmjax.models.llama import Llama, LlamaConfig
from mmjax.parallel import PRESETS, get_preset, make_mesh
from mmjax.tasks.lm import lm_init_fn
from mmjax.train.experiment import OptimizerConfig
from mmjax.train.optimizer import make_optimizer, path_str
from mmjax.train.state import abstract_boxed_params, state_shardings

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

SNAPSHOTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "snapshots")
UPDATE = os.environ.get("MMJAX_UPDATE_SNAPSHOTS") == "1"
MODELS = {
    "llama": LlamaConfig(vocab_size=256, dim=64, num_layers=2, num_heads=8, num_kv_heads=4,
                         mlp_dim=128, max_len=64),
    "llama_moe": LlamaConfig(vocab_size=256, dim=64, num_layers=2, num_heads=8, num_kv_heads=4,
                             mlp_dim=32, max_len=64, num_experts=8, experts_per_token=2),
}


def _spec(sharding) -> list:
    spec = tuple(sharding.spec) if isinstance(sharding.spec, PartitionSpec) else ()
    return [list(s) if isinstance(s, tuple) else s for s in spec]


def layout(preset_name: str, cfg: LlamaConfig) -> dict:
    """{"params": {path: spec}, "opt_state": {path: spec}} under the preset's example mesh."""
    preset = get_preset(preset_name)
    init = lm_init_fn(Llama(cfg), 16)
    tx, _ = make_optimizer(OptimizerConfig(), 10, abstract_boxed_params(init))
    sh = state_shardings(init, tx, make_mesh(preset.example_mesh), preset.rules, preset.opt_rules)
    out = {}
    for part in ("params", "opt_state"):
        leaves = jax.tree_util.tree_flatten_with_path(getattr(sh, part))[0]
        out[part] = {path_str(p): _spec(s) for p, s in leaves}
    return out


@pytest.mark.parametrize("preset", list(PRESETS))
def test_sharding_layout_matches_snapshot(preset):
    current = {"mesh": get_preset(preset).example_mesh,
               **{name: layout(preset, cfg) for name, cfg in MODELS.items()}}
    path = os.path.join(SNAPSHOTS, f"sharding_{preset}.json")
    if UPDATE or not os.path.exists(path):
        if not UPDATE:
            pytest.fail(f"{path} is missing; run with MMJAX_UPDATE_SNAPSHOTS=1 to create it")
        with open(path, "w") as f:
            json.dump(current, f, indent=1, sort_keys=True)
            f.write("\n")
    with open(path) as f:
        recorded = json.load(f)
    diffs = []
    for model in MODELS:
        for part in ("params", "opt_state"):
            want, got = recorded[model][part], current[model][part]
            for leaf in sorted(set(want) | set(got)):
                if want.get(leaf, "absent") != got.get(leaf, "absent"):
                    diffs.append(f"{model} {part} {leaf}: recorded {want.get(leaf, 'absent')}, "
                                 f"now {got.get(leaf, 'absent')}")
    assert recorded["mesh"] == current["mesh"]
    assert not diffs, (f"{len(diffs)} sharding change(s) under preset {preset!r} "
                       "(regenerate with MMJAX_UPDATE_SNAPSHOTS=1 if intended):\n"
                       + "\n".join(diffs[:20]))


def test_snapshots_record_the_presets_intent():
    """Spot checks of the recorded files themselves, so a wrong snapshot cannot be regenerated
    into passing unnoticed."""
    def load(p):
        with open(os.path.join(SNAPSHOTS, f"sharding_{p}.json")) as f:
            return json.load(f)
    gate = "layers_0/mlp/gate/kernel"           # [embed, mlp]
    moe_gate = "layers_0/moe/gate"              # [expert, embed, mlp]
    mu = "1/0/mu/layers_0/mlp/gate/kernel"      # chain(clip, adamw): adamw's first moment
    assert load("data")["llama"]["params"][gate] == [None, None]
    assert load("data")["llama"]["opt_state"][mu] == [None, None]
    assert load("zero1")["llama"]["params"][gate] == [None, None]
    assert load("zero1")["llama"]["opt_state"][mu] == ["data", None]
    assert load("fsdp")["llama"]["params"][gate] == ["fsdp", None]
    assert load("fsdp")["llama"]["opt_state"][mu] == ["fsdp", None]
    assert load("fsdp_tp")["llama"]["params"][gate] == ["fsdp", "tensor"]
    assert load("tp_sp")["llama"]["params"]["layers_0/mlp/down/kernel"] == ["tensor", None]
    assert load("expert")["llama_moe"]["params"][moe_gate] == ["expert", "fsdp", None]
    assert load("expert")["llama_moe"]["params"]["layers_0/moe/router"] == ["fsdp", None]
    fl = load("flamingo")["llama"]
    assert fl["params"]["embed/embedding"] == ["tensor", None]
    assert fl["params"]["layers_0/attn/query/kernel"] == [None, "tensor", None]
    assert fl["opt_state"]["1/0/mu/layers_0/attn/query/kernel"] == ["data", "tensor", None]
