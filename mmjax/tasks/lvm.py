"""A Large Vision Model (task "lvm"): a decoder-only LLaMA trained on next-token prediction over
"visual sentences" of VQ image tokens (Bai et al. 2023, "Sequential Modeling Enables Scalable
Learning for Large Vision Models"), then prompted with images.

    ExperimentConfig(task="lvm", model=LlamaConfig(...), data=LVMDataConfig(tokenizer="workdirs/vq_digits"))

Tokenizer: a trained VQ workdir (`mmjax.tasks.vq`, family "vq"), loaded frozen. Every digit scan
of the VQ run's split (scikit-learn's digits, the same stratified 80/20 split, upsampled to the
tokenizer's size) is encoded once to its h*w codes, and so is its mirror image. The LM's
vocabulary is the codebook plus BOS and EOS (`mmjax.data.visual_sentences`); `model.vocab_size`,
`bos_token_id`, `eos_token_id` are set from it.

Training: sentences of `images_per_sentence` images from the training scans
(`visual_sentences.sentence_images`, kind "successor" or "flip"), every token after BOS a
target (the LVM paper's plain next-token loss; no loss weighting between images).

Evaluation on `eval_sentences` fixed sentences of held-out scans (never seen in training):

* `val_loss`: next-token NLL over every target; `next_image_loss`: over the last image's codes.
* Visual prompting: BOS and the first n-1 images' codes are the prompt; greedy decoding
  (`mmjax.generate`) writes h*w tokens, the last image. `next_image_token_accuracy`: the share of
  them equal to the true image's codes; `invalid_token_rate`: BOS/EOS written where a code
  belongs (decoded as code 0).
* The predicted codes decoded by the VQ decoder: `next_image_psnr` (dB, against the true image's
  pixels), beside `tokenizer_psnr` (the VQ reconstruction of the true image: the ceiling) and
  `copy_previous_psnr` (the previous image's reconstruction: what no reasoning gives).
* `next_image_digit_accuracy`: a pixel logistic-regression probe fitted on the training scans
  (`mmjax.eval.linear_probe`) names the digit of each decoded prediction, scored against the
  true last image's digit; `tokenizer_digit_accuracy` is the same probe on the true image's VQ
  reconstruction. For "successor" this is the measure that matters (any scan of the right digit
  is right); "flip" is judged by the pixels as well.
* `final`: `visual_prompts.png` in the workdir (prompt images, prediction, truth per row).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data import visual_sentences as vs
from mmjax.errors import ConfigError, InputError
from mmjax.train.task import Task


@dataclasses.dataclass(frozen=True)
class LVMDataConfig:
    tokenizer: str = "workdirs/vq_digits"  # a trained VQ workdir (task "vq")
    kind: str = "successor"  # "successor" | "flip" (mmjax.data.visual_sentences)
    images_per_sentence: int = 3
    batch_size: int = 32
    eval_sentences: int = 200
    eval_batch_size: int = 200
    picture_rows: int = 8
    seed: int = 0

    def __post_init__(self):
        vs.check_kind(self.kind, self.images_per_sentence)
        for name in ("batch_size", "eval_sentences", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")


def load_digits_split(image_size: int, test_fraction: float, seed: int):
    """(train images, train labels, test images, test labels): the VQ task's split with labels."""
    from sklearn.datasets import load_digits

    from mmjax.data.digits import stratified_split
    from mmjax.tasks.vq import load_digit_images

    train, test = load_digit_images(image_size, test_fraction, seed)
    target = load_digits().target
    train_idx, test_idx = stratified_split(target, test_fraction, seed)
    return train, target[train_idx], test, target[test_idx]


class LVMTask(Task):
    unit = "tokens"
    trains = "lm"  # any decoder-only LM family (LLaMA)
    data_config_class = LVMDataConfig

    def __init__(self, cfg: Any, workdir: str, log: Callable[[str], None] = print):
        super().__init__(cfg, workdir, log)
        from mmjax.models.vq import VQModel
        from mmjax.tasks.lm import lm_init_fn, lm_loss_fn
        from mmjax.train import load_for_inference

        d = cfg.data
        if not os.path.isdir(d.tokenizer):
            raise InputError(f"data.tokenizer={d.tokenizer!r} is not a directory: train the VQ tokenizer "
                             f"first (mmjax train experiments/vq_digits.py)")
        vq, vq_params, _ = load_for_inference(d.tokenizer)
        if not isinstance(vq, VQModel):
            raise InputError(f"data.tokenizer={d.tokenizer!r} holds a {type(vq).__name__}, not a VQ "
                             "tokenizer (family 'vq')")
        vq_cfg = load_experiment_data(d.tokenizer)
        self.vq, self.vq_params = vq, vq_params
        k = vq.config.codebook_size
        self.codebook_size = k
        self.image_tokens = int(np.prod(vq.config.grid))
        self.seq_len = d.images_per_sentence * self.image_tokens + 2
        size = vq.config.image_hw[0]
        self.train_images, self.train_labels, self.test_images, self.test_labels = load_digits_split(
            size, vq_cfg.get("test_fraction", 0.2), vq_cfg.get("seed", 0))
        encode = jax.jit(lambda x: vq.apply({"params": vq_params}, x * 2.0 - 1.0, method=VQModel.encode))
        self._decode = jax.jit(lambda ids: vq.apply({"params": vq_params}, ids, method=VQModel.decode_ids))

        def codes(images):
            return np.asarray(encode(images)).reshape(len(images), -1).astype(np.int32)

        self.train_codes, self.test_codes = codes(self.train_images), codes(self.test_images)
        vs.check_tokens(self.train_codes, k, f"the codes of data.tokenizer={d.tokenizer!r}")
        flip = d.kind == "flip"
        self.train_mirror = codes(self.train_images[:, :, ::-1]) if flip else None
        self.test_mirror = codes(self.test_images[:, :, ::-1]) if flip else None
        bos, eos = vs.special_ids(k)
        self.model_config = cfg.model.replace(vocab_size=k + 2, bos_token_id=bos, eos_token_id=eos,
                                              pad_token_id=eos)
        if self.seq_len - 1 > self.model_config.max_len:
            raise ConfigError(f"a sentence of {d.images_per_sentence} images is {self.seq_len} tokens; "
                              f"model.max_len={self.model_config.max_len} must be >= {self.seq_len - 1}")
        self.model = self.build_model(self.model_config)
        self.init_params = lm_init_fn(self.model, self.seq_len - 1)
        self.loss = lm_loss_fn(self.model)
        self.units_per_step = d.batch_size * (self.seq_len - 1)
        self._eval_loss = None
        self._probe = None  # the pixel digit classifier, fitted at the first evaluation
        self.eval_sentences = self._sentences(self.test_codes, self.test_mirror, self.test_labels,
                                              range(d.eval_sentences), d.seed + 1)

    def describe(self) -> str:
        c, d = self.model_config, self.cfg.data
        return (f"LVM: LLaMA dim={c.dim}, layers={c.num_layers}, vocab {c.vocab_size} ({self.codebook_size} codes "
                f"+ BOS/EOS); '{d.kind}' sentences of {d.images_per_sentence} images x {self.image_tokens} "
                f"tokens ({self.seq_len} with BOS/EOS) from {len(self.train_codes)} training scans; "
                f"batch {d.batch_size}")

    # --- data -------------------------------------------------------------------------------
    def _sentences(self, codes, mirror, labels, indices, seed):
        """(tokens [S, L], last image's pool index [S], last image mirrored [S], picks [S, n])."""
        d = self.cfg.data
        rows, picks_all, flags = [], [], []
        for i in indices:
            picks, mirrored = vs.sentence_images(d.kind, labels, d.images_per_sentence, seed, i)
            rows.append(vs.sentence_tokens(codes, mirror, picks, mirrored, self.codebook_size))
            picks_all.append(picks)
            flags.append(mirrored)
        return np.stack(rows), np.stack(picks_all), np.stack(flags)

    def _batch(self, tokens):
        b, length = tokens.shape
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                "positions": np.broadcast_to(np.arange(length - 1, dtype=np.int32), (b, length - 1)).copy(),
                "segment_ids": np.ones((b, length - 1), np.int32),
                "loss_mask": np.ones((b, length - 1), np.float32)}

    def train_iterator(self):
        import grain

        d = self.cfg.data
        count, index = jax.process_count(), jax.process_index()
        if d.batch_size % count:
            raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by the {count} processes")
        local = d.batch_size // count
        # sentence i of the stream is a pure function of (seed, i): exact resume, no repeats
        ds = grain.MapDataset.range(2 ** 40).map(lambda i: i * count + index).batch(local, drop_remainder=True)
        ds = ds.map(lambda ids: self._batch(self._sentences(
            self.train_codes, self.train_mirror, self.train_labels, np.asarray(ids), d.seed)[0]))
        return iter(ds.to_iter_dataset())

    # --- evaluation -------------------------------------------------------------------------
    def _losses(self, params, tokens):
        """(mean NLL over all targets, over the last image's codes) of teacher-forced sentences."""
        import optax

        if self._eval_loss is None:
            t = self.image_tokens

            def losses(p, batch):
                logits = self.model.apply({"params": p}, batch["inputs"], positions=batch["positions"],
                                          segment_ids=batch["segment_ids"])
                nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
                return jnp.mean(nll), jnp.mean(nll[:, -t - 1:-1])  # the last image's codes, not EOS

            self._eval_loss = jax.jit(losses)
        val, last = self._eval_loss(params, self._batch(tokens))
        return float(val), float(last)

    def predict_last_image(self, params, tokens):
        """Greedy codes [S, T] of the last image given BOS and the images before it."""
        from mmjax.generate import GenerationConfig, generate

        t = self.image_tokens
        prompts = tokens[:, : -t - 1]
        gen = GenerationConfig(max_new_tokens=t, temperature=0.0, eos_token_id=(),
                               pad_token_id=self.model_config.pad_token_id, prompt_bucket=8)
        out = []
        bs = self.cfg.data.eval_batch_size
        for i in range(0, len(prompts), bs):
            chunk = prompts[i:i + bs]
            res = generate(self.model, params, (jnp.asarray(chunk), jnp.ones(chunk.shape, bool)), gen)
            out.append(np.asarray(res.tokens)[:, :t])
        return np.concatenate(out)

    def decode(self, codes):
        """Images [S, H, W, 1] in [0, 1] from codes [S, T] (BOS/EOS decoded as code 0)."""
        h, w = self.vq.config.grid
        safe = np.where((codes >= 0) & (codes < self.codebook_size), codes, 0).astype(np.int32)
        x = np.asarray(self._decode(jnp.asarray(safe.reshape(len(codes), h, w))))
        return np.clip((x + 1.0) / 2.0, 0.0, 1.0)

    def evaluate(self, params, mesh, *, final: bool = False) -> dict[str, float]:
        from mmjax.eval.linear_probe import fit_linear_probe

        tokens, picks, flags = self.eval_sentences
        t = self.image_tokens
        val_loss, last_loss = self._losses(params, tokens)
        pred = self.predict_last_image(params, tokens)
        true = tokens[:, -t - 1:-1]
        last, mirrored = picks[:, -1], flags[:, -1]
        truth = np.where(mirrored[:, None, None, None], self.test_images[last][:, :, ::-1], self.test_images[last])
        predicted = self.decode(pred)
        tokenized = self.decode(true)
        previous = self.decode(tokens[:, -2 * t - 1:-t - 1])
        if self._probe is None:
            n = len(self.train_images)
            self._probe = fit_linear_probe(self.train_images.reshape(n, -1), self.train_labels, vs.NUM_CLASSES)
        labels = self.test_labels[last]
        out = {
            "val_loss": val_loss,
            "next_image_loss": last_loss,
            "next_image_token_accuracy": float(np.mean(pred == true)),
            "invalid_token_rate": float(np.mean(pred >= self.codebook_size)),
            "next_image_psnr": psnr(predicted, truth),
            "tokenizer_psnr": psnr(tokenized, truth),
            "copy_previous_psnr": psnr(previous, truth),
            "next_image_digit_accuracy": self._probe.accuracy(predicted.reshape(len(pred), -1), labels),
            "tokenizer_digit_accuracy": self._probe.accuracy(tokenized.reshape(len(pred), -1), labels),
        }
        if final and jax.process_index() == 0:
            n = min(self.cfg.data.picture_rows, len(tokens))
            prompt_imgs = [self.decode(tokens[:n, 1 + j * t: 1 + (j + 1) * t])
                           for j in range(self.cfg.data.images_per_sentence - 1)]
            save_visual_prompts(prompt_imgs, predicted[:n], truth[:n], os.path.join(self.workdir, "visual_prompts.png"),
                                f"LVM '{self.cfg.data.kind}', held-out scans\n"
                                f"digit accuracy {out['next_image_digit_accuracy']:.2f}, "
                                f"PSNR {out['next_image_psnr']:.1f} dB")
        return out


def load_experiment_data(workdir: str) -> dict[str, Any]:
    """The VQ run's data settings (split seed and test fraction) from its experiment.json."""
    import json

    path = os.path.join(workdir, "experiment.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return dict(json.load(f).get("data") or {})


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean over images of 10 log10(1 / MSE), pixels in [0, 1]."""
    mse = np.mean((images.astype(np.float64) - reference) ** 2, axis=tuple(range(1, images.ndim)))
    return float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-12))))


def save_visual_prompts(prompts: list[np.ndarray], predicted: np.ndarray, truth: np.ndarray, path: str,
                        title: str = "") -> str:
    """One row per sentence: its prompt images, the prediction, the truth (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = [*prompts, predicted, truth]
    names = [f"prompt {j + 1}" for j in range(len(prompts))] + ["predicted", "truth"]
    n, m = len(predicted), len(cols)
    fig = Figure(figsize=(1.2 * m, 1.2 * n + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    for r in range(n):
        for c in range(m):
            ax = fig.add_subplot(n, m, r * m + c + 1)
            ax.imshow(cols[c][r, ..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(names[c], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path
