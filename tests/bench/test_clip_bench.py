"""`mmjax bench clip` on a tiny config: the result has the documented fields, and the two
programs it times train the same model -- the same loss at the first step and, after 5 more
AdamW steps on the same batches, still the same loss (gradients and optimizer agree, not only
the forward pass). Tolerance 1e-4 on losses ~4 (float32 rounding of two implementations)."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

TINY = dict(image_size=16, patch_size=8, vision_dim=32, vision_layers=1, vision_heads=2, vision_mlp=64,
            vocab_size=64, max_len=8, text_dim=32, text_layers=1, text_heads=2, text_mlp=64, projection_dim=16)


def test_bench_clip_trains_the_same_model_on_both_sides():
    from mmjax.bench import run

    result = run("clip", batch=6, steps=2, repeats=2, warmup=1, model=TINY, reference_threads_sweep=False)
    assert result["name"] == "clip" and "CLIPModel(return_loss=True)" in result["reference"]
    case = result["cases"][0]
    assert result["ratio"] == case["ratio"] > 0
    assert case["mmjax_images_per_s"] > 0 and case["reference_images_per_s"] > 0
    assert case["steps_taken"] == 6
    assert case["first_loss_abs_diff"] < 1e-4 and case["last_loss_abs_diff"] < 1e-4, case
    assert abs(case["last_loss_mmjax"] - case["first_loss_mmjax"]) > 1e-3  # training moved the loss
