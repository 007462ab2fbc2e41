"""Hugging Face BLIP-2 <-> mmjax `Blip2`: `Blip2ForConditionalGeneration` and `Blip2Model` with a
LLaMA LLM (logits, Q-Former query outputs, image embeddings, every vision hidden state),
`Blip2ForImageTextRetrieval` (ITM logits, ITC similarities and features),
`Blip2ForConditionalGeneration` with an OPT LLM, `InstructBlipForConditionalGeneration`, greedy generation with
images identical to transformers', export round trips, strict config handling, prompts without
(or with the wrong number of) image tokens refused, and `mmjax compare` through the CLI.

Every tensor is randomised (norms around 1, biases and the zero-initialised query tokens and
key bias included), so a dropped or swapped tensor shows; prompts hold num_query_tokens real
image tokens per image and a left-padded row. Tolerance TOL = 1e-4 absolute in float32 (the
reasoning is in mmjax.convert.compare); measured ~1e-6.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

from mmjax import cli  # noqa: E402
from mmjax.convert import from_hf, to_hf  # noqa: E402
from mmjax.convert.blip2 import prompt_inputs  # noqa: E402
from mmjax.convert.compare import compare  # noqa: E402
from mmjax.errors import InputError, UnsupportedModelError  # noqa: E402
from mmjax.generate import GenerationConfig, generate  # noqa: E402

from support import hf_model_cache, randomise_torch  # noqa: E402

TOL = 1e-4
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=4)
QFORMER = dict(vocab_size=120, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
               max_position_embeddings=32)
LLAMA = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
OPT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
           max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=2)
CASES = {
    # the text FFN saved (use_qformer_text_input) but never run by this class: dropped on import
    "generation": ("Blip2ForConditionalGeneration", dict(use_qformer_text_input=True)),
    # cross-attention in every layer, no text FFN
    "model": ("Blip2Model", dict(cross_attention_frequency=1)),
    # an OPT LLM (learned positions with the offset of 2, ReLU, biases, pre-LN)
    "opt": ("Blip2ForConditionalGeneration", {}),
    "retrieval": ("Blip2ForImageTextRetrieval", dict(use_qformer_text_input=True)),
    # the instruction enters the Q-Former beside the queries
    "instruct": ("InstructBlipForConditionalGeneration", {}),
}


def build_hf_model(case, seed):
    torch.manual_seed(seed)
    cls, q = CASES[case]
    text = (transformers.OPTConfig(**OPT) if case == "opt" else transformers.LlamaConfig(**LLAMA)).to_dict()
    if case == "instruct":
        config = transformers.InstructBlipConfig(vision_config=VISION, qformer_config=QFORMER, text_config=text,
                                                 num_query_tokens=4, image_token_index=99)
    else:
        config = transformers.Blip2Config(vision_config=VISION, qformer_config=dict(QFORMER, **q), text_config=text,
                                          num_query_tokens=4, image_token_index=99, image_text_hidden_size=16)
    return randomise_torch(getattr(transformers, cls)(config), 0.08)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return hf_model_cache(tmp_path_factory, build_hf_model)


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_match_transformers(saved, case):
    _, path, module, _ = saved(case)
    result = compare(path, batch=2, seq_len=8)
    assert result["passed"], result["diffs"]
    keys = ({"itm_logits", "itc_sim", "image_feats", "text_feat"} if case == "retrieval"
            else {"logits", "query_output"})
    assert keys | {"image_embeds", "vision_hidden_states"} <= set(result["diffs"])
    assert max(result["diffs"].values()) < TOL
    assert result["reference_output_max_abs" if case == "retrieval" else "reference_logits_max_abs"] > 0.1
    assert module.config.qformer.text_input == (case in ("retrieval", "instruct"))
    assert module.config.instruct == (case == "instruct")
    assert module.config.qformer.has_cross_attention(1) == (case == "model")


def test_images_move_the_logits_and_count_is_enforced(saved):
    _, _, module, params = saved("generation")
    config = module.config
    tokens, mask, images, _ = prompt_inputs(np.random.default_rng(3), 2, 6, config)
    nhwc = images.transpose(0, 2, 3, 1)
    import jax

    forward = jax.jit(lambda p, t, x, m: module.apply({"params": p}, t, x, input_mask=m))
    a = forward(params, tokens, nhwc, mask)
    b = forward(params, tokens, nhwc[::-1].copy(), mask)
    assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) > 1e-2
    no_image = np.where(tokens == config.image_token_index, 5, tokens)
    with pytest.raises(InputError, match="no image tokens"):
        module.apply({"params": params}, no_image, nhwc, input_mask=mask)
    short = tokens.copy()
    short[0, np.argmax(tokens[0] == config.image_token_index)] = 5
    with pytest.raises(InputError, match=r"holds 7 image tokens.*8 query outputs"):
        module.apply({"params": params}, short, nhwc, input_mask=mask)


@pytest.mark.parametrize("case", ["generation", "opt"])
def test_greedy_generation_with_images_matches_transformers(saved, case):
    model, _, module, params = saved(case)
    tokens, mask, images, _ = prompt_inputs(np.random.default_rng(1), 2, 6, module.config)
    new = 6
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = model.generate(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(images),
                             attention_mask=torch.from_numpy(mask.astype(np.int64)), do_sample=False,
                             max_new_tokens=new, pad_token_id=0)
    ref_new = ref[:, -new:].numpy()
    out = generate(module, params, (tokens, mask), GenerationConfig(max_new_tokens=new, eos_token_id=()),
                   prefill_inputs={"images": images.transpose(0, 2, 3, 1)})
    np.testing.assert_array_equal(out.tokens, ref_new)


@pytest.mark.parametrize("case", ["generation", "retrieval", "instruct"])
def test_export_round_trip(saved, case, tmp_path):
    _, path, module, params = saved(case)
    out = str(tmp_path / "hf")
    to_hf(module, params, out)
    original, exported = load_file(os.path.join(path, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    if case == "generation":  # the never-run text FFN is not written back
        original = {k: v for k, v in original.items()
                    if not (k.startswith("qformer.encoder.layer.") and (".intermediate." in k or
                                                                        (".output." in k and "attention" not in k)))}
    assert set(exported) == set(original)
    for k, v in original.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    assert compare(out, batch=2, seq_len=6)["passed"]


def test_instruction_changes_the_query_outputs(saved):
    _, _, module, params = saved("instruct")
    tokens, mask, images, _ = prompt_inputs(np.random.default_rng(2), 2, 6, module.config)
    nhwc = images.transpose(0, 2, 3, 1)
    instr = np.array([[5, 6, 7, 8], [9, 10, 0, 0]])
    a = module.apply({"params": params}, tokens, nhwc, input_mask=mask, qformer_tokens=instr, qformer_mask=instr > 0)
    b = module.apply({"params": params}, tokens, nhwc, input_mask=mask, qformer_tokens=instr[:, ::-1].copy(),
                     qformer_mask=instr[:, ::-1] > 0)
    assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) > 1e-2
    with pytest.raises(InputError, match="pass qformer_tokens"):
        module.apply({"params": params}, tokens, nhwc, input_mask=mask)


def test_strict_config_and_cli_errors(saved, tmp_path, capsys):
    _, path, _, _ = saved("generation")
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)

    def write(name, cfg):
        d = tmp_path / name
        d.mkdir()
        with open(d / "config.json", "w") as f:
            json.dump(cfg, f)
        os.symlink(os.path.join(path, "model.safetensors"), d / "model.safetensors")
        return str(d)

    unset = write("unset", {**hf, "image_token_index": None})
    with pytest.raises(UnsupportedModelError, match="image_token_index is unset"):
        from_hf(unset)
    odd = write("odd", {**hf, "qformer_config": {**hf["qformer_config"], "fancy_gate": 1}})
    with pytest.raises(UnsupportedModelError, match="fancy_gate"):
        from_hf(odd)
    assert cli.main(["compare", unset]) == 2
    assert "image_token_index" in capsys.readouterr().err


def test_minigpt4_composite_of_transformers_parts(tmp_path):
    """MiniGPT-4 = BLIP-2's vision tower + Q-Former (frozen) + one Linear + a LLaMA, its image
    embeddings spliced between the prompt's "<Img>" and "</Img>" text: built here from separate
    transformers parts (no BLIP-2 class), run as MiniGPT-4 runs them, saved under the names the
    converter reads, and compared with mmjax's Blip2 on the prompt with image tokens."""
    from safetensors.torch import save_file

    torch.manual_seed(11)
    vcfg, qcfg = transformers.Blip2VisionConfig(**VISION), transformers.Blip2QFormerConfig(**QFORMER, encoder_hidden_size=48)
    vision = randomise_torch(transformers.Blip2VisionModel(vcfg))
    qformer = randomise_torch(transformers.Blip2QFormerModel(qcfg))
    query_tokens = torch.nn.Parameter(0.5 * torch.randn(1, 4, 64))
    proj = randomise_torch(torch.nn.Linear(64, 32))
    llama = randomise_torch(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)))
    rng = np.random.default_rng(5)
    images = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
    before, after = rng.integers(3, 99, size=(2, 5)), rng.integers(3, 99, size=(2, 4))  # "###Human: <Img>", "</Img> ..."
    with torch.no_grad():
        img = vision(pixel_values=torch.from_numpy(images)).last_hidden_state
        q = qformer(query_embeds=query_tokens.expand(2, -1, -1), encoder_hidden_states=img,
                    encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long)).last_hidden_state
        emb = llama.get_input_embeddings()
        embeds = torch.cat([emb(torch.from_numpy(before)), proj(q), emb(torch.from_numpy(after))], dim=1)
        ref = llama(inputs_embeds=embeds).logits.numpy()
    tensors = {"query_tokens": query_tokens.detach(), **{f"vision_model.{k}": v for k, v in vision.state_dict().items()},
               **{f"qformer.{k}": v for k, v in qformer.state_dict().items()},
               **{f"language_projection.{k}": v for k, v in proj.state_dict().items()},
               **{f"language_model.{k}": v for k, v in llama.state_dict().items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER,
                                   text_config=transformers.LlamaConfig(**LLAMA).to_dict(), num_query_tokens=4,
                                   image_token_index=99)
    cfg.architectures = ["Blip2ForConditionalGeneration"]
    cfg.save_pretrained(str(tmp_path))
    module, params = from_hf(str(tmp_path))
    tokens = np.concatenate([before, np.full((2, 4), 99), after], axis=1)
    ours = np.asarray(module.apply({"params": params}, tokens, images.transpose(0, 2, 3, 1)))
    diff = float(np.abs(ours - ref).max())
    print(f"MiniGPT-4 composite logits max abs diff {diff:.2e}")
    assert diff < TOL
    assert float(np.abs(ref).max()) > 0.1
