"""Mixture-of-Depths (`mmjax.nn.mod`) on the main job (experiments/llm_text.py): same data,
tokenizer, model and recipe, with every other block routed (layers 1 and 3 of 4) at capacity
12.5% (16 of each 128-token sequence), and as many more steps as the saved FLOPs buy.

Command (and its dense baseline at the same training FLOPs):

    mmjax train experiments/llm_text_mod.py --workdir workdirs/llm_text_mod --json
    mmjax train experiments/llm_text.py --workdir workdirs/llm_text_dense150 --steps 150 \
        --set eval_every=150 --set checkpoint_every=150 --set optimizer.warmup_steps=30 --json

FLOPs per token (training, `mmjax.nn.mod.flops_per_token`: 6 x matmul params a token passes
through incl. the tied LM head, + causal attention; a routed block counts capacity x its matmuls
and capacity^2 x its attention): dense 21.3 MFLOP, MoD 13.3 MFLOP (0.625x). 150 dense steps =
240 MoD steps of 16 x 128 tokens = 6.55 TFLOP each (both with 30 warmup steps, then cosine).

Expected runtime and result (measured 2026-12-02 on the 2-core CI machine shared with another
benchmark job; table in docs/benchmarks.md, "Mixture-of-Depths"): MoD 240 steps in 173 s
(0.72 s/step; 3 min 17 s for `mmjax train`), val_bpb 3.361 -> 2.025; the dense baseline 150
steps in 165 s (1.10 s/step), val_bpb 3.371 -> 2.325; MoD at equal steps (`--steps 150 --set
eval_every=150 --set checkpoint_every=150`, 120 s) 2.226. `python experiments/llm_text_mod.py
workdirs/llm_text_mod` (26 s): val_bpb 2.025 with top-k routing, 2.027 with the causal
predictor routing decoding uses; predictor = top-k on 94.0% (layer 1) and 96.1% (layer 3) of
validation tokens, routing 7.0% and 11.0% of them (capacity 12.5%).
Decoding (`mmjax generate`) uses the causal predictor routing (sigmoid(router logit) > 0.5).
"""

import dataclasses
import importlib.util
import os

from mmjax.train.experiment import ExperimentConfig

DENSE_STEPS = 150
MOD_STEPS = 240  # DENSE_STEPS x 21.33 / 13.34 MFLOP per token: equal training FLOPs


def dense_config() -> ExperimentConfig:
    """experiments/llm_text.py's config (one definition of the recipe)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llm_text.py")
    spec = importlib.util.spec_from_file_location("llm_text", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ExperimentConfig:
    base = dense_config()
    model = dataclasses.replace(base.model, mod_capacity=0.125, mod_every=2, mod_aux_weight=0.01)
    # short runs (the shared 2-core machine does ~1.1 s per dense step): 30 warmup steps
    optimizer = dataclasses.replace(base.optimizer, warmup_steps=30)
    return dataclasses.replace(base, name="llm_text_mod", model=model, optimizer=optimizer,
                               steps=MOD_STEPS, eval_every=MOD_STEPS, checkpoint_every=MOD_STEPS)


def routing_agreement(workdir: str, seq: int = 128) -> dict[str, float]:
    """On the validation split ([BOS] + the text, cut into rows of `seq` tokens): bits per byte
    with top-k routing (what training evaluates; not causal: a token's routing depends on later
    tokens' router logits) and with the causal predictor routing (what decoding does); per
    routed layer, the fraction of tokens whose predictor decision (sigmoid(logit) > 0.5) equals
    the top-k one, and the fraction the predictor routes.
    `python experiments/llm_text_mod.py WORKDIR` prints them as JSON."""
    import math

    import jax.numpy as jnp
    import numpy as np
    import optax

    from mmjax.checkpoint import load_workdir
    from mmjax.data.corpora import load_corpus
    from mmjax.data.tokenizer import Tokenizer

    module, config, params = load_workdir(workdir)
    tok = Tokenizer.load(os.path.join(workdir, "tokenizer.model"))
    text = load_corpus("pydoc")[1]
    ids = np.asarray([tok.bos_id] + list(tok.encode(text)), np.int32)
    rows = (len(ids) - 1) // seq
    inputs = jnp.asarray(ids[:rows * seq].reshape(rows, seq))
    targets = jnp.asarray(ids[1:rows * seq + 1].reshape(rows, seq))
    covered = rows * seq / (len(ids) - 1)  # share of the split's tokens scored
    n_bytes = len(text.encode("utf-8")) * covered
    out: dict[str, float] = {"rows": rows}
    cols = {}
    for mode in ("topk", "predictor"):
        logits, cols[mode] = module.apply({"params": params}, inputs, mutable=["intermediates"],
                                          mod_routing=mode)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        out[f"val_bpb_{mode}"] = float(jnp.sum(nll)) / math.log(2) / n_bytes
    for name, value in cols["topk"]["intermediates"].items():
        if "mod_agreement" in value:
            out[f"{name}_agreement"] = float(value["mod_agreement"][0])
            routed = cols["predictor"]["intermediates"][name]["mod_routed"][0]
            out[f"{name}_predictor_fraction"] = float(jnp.mean(routed) / seq)
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(routing_agreement(sys.argv[1])))
