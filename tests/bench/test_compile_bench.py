"""`mmjax bench compile` on a tiny config (3 layers, dim 32): the result has the documented
fields, the loop and scan programs compute the same loss on the same batch from the same
(converted) weights, and every time is positive. No timing comparisons: those depend on the
machine and its load."""

from mmjax.bench import run


def test_bench_compile_loop_and_scan_fields_and_same_loss():
    result = run("compile", num_layers=3, dim=32, num_heads=2, mlp_dim=64, vocab_size=128,
                 seq_len=16, batch=2, steps=2, warmup=False)
    assert result["name"] == "compile"
    assert result["reference"] == "Python loop over layers, same model and step"
    assert result["losses_match"] is True, (result["loss_abs_diff"], result["cases"])
    assert result["grad_norm_rel_diff"] < 1e-4
    loop, scan = result["cases"]
    assert (loop["mode"], scan["mode"]) == ("loop", "scan")
    assert (loop["scan_layers"], scan["scan_layers"]) == (False, True)
    for case in (loop, scan):
        for key in ("trace_lower_s", "compile_s", "total_s", "first_step_s", "step_s"):
            assert case[key] > 0, (case["mode"], key, case[key])
        assert case["num_params"] == result["model"]["num_params"]
    assert result["ratio"] == loop["compile_s"] / scan["compile_s"] > 0
    assert result["total_ratio"] > 0 and result["step_ratio"] > 0
    assert abs(loop["last_loss"] - loop["first_loss"]) > 1e-4  # the AdamW steps moved the loss
    assert result["model"]["num_layers"] == 3 and result["model"]["dim"] == 32
    assert "model" in result["cpu"] and "machine" in result


def test_bench_compile_config_options():
    import pytest

    from mmjax.bench.compile import bench_config
    from mmjax.errors import ConfigError

    c = bench_config()
    assert (c.num_layers, c.dim, c.num_heads, c.mlp_dim, c.vocab_size) == (24, 256, 4, 688, 4096)
    assert not c.remat and not c.scan_layers
    c = bench_config(num_layers=3, dim=64, num_heads=2, seq_len=1024, remat="dots_no_batch")
    assert (c.num_layers, c.dim, c.num_heads, c.max_len) == (3, 64, 2, 1024)
    assert c.remat and c.remat_policy == "dots_no_batch"
    with pytest.raises(ConfigError, match="remat"):
        bench_config(remat="dot")
