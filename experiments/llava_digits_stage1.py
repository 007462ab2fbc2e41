"""LLaVA stage 1 on real handwritten digits: align the CLIP digits tower with the main job's LLM
by training only the projector on image captions.

Command (after the two pretrained parts exist):

    mmjax train experiments/clip_digits.py --workdir workdirs/clip_digits
    mmjax train experiments/llm_text.py --workdir workdirs/llm_text
    mmjax train experiments/llava_digits_stage1.py --workdir workdirs/llava_digits_stage1
    mmjax train experiments/llava_digits.py --workdir workdirs/llava_digits     # stage 2

Model: LLaVA = the CLIP digits image tower (`experiments/clip_digits.py`: ViT dim 128, 4 layers,
32 px, 8 px patches -> 16 patch features of layer -2, [CLS] dropped) -> a Linear-GELU-Linear
projector (128 -> 256 -> 256) -> the main job's LLaMA (`experiments/llm_text.py`: dim 256, 4
layers, its 2048-piece pydoc tokenizer, which has the `<image>` piece). Both parts start from
their trained workdirs (`init_from`, two sources) and stay frozen (`optimizer.freeze`): only the
projector's 98,816 params train.

Data: the 1,438 training digits of the CLIP split, each with a caption drawn per epoch from the
CLIP digits templates ("handwritten 7", "a photo of the digit seven.", ...), template "plain"
(`<s>` + 16 image tokens + caption + `</s>`). Evaluation: caption loss on the held-out images'
captions and the visual questions of stage 2 (which stage 1 never saw; see
`experiments/llava_digits.py`).

Measured 2026-12-01 (2-core CI machine, AVX-512 kind, ~199 GFLOP/s fp32 matmul; docs/llava.md):
300 steps in 210 s; held-out caption loss 7.77 -> 5.28 nats/token; VQA accuracy 0.000 (it has
never seen a question; stage 2 takes it to 0.955).
The connector is a choice: `--set model.connector=resampler` uses the Qwen-VL resampler instead.
"""

import os

from mmjax.models.llava import LlavaConfig
from mmjax.tasks.visual_sft import VisualSFTDataConfig
from mmjax.train.experiment import ExperimentConfig, OptimizerConfig, load_experiment
from mmjax.train.experiment import InitSource
from mmjax.train.pipeline import Requires

# prerequisite runs: trained first by `mmjax train` when this config reads their workdir and it
# holds no finished run (mmjax.train.pipeline)
REQUIRES = (Requires("clip_digits.py", "workdirs/clip_digits"), Requires("llm_text.py", "workdirs/llm_text"))

HERE = os.path.dirname(os.path.abspath(__file__))


def llava_model(connector: str = "mlp") -> LlavaConfig:
    """The CLIP digits image tower + the main job's LLM, joined by `connector`."""
    vision = load_experiment(os.path.join(HERE, "clip_digits.py")).model.vision
    text = load_experiment(os.path.join(HERE, "llm_text.py")).model
    # image_token_index and the vocabulary are set from the LLM's tokenizer by the task
    return LlavaConfig(vision=vision, text=text.replace(dropout=0.0), image_token_index=0,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       connector=connector, resampler_queries=16)


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="llava_digits_stage1",
        task="visual_sft",
        model=llava_model(),
        data=VisualSFTDataConfig(dataset="digits_captions", template="plain", image_size=32,
                                 seq_len=48, batch_size=32, eval_per_type=50,
                                 tokenizer="workdirs/llm_text"),
        optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=30, end_lr_ratio=0.1,
                                  weight_decay=0.0, freeze=(r"^vision/", r"^language_model/")),
        init_from=(InitSource("workdirs/clip_digits", "vision", "vision"),
                   InitSource("workdirs/llm_text", "", "language_model")),
        steps=300,
        log_every=20,
        eval_every=0,
        checkpoint_every=300,
        keep_best_metric="val_loss",
    )
