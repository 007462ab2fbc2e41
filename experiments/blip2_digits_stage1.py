"""BLIP-2 stage 1 on real handwritten digits: a Q-Former learns to read the frozen CLIP digits
image tower with ITC + ITM (hard negatives) + ITG (task "blip2").

Command (after the image tower exists):

    mmjax train experiments/clip_digits.py --workdir workdirs/clip_digits
    mmjax train experiments/blip2_digits_stage1.py --workdir workdirs/blip2_digits/stage1
    .venv/bin/python experiments/blip2_digits.py --json      # both stages, then the final JSON

Model: the CLIP digits image tower (`experiments/clip_digits.py`: ViT dim 128, 4 layers, 32 px,
8 px patches -> 17 tokens; frozen, `init_from` its workdir) -> a Q-Former of 2 post-norm layers
(dim 128, 4 heads, MLP 256, cross-attention in every layer) with 8 learned queries, ITC
projections to 64, the ITM head and the Q-Former's LM head (ITG). The Q-Former's vocabulary is
the digits' word-level caption tokenizer + [DEC].

Data: the 1,438 training digits of the CLIP split, each captioned by a template drawn per epoch
("handwritten 7", "a photo of the digit seven.", ...). Evaluation on the 359 held-out images,
one caption each: class-level image->text ITC retrieval (`retrieval_recall_at_1`), ITM accuracy,
the Q-Former's own greedy ITG caption naming the digit.

Measured: see experiments/blip2_digits.py and docs/blip2.md.
"""

import os

from mmjax.models.blip2 import Blip2Config, QFormerConfig
from mmjax.tasks.blip2 import Blip2DataConfig
from mmjax.train.experiment import ExperimentConfig, InitSource, OptimizerConfig, load_experiment
from mmjax.train.pipeline import Requires

# prerequisite runs: trained first by `mmjax train` when this config reads their workdir and it
# holds no finished run (mmjax.train.pipeline)
REQUIRES = (Requires("clip_digits.py", "workdirs/clip_digits"),)

HERE = os.path.dirname(os.path.abspath(__file__))
NO_DECAY = (r"(^|/)bias$", r"norm/scale$", r"^itc_temp$", r"(^|/)lm_bias$", r"embedding$", r"^query_tokens$")


def blip2_stage1_model() -> Blip2Config:
    vision = load_experiment(os.path.join(HERE, "clip_digits.py")).model.vision
    # vocab_size / bos / pad are set from the caption tokenizer by the task
    qformer = QFormerConfig(vocab_size=64, dim=128, num_layers=2, num_heads=4, mlp_dim=256, max_len=16,
                            cross_attention_frequency=1, encoder_width=vision.dim, text_input=True,
                            lm_head=True, bos_token_id=0)
    return Blip2Config(vision=vision, qformer=qformer, text=None, num_query_tokens=8, embed_dim=64,
                       retrieval_heads=True)


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="blip2_digits_stage1",
        task="blip2",
        model=blip2_stage1_model(),
        data=Blip2DataConfig(dataset="digits", image_size=32, batch_size=64, max_text_len=16),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=50, end_lr_ratio=0.05, weight_decay=0.05,
                                  no_decay=NO_DECAY, freeze=(r"^vision/",)),
        init_from=(InitSource("workdirs/clip_digits", "vision", "vision"),),
        steps=400,
        log_every=50,
        eval_every=0,
        checkpoint_every=400,
    )
