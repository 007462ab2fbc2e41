"""LLaVA stage 2 on real handwritten digits: visual instruction tuning of the projector and the
LLM (the CLIP tower stays frozen), evaluated by answering questions about held-out images.

Command (stage 1 first, `experiments/llava_digits_stage1.py`, which needs the CLIP digits and
main-job workdirs; its docstring lists the four commands):

    mmjax train experiments/llava_digits.py --workdir workdirs/llava_digits
    mmjax train experiments/llava_digits.py --json | tail -1   # {"vqa_accuracy": ..., ...}

Data: the 1,438 training digits of the CLIP split; per image and epoch one question of each
type with a phrasing drawn from three (`mmjax.data.digits_vqa`): what digit ("7"), even or odd
("odd"), the digit plus one ("8"), and the count of digits in a 2 x 2 grid of 1-4 training
digits ("3"); template "vicuna_v1" (LLaVA's), loss on the answer and its `</s>`. The
template's default system prompt is left out (`data.system_prompt=""`): a constant 59-token prefix
that tells this task nothing and would double the longest sequence (55 -> 114 tokens).
Evaluation: 50 held-out questions per type on the 359 test images (grids of test digits),
greedy answers stopped at `</s>`, exact match: `vqa_accuracy` (mean) and
`vqa_accuracy_<type>`; `start_vqa_accuracy...` is the same evaluation of the stage-1 model this
run starts from (its step-0 evaluation), i.e. stage 1 only vs stage 2.

Model: `llava_digits_stage1.llava_model()`, initialised from the stage-1 workdir (tower, projector
and LLM); `optimizer.freeze=("^vision/",)`.

Measured 2026-12-01 (2-core CI machine, AVX-512 kind, ~199 GFLOP/s fp32 matmul; docs/llava.md):
600 steps in 321 s (~60 examples/s); held-out VQA accuracy 0.000 (stage 1 only) -> 0.865
(step 200) -> 0.955 (step 600): digit 0.92, even/odd 0.98, plus one 0.92, count 1.00; every
answer ends with `</s>`. With the Qwen-VL resampler (16 queries) in both stages: 0.895
(digit 0.90, even/odd 0.98, plus one 0.92, count 0.78), 403 s.
The Qwen-VL resampler instead of the MLP projector: run both stages with
`--set model.connector=resampler` (and separate workdirs).
"""

import importlib.util
import os

from mmjax.tasks.visual_sft import VisualSFTDataConfig
from mmjax.train.experiment import ExperimentConfig, OptimizerConfig
from mmjax.train.pipeline import Requires

# prerequisite runs: trained first by `mmjax train` when this config reads their workdir and it
# holds no finished run (mmjax.train.pipeline)
REQUIRES = (Requires("clip_digits.py", "workdirs/clip_digits"), Requires("llm_text.py", "workdirs/llm_text"),
            Requires("llava_digits_stage1.py", "workdirs/llava_digits_stage1"))


def llava_model(connector: str = "mlp"):
    """The stage-1 file's model (one definition for both stages)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llava_digits_stage1.py")
    spec = importlib.util.spec_from_file_location("llava_digits_stage1", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.llava_model(connector)


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="llava_digits",
        task="visual_sft",
        model=llava_model(),
        data=VisualSFTDataConfig(dataset="digits_vqa", template="vicuna_v1", image_size=32,
                                 system_prompt="", seq_len=64, batch_size=32, eval_per_type=50,
                                 tokenizer="workdirs/llm_text"),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=50, end_lr_ratio=0.1,
                                  weight_decay=0.0, freeze=(r"^vision/",)),
        init_from="workdirs/llava_digits_stage1",
        steps=600,
        log_every=20,
        eval_every=200,
        checkpoint_every=200,
        keep_best_metric="vqa_accuracy",
        keep_best_mode="max",
    )
