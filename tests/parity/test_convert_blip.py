"""Hugging Face `BlipForConditionalGeneration` / `BlipForImageTextRetrieval` /
`BlipForQuestionAnswering` <-> mmjax `Blip`: parity with the PyTorch reference (caption logits;
ITM logits and ITC similarities; VQA answer logits and question states; image embeddings and
every vision hidden state), greedy captions and VQA answers identical to transformers'
`generate`, round trips (incl. `mmjax convert` / `export`), strict config handling and
`mmjax compare`.

Each case is a random-weight transformers model (every tensor randomised, norms and biases
included) saved with `save_pretrained` and converted with `from_hf`; the text side is wider
(48) than the image encoder (32), so the cross-attention's key/value widths are checked.
Tolerance TOL = 1e-4 absolute in float32 (mmjax.convert.compare); the measured diffs of these
2-layer models are ~1e-7.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

from mmjax import cli  # noqa: E402
from mmjax.convert import blip as blip_convert  # noqa: E402
from mmjax.convert import to_hf  # noqa: E402
from mmjax.convert.compare import compare, convert_dir, export_dir  # noqa: E402
from mmjax.errors import UnsupportedModelError  # noqa: E402
from mmjax.generate import GenerationConfig, generate  # noqa: E402
from mmjax.generate.vqa import answer_vqa  # noqa: E402

from support import hf_model_cache, randomise_torch  # noqa: E402

TOL = 1e-4
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=4)
TEXT = dict(vocab_size=99, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=40, bos_token_id=97, sep_token_id=98, pad_token_id=0, eos_token_id=2)
CASES = {"caption": "BlipForConditionalGeneration", "retrieval": "BlipForImageTextRetrieval",
         "vqa": "BlipForQuestionAnswering"}


def build_hf_model(case, seed):
    torch.manual_seed(seed)
    # vqa: the answer decoder's cross-attention reads the question states (text width) through
    # projections of the vision width, so the two widths are equal there
    vision = dict(VISION, hidden_size=48) if case == "vqa" else VISION
    config = transformers.BlipConfig(vision_config=vision, text_config=TEXT, image_text_hidden_size=24)
    return randomise_torch(getattr(transformers, CASES[case])(config), 0.08)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return hf_model_cache(tmp_path_factory, build_hf_model)


@pytest.mark.parametrize("case", list(CASES))
def test_blip_matches_transformers(saved, case):
    """Logits / ITM / ITC, image embeddings and vision hidden states on a right-padded batch."""
    _, path, module, _ = saved(case)
    assert module.config.task == case
    report = compare(path, batch=3, seq_len=12)
    assert report["passed"] is True and report["max_abs_diff"] <= TOL, report["diffs"]
    want = {"caption": {"logits"}, "retrieval": {"itm_logits", "itc_sim"},
            "vqa": {"logits", "question_states"}}[case]
    assert want | {"image_embeds", "vision_hidden_states"} <= set(report["diffs"])
    assert len(set(report["inputs"]["lengths"])) == 3
    assert report["reference_output_max_abs"] > 10 * TOL  # not vacuous


def test_itc_and_itm_methods(saved):
    model, _, module, params = saved("retrieval")
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
    tokens = rng.integers(0, 97, size=(3, 7))
    mask = np.ones((3, 7), bool)
    mask[2, 4:] = False
    with torch.no_grad():
        # HF's ITC compares image i with every text: run it with the images repeated per text
        ref_sim = model(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(images[[0, 1, 1]]),
                        attention_mask=torch.from_numpy(mask.astype(np.int64)), use_itm_head=False).itm_score
    nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
    img, txt, sim = module.apply({"params": params}, nhwc, jnp.asarray(tokens), jnp.asarray(mask), method="itc")
    assert sim.shape == (2, 3) and img.shape == (2, 24) and txt.shape == (3, 24)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(txt), axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sim), ref_sim.numpy()[[0, 1]], atol=TOL)
    itm = module.apply({"params": params}, nhwc, jnp.asarray(tokens[:2]), jnp.asarray(mask[:2]),
                       method="itm_logits")
    with torch.no_grad():
        ref_itm = model(input_ids=torch.from_numpy(tokens[:2]), pixel_values=torch.from_numpy(images),
                        attention_mask=torch.from_numpy(mask[:2].astype(np.int64))).itm_score
    np.testing.assert_allclose(np.asarray(itm), ref_itm.numpy(), atol=TOL)


def test_greedy_captions_equal_transformers_generate(saved):
    model, _, module, params = saved("caption")
    images = np.random.default_rng(2).normal(size=(3, 3, 16, 16)).astype(np.float32)
    n = 12
    with torch.no_grad():
        ref = model.generate(pixel_values=torch.from_numpy(images), max_new_tokens=n, do_sample=False,
                             num_beams=1).numpy()
    c = module.config
    out = generate(module, params, [[c.bos_token_id]] * 3,
                   GenerationConfig(max_new_tokens=n, pad_token_id=c.pad_token_id, prompt_bucket=4),
                   prefill_inputs={"images": jnp.asarray(images.transpose(0, 2, 3, 1))})
    assert (ref[:, 0] == c.bos_token_id).all()
    ref_new = np.full((3, n), c.pad_token_id)
    ref_new[:, :ref.shape[1] - 1] = ref[:, 1:]
    np.testing.assert_array_equal(out.tokens, ref_new)
    assert np.ptp(out.scores) > 1e-3  # the image matters (the tiny model's captions themselves agree)


def test_greedy_vqa_answers_equal_transformers_generate(saved):
    """Right-padded questions: the encoder masks their padding, the answer decoder (as
    transformers' generate) reads every question state."""
    model, _, module, params = saved("vqa")
    rng = np.random.default_rng(3)
    images = rng.normal(size=(3, 3, 16, 16)).astype(np.float32)
    question = rng.integers(1, 97, size=(3, 6))
    qmask = np.ones((3, 6), bool)
    qmask[1, 4:] = qmask[2, 2:] = False
    question[~qmask] = 0
    n = 10
    with torch.no_grad():
        ref = model.generate(input_ids=torch.from_numpy(question), pixel_values=torch.from_numpy(images),
                             attention_mask=torch.from_numpy(qmask.astype(np.int64)), max_new_tokens=n,
                             do_sample=False, num_beams=1).numpy()
    c = module.config
    out = answer_vqa(module, params, jnp.asarray(images.transpose(0, 2, 3, 1)), question, qmask,
                     GenerationConfig(max_new_tokens=n, pad_token_id=c.pad_token_id, prompt_bucket=4))
    assert (ref[:, 0] == c.bos_token_id).all()
    ref_new = np.full((3, n), c.pad_token_id)
    ref_new[:, :ref.shape[1] - 1] = ref[:, 1:]
    np.testing.assert_array_equal(out.tokens, ref_new)
    assert np.ptp(out.scores) > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_gives_identical_tensors(saved, case, tmp_path):
    model, path, module, params = saved(case)
    to_hf(module, params, str(tmp_path / "hf"))
    original = load_file(os.path.join(path, "model.safetensors"))
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(original) == sorted(exported)
    for key in original:
        np.testing.assert_array_equal(original[key], exported[key], err_msg=key)
    assert blip_convert.config_from_hf(blip_convert.config_to_hf(module.config)) == module.config
    back = getattr(transformers, CASES[case]).from_pretrained(str(tmp_path / "hf"))
    assert type(back).__name__ == CASES[case]
    if case != "retrieval":  # mmjax convert / export: HF dir -> mmjax model dir -> HF dir
        convert_dir(path, str(tmp_path / "mmjax"))
        export_dir(str(tmp_path / "mmjax"), str(tmp_path / "again"))
        again = load_file(str(tmp_path / "again" / "model.safetensors"))
        for key in original:
            np.testing.assert_array_equal(original[key], again[key], err_msg=key)


def _config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(architectures=["BlipModel"]), "BlipModel"),
    (lambda c: c.update(mystery=1), "mystery"),
    (lambda c: c["text_config"].update(is_decoder=False), "is_decoder"),
    (lambda c: c["text_config"].update(tie_word_embeddings=False), "tie_word_embeddings"),
    (lambda c: c["text_config"].update(hidden_act="mish"), "mish"),
    (lambda c: c["vision_config"].update(num_channels=1), "num_channels"),
    (lambda c: c["vision_config"].update(model_type="clip_vision_model"), "clip_vision_model"),
    (lambda c: c["text_config"].update(bos_token_id=500), "bos_token_id"),
])
def test_strict_config_from_hf(saved, edit, needle):
    _, path, _, _ = saved("caption")
    hf = _config(path)
    edit(hf)
    with pytest.raises(UnsupportedModelError, match=needle):
        blip_convert.config_from_hf(hf)


def test_harmless_keys_and_refusals(saved):
    _, path, module, _ = saved("retrieval")
    hf = _config(path)
    hf.update(label_smoothing=0.1, projection_dim=64)
    hf["text_config"].update(hidden_dropout_prob=0.1, eos_token_id=5)
    assert blip_convert.config_from_hf(hf) == module.config
    with pytest.raises(UnsupportedModelError, match="model_type"):
        blip_convert.config_to_hf(module.config, "bert")
    bad = module.config.replace(head_activation="relu")
    with pytest.raises(UnsupportedModelError, match="head_activation"):
        blip_convert.config_to_hf(bad)


@pytest.mark.parametrize("case", list(CASES))
def test_compare_cli(saved, case, capsys):
    _, path, _, _ = saved(case)
    assert cli.main(["compare", path, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["passed"] is True and report["model_type"] == "blip"
