"""`mmjax bench memory` on a small model: the compiled step's per-device state shows ZeRO-1
dividing the optimizer state and FSDP dividing params + optimizer state by the axis size (8).

The only leaves left whole are the norm scales and Adam's step counter (replicated by every
preset): 5 x 128 of the ~390k params here, so the measured fractions sit within 0.002 of 1/8.
"""

import jax
import pytest

from mmjax.bench import run

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

SMALL = dict(vocab_size=256, dim=128, num_layers=2, num_heads=8, num_kv_heads=8, mlp_dim=256,
             max_len=64)


def test_zero1_divides_optimizer_state_and_fsdp_divides_params_and_optimizer_state():
    result = run("memory", presets=("data", "zero1", "fsdp"), moe_presets=(), model=SMALL,
                 batch=8, seq_len=32)
    cases = {c["preset"]: c for c in result["cases"]}
    data, zero1, fsdp = cases["data"], cases["zero1"], cases["fsdp"]
    n_params = result["model"]["num_params"]
    assert data["params_bytes"] == 4 * n_params  # float32, all on every device
    assert data["opt_state_bytes"] >= 2 * data["params_bytes"]  # AdamW mu + nu
    assert zero1["vs_data"]["params"] == 1.0
    assert zero1["vs_data"]["opt_state"] == pytest.approx(1 / 8, abs=0.002)
    assert fsdp["vs_data"]["params"] == pytest.approx(1 / 8, abs=0.002)
    assert fsdp["vs_data"]["opt_state"] == pytest.approx(1 / 8, abs=0.002)
    # the compiled program's own inputs agree with the per-leaf shard sizes (batch aside)
    for c in (data, zero1, fsdp):
        assert 0 <= c["argument_bytes"] - c["state_bytes"] < 8 * 32 * 4 * 5
        assert c["temp_bytes"] > 0 and c["alias_bytes"] > 0.9 * c["state_bytes"]
    assert result["ratio_case"] == "dense/zero1"
    assert result["ratio"] == pytest.approx(data["state_bytes"] / zero1["state_bytes"])


def test_unknown_argument_is_named():
    from mmjax.errors import InputError

    with pytest.raises(InputError, match="has no argument 'preset'"):
        run("memory", preset="data")
