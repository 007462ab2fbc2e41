"""`mmjax bench speculative`: speculative greedy decoding vs transformers' assisted generation.

Models: the main job's recipe (`experiments/llm_text.py`: pydoc text, its BPE tokenizer, AdamW)
at two sizes, trained by this benchmark for `train_steps` steps (shorter than the main job's) into
`workdir/target` and `workdir/draft`; a second run finds the checkpoints there and reuses them
(delete the folders to retrain). The target is the recipe's model (dim 256, 4 layers); the draft
is `draft_overrides` of it (dim 128, 2 layers by default). Both checkpoints are exported with
`mmjax.convert.to_hf` and read back: mmjax runs `from_hf`'s float32 modules, transformers
`LlamaForCausalLM.from_pretrained` of the same directories (float32, eager attention), so both
sides run the same weights. Prompts: `prompt_len` tokens ([BOS] + text) cut from the
validation split at evenly spaced offsets.

Each case decodes `new_tokens` tokens greedily (EOS disabled, so every run makes exactly
`new_tokens`), prefill included; times are medians of `repeats` runs after a warm-up run
(which compiles mmjax's program; reported as `*_first_call_s`). Per batch size: mmjax plain
`generate`, mmjax `speculative_generate` (k = `num_draft_tokens`), and at batch 1 transformers'
`generate(assistant_model=draft)` with a constant k = `num_draft_tokens` (it refuses batch > 1).
`ratio` = mmjax speculative tokens/s / transformers assisted tokens/s at batch 1 (transformers'
plain greedy `generate` is timed too, as `reference_plain_tokens_per_s`, for context);
`speedup_over_plain` = speculative / plain mmjax tokens/s (batch 1; each case has its own);
`tokens_match`: speculative == plain greedy on every row of every case.

`torch_threads` sets torch's thread count for the reference (default: torch's own, one per
core); on a loaded machine `torch_threads=1` can be much faster for torch.

`temperature` > 0 (with `top_k`) times sampling instead of greedy on both sides (speculative
sampling vs plain sampling; transformers `do_sample=True`); `tokens_match` is then None.
Greedy continuations of these small, briefly trained models fall into repetitions ("0000...",
"----..."), which a draft predicts easily; sampling gives a less flattering acceptance rate.

`draft_schedule="heuristic"` makes k adaptive on both sides with the same rule (k + 2 after a
round whose drafts were all accepted, else k - 1, floor 1, starting at `num_draft_tokens`):
mmjax `speculative_generate(draft_schedule="heuristic")`, which caps k at `num_draft_tokens`
(its verify pass has that static size), and transformers `num_assistant_tokens_schedule=
"heuristic_transient"` (the rule of "heuristic", reset at each call so that the repeats start
alike; transformers does not cap k). `draft_confidence` (a probability) stops a round's drafting
after a token the draft was less sure of: mmjax `draft_confidence`, transformers
`assistant_confidence_threshold` (which transformers also re-tunes between rounds when sklearn
is installed). Each case reports mmjax's `mean_draft_tokens` (the schedule's k averaged over
rounds) and `draft_calls`.

`random_models=True` replaces the trained models by tiny random ones (no training, no text:
a quick smoke run of the code path; its speeds mean nothing).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Sequence

import numpy as np

RECIPE = "experiments/llm_text.py"
DRAFT_OVERRIDES = ("model.dim=128", "model.num_layers=2", "model.num_heads=4",
                   "model.num_kv_heads=2", "model.mlp_dim=344")


def run(
    batch_sizes: Sequence[int] = (1, 4),
    new_tokens: int = 128,
    prompt_len: int = 32,
    num_draft_tokens: int = 4,
    repeats: int = 3,
    workdir: str = "workdirs/bench_speculative",
    train_steps: int = 300,
    draft_overrides: Sequence[str] = DRAFT_OVERRIDES,
    random_models: bool = False,
    torch_threads: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    draft_schedule: str = "constant",
    draft_confidence: float | None = None,
) -> dict[str, Any]:
    import jax
    import torch
    import transformers

    if torch_threads:
        torch.set_num_threads(int(torch_threads))
    from mmjax.convert import from_hf, to_hf
    from mmjax.generate import GenerationConfig, generate, speculative_generate

    k = int(num_draft_tokens)
    if draft_schedule not in ("constant", "heuristic"):
        from mmjax.errors import ConfigError

        raise ConfigError(f"draft_schedule must be 'constant' or 'heuristic', got "
                          f"{draft_schedule!r}")
    draft_confidence = None if draft_confidence in (None, "None", "none") \
        else float(draft_confidence)
    models: dict[str, Any] = {}
    hf_dirs: dict[str, str] = {}
    if random_models:
        vocab = 256
        for name, (dim, layers) in (("target", (64, 2)), ("draft", (32, 1))):
            hf_dirs[name] = os.path.join(workdir, f"random_{name}_hf")
            if not os.path.isdir(hf_dirs[name]):
                torch.manual_seed(seed + layers)
                cfg = transformers.LlamaConfig(
                    vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim,
                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=512, tie_word_embeddings=False)
                transformers.LlamaForCausalLM(cfg).save_pretrained(hf_dirs[name])
            models[name] = {"random": True, "dim": dim, "num_layers": layers}
        rng = np.random.default_rng(seed)
        text_prompts = rng.integers(3, vocab, size=(max(batch_sizes), prompt_len)).tolist()
    else:
        text_prompts = None
        for name, overrides in (("target", ()), ("draft", tuple(draft_overrides))):
            wd = os.path.join(workdir, name)
            info = _train_or_reuse(wd, overrides, train_steps)
            hf_dirs[name] = os.path.join(wd, "hf")
            if not os.path.isfile(os.path.join(hf_dirs[name], "config.json")):
                from mmjax.train import load_for_inference

                module, params, tokenizer = load_for_inference(wd)
                to_hf(module, params, hf_dirs[name])
            models[name] = info
        from mmjax.train import load_for_inference

        _, _, tokenizer = load_for_inference(os.path.join(workdir, "target"))
        _, _, draft_tok = load_for_inference(os.path.join(workdir, "draft"))
        if tokenizer.serialized_model_proto() != draft_tok.serialized_model_proto():
            raise RuntimeError("bench speculative: the target's and the draft's tokenizers differ;"
                               f" delete {workdir} and rerun")
        text_prompts = _text_prompts(tokenizer, max(batch_sizes), prompt_len)

    target, tparams = from_hf(hf_dirs["target"])
    draft, dparams = from_hf(hf_dirs["draft"])
    hf_t = transformers.LlamaForCausalLM.from_pretrained(
        hf_dirs["target"], torch_dtype=torch.float32, attn_implementation="eager").eval()
    hf_d = transformers.LlamaForCausalLM.from_pretrained(
        hf_dirs["draft"], torch_dtype=torch.float32, attn_implementation="eager").eval()
    hf_d.generation_config.num_assistant_tokens = k
    hf_d.generation_config.num_assistant_tokens_schedule = (
        "heuristic_transient" if draft_schedule == "heuristic" else "constant")
    # 0.0: always propose k
    hf_d.generation_config.assistant_confidence_threshold = draft_confidence or 0.0
    for name, m in (("target", hf_t), ("draft", hf_d)):
        models[name]["num_params"] = sum(p.numel() for p in m.parameters())
        models[name]["dim"] = m.config.hidden_size
        models[name]["num_layers"] = m.config.num_hidden_layers

    sampling = temperature > 0
    gen = GenerationConfig(max_new_tokens=new_tokens, temperature=temperature, top_k=top_k,
                           eos_token_id=(), pad_token_id=0, prompt_bucket=prompt_len)
    hf_sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or 0) if sampling \
        else dict(do_sample=False)
    key = jax.random.key(seed)
    cases = []
    for batch in batch_sizes:
        tokens = np.asarray(text_prompts[:batch], np.int32)
        mask = np.ones_like(tokens, bool)

        def plain():
            return generate(target, tparams, (tokens, mask), gen, rng=key)

        def spec():
            return speculative_generate(target, tparams, draft, dparams, (tokens, mask), gen, key,
                                        num_draft_tokens=k, draft_schedule=draft_schedule,
                                        draft_confidence=draft_confidence)

        t0 = time.perf_counter()
        ref = plain()
        plain_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = spec()
        spec_first = time.perf_counter() - t0
        t_plain = statistics.median(_timed(plain) for _ in range(repeats))
        t_spec = statistics.median(_timed(spec) for _ in range(repeats))
        n_tok = batch * new_tokens
        case = {
            "batch": batch, "new_tokens": new_tokens, "prompt_len": prompt_len,
            "num_draft_tokens": k, "draft_schedule": draft_schedule,
            "draft_confidence": draft_confidence, "mean_draft_tokens": out.mean_draft_tokens,
            "draft_calls": out.draft_calls,
            "mmjax_tokens_per_s": n_tok / t_spec, "mmjax_plain_tokens_per_s": n_tok / t_plain,
            "speedup_over_plain": t_plain / t_spec, "mmjax_s": t_spec, "mmjax_plain_s": t_plain,
            "mmjax_first_call_s": spec_first, "mmjax_plain_first_call_s": plain_first,
            "acceptance_rate": out.acceptance_rate, "rounds": out.rounds,
            # sampling: other draws than plain sampling, so no token comparison
            "tokens_match": None if sampling else bool(np.array_equal(out.tokens, ref.tokens)),
        }
        if batch == 1:
            ids = torch.from_numpy(tokens.astype(np.int64))

            def hf_greedy(**assist):
                with torch.no_grad():
                    res = hf_t.generate(ids, attention_mask=torch.ones_like(ids),
                                        **hf_sampling, max_new_tokens=new_tokens,
                                        min_new_tokens=new_tokens, eos_token_id=None,
                                        pad_token_id=0, **assist)
                return res[:, prompt_len:].numpy()

            def assisted():
                return hf_greedy(assistant_model=hf_d)

            theirs = assisted()  # warm-up
            t_hf = statistics.median(_timed(assisted) for _ in range(repeats))
            hf_greedy()  # warm-up
            t_hf_plain = statistics.median(_timed(hf_greedy) for _ in range(repeats))
            case.update({
                "reference_tokens_per_s": n_tok / t_hf, "reference_s": t_hf,
                "ratio": t_hf / t_spec,
                "reference_tokens_match": None if sampling else bool(
                    np.array_equal(theirs, ref.tokens)),
                # context: transformers' own plain greedy generate on the target
                "reference_plain_tokens_per_s": n_tok / t_hf_plain,
                "reference_speedup_over_plain": t_hf_plain / t_hf,
            })
        cases.append(case)
    b1 = [c for c in cases if "ratio" in c]
    return {
        "name": "speculative",
        "reference": f"transformers {transformers.__version__} LlamaForCausalLM.generate("
                     f"assistant_model=draft, {k} assistant tokens, schedule "
                     f"{hf_d.generation_config.num_assistant_tokens_schedule}, confidence "
                     f"threshold {draft_confidence or 0.0}) at batch 1 "
                     f"(torch {torch.__version__}, {torch.get_num_threads()} threads, eager "
                     "attention)",
        "ratio": min(c["ratio"] for c in b1) if b1 else None,
        "speedup_over_plain": b1[0]["speedup_over_plain"] if b1 else None,
        "acceptance_rate": b1[0]["acceptance_rate"] if b1 else cases[0]["acceptance_rate"],
        "tokens_match": None if sampling else all(c["tokens_match"] for c in cases),
        "draft_schedule": draft_schedule,
        "draft_confidence": draft_confidence,
        "mean_draft_tokens": b1[0]["mean_draft_tokens"] if b1 else None,
        "decoding": f"sampling (temperature {temperature}, top_k {top_k})" if sampling
        else "greedy",
        "models": models,
        "workdir": workdir,
        "cases": cases,
    }


def _train_or_reuse(wd: str, overrides: Sequence[str], steps: int) -> dict[str, Any]:
    """Train the recipe into `wd` unless a finished run is there; what was trained."""
    metrics_path = os.path.join(wd, "metrics.jsonl")
    reused = os.path.isdir(os.path.join(wd, "checkpoints")) and os.path.isfile(metrics_path)
    if not reused:
        from mmjax.train import run as train_run

        train_run(RECIPE, workdir=wd, steps=steps,
                  overrides=[f"eval_every={steps}", f"checkpoint_every={steps}", *overrides])
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    train = [r for r in rows if "train_loss" in r]
    val = [r for r in rows if "val_bpb" in r]
    return {
        "recipe": RECIPE, "overrides": list(overrides), "reused_checkpoint": reused,
        "steps": train[-1]["step"] if train else None,
        "train_s": (train[-1]["time"] - train[0]["time"]) if len(train) > 1 else None,
        "val_bpb": val[-1]["val_bpb"] if val else None,
    }


def _text_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    from mmjax.data.corpora import load_corpus

    _, val = load_corpus("pydoc")
    ids = tokenizer.encode(val)
    step = (len(ids) - length) // count
    return [[tokenizer.bos_id] + ids[i * step:i * step + length - 1] for i in range(count)]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
