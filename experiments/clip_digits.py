"""CLIP trained from scratch on real handwritten digits, evaluated zero-shot.

Command:

    mmjax train experiments/clip_digits.py
    mmjax train experiments/clip_digits.py --json | tail -1     # {"zero_shot_accuracy": ...}

Data: scikit-learn's 1,797 real 8x8 digit scans (43 writers), upscaled to 32x32 RGB with CLIP's
preprocessing; a stratified 80/20 split (1,438 train / 359 test images). Every training image is
paired with a caption drawn per epoch from 8 templates ("a photo of the digit seven.",
"handwritten 7", "the digit 7, written by hand", ...); zero-shot classification on the test
images uses 4 differently phrased prompts per class ("a picture of the number 7", ...),
ensembled.

Model: CLIP with a ViT image tower (32x32 images, 8x8 patches -> 16 patches + [CLS], dim 128,
4 layers) and a causal text tower (dim 128, 2 layers, word-level vocabulary of the templates),
projected to 64 dims; learned temperature from 1/0.07. Symmetric contrastive loss (ITC), AdamW
(lr 2e-3, 50 warmup steps, cosine), batch 128, fp32.

Expected runtime (measured 2026-11-25 on the 2-core CI machine, quiet): 1 min 38 s in all,
~900 images/s. Expected result (same run, 359 held-out images): zero-shot accuracy 10.3% ->
96.9% (goal >= 90%), top-5 99.7%; class-level retrieval R@1 image->text 96.9%, text->image
100%; linear probe on the frozen image tower 97.2% (81.1% untrained). Details in docs/clip.md.
"""

from mmjax.models.clip import CLIP_VISION_LAYOUT, CLIPConfig, CLIPTextConfig
from mmjax.models.vit import ViTConfig
from mmjax.tasks.image_data import ImageDataConfig
from mmjax.train.experiment import ExperimentConfig, OptimizerConfig

# no weight decay on 1-D params (norms, biases), the temperature, embeddings and position tables
NO_DECAY = (r"(^|/)bias$", r"norm/scale$", r"(^|/)logit_scale$", r"(^|/)logit_bias$",
            r"(^|/)embed/", r"(^|/)cls$", r"pos_embedding/")


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="clip_digits",
        task="contrastive",
        model=CLIPConfig(
            vision=ViTConfig(**CLIP_VISION_LAYOUT, image_size=32, patch_size=8, dim=128,
                             num_layers=4, num_heads=4, mlp_dim=512),
            # vocabulary, context and special ids are filled in from the caption tokenizer
            text=CLIPTextConfig(vocab_size=1, max_len=16, dim=128, num_layers=2, num_heads=4,
                                mlp_dim=512, activation="gelu"),
            projection_dim=64,
        ),
        data=ImageDataConfig(dataset="digits", image_size=32, batch_size=128, max_text_len=16),
        optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=50, end_lr_ratio=0.05,
                                  weight_decay=0.1, no_decay=NO_DECAY),
        steps=600,
        log_every=20,
        eval_every=200,
        checkpoint_every=200,
        keep_best_metric="zero_shot_accuracy",
        keep_best_mode="max",
    )
