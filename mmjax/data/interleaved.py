"""Interleaved image-text data for Flamingo: M3W-like documents and image-text pairs, mixed by
weight in a resumable grain pipeline, all from real images bundled offline.

    tok = Tokenizer.train([text], "tok.model", 512)     # has <image> and <|endofchunk|> by default
    cfg = InterleavedDataConfig(seq_len=256, max_images=5, image_size=32, batch_size=8)
    ds = make_interleaved_dataset(cfg, tok, split="train")     # grain IterDataset of batches
    it = iter(ds); batch = next(it)                     # dict of numpy arrays, see "Examples"
    state = it.get_state()                              # JSON-safe; it.set_state(state) resumes
    text, images = render_document([Chunk(img, "Output:seven"), "free text ", Chunk(img2, "a 3")])
    ex = encode_example(text, images, tok, seq_len=256, max_images=5, image_size=32)
    pool = image_pool("digits", "test", image_size=32)   # held-out images, CLIP-normalised

Document format (Flamingo / OpenFlamingo)
-----------------------------------------
A document is a list of items: a `Chunk(image, text)` (or an ``(image, text)`` tuple) or a
plain string of free text between chunks (M3W's text that does not follow an image closely).
`render_document` writes each chunk as ``<image>{text}<|endofchunk|>`` and free text verbatim,
in order, and returns that string with the chunk images in the same order. An encoded
example is ``[BOS] + encode(text) + [EOS]``. The text must be well formed, else InputError
naming the problem: one image per ``<image>`` marker (count mismatch in either direction), and
markers alternating ``<image>`` ... ``<|endofchunk|>`` ... ``<image>`` ... ``<|endofchunk|>``
(a chunk closed by ``<|endofchunk|>`` with no ``<image>``, or an ``<image>`` whose chunk is
never closed, is refused), at least one image per document. Free text may come before the
first chunk, between chunks and after the last one. Which image each token may attend to
(Flamingo: the latest preceding ``<image>``) is the model's business, computed from `tokens`.

Examples (`encode_example`; a batch stacks them with a leading batch axis)
--------------------------------------------------------------------------
* ``tokens`` int32 [seq_len]: BOS first, then the text's ids, EOS (when the whole document
  fits the window), then the tokenizer's pad id.
* ``targets`` int32 [seq_len]: ``tokens`` shifted left by one (``targets[i] = tokens[i + 1]``),
  pad at the end: the next-token labels.
* ``input_mask`` bool [seq_len]: True on real tokens (BOS ... EOS, or up to the window's cut).
* ``loss_mask`` bool [seq_len]: True at position i iff ``targets[i]`` is a real token that is
  not ``<image>``: text, ``<|endofchunk|>`` and EOS targets are trained (also text before the
  first image); predicting where an image goes, padding, and the last position (its next token
  is outside the window) never are. BOS is never a target. (OpenFlamingo also drops the loss
  on text before the first image of MMC4 documents; here that text is trained as plain LM text,
  and the generated documents have none.)
* ``images`` float32 [max_images, image_size, image_size, 3]: image k belongs to the k-th
  ``<image>`` token of ``tokens``; CLIP-normalised as the CLIP digits recipe
  (`mmjax.data.images.clip_preprocess`: bicubic resize, CLIP mean/std); zeros in unused slots.
* ``image_valid`` bool [max_images]: the first ``n`` slots, ``n`` = number of ``<image>`` ids
  in ``tokens`` (always equal).
* ``source`` int32 []: in pipeline batches only, 0 = M3W document, 1 = image-text pair.

Images given to `encode_example` must already be image_size x image_size (else InputError
pointing to `clip_preprocess`): uint8 [S, S] / [S, S, 1|3|4] pixels are CLIP-normalised here,
float arrays [S, S, 3] are taken as already CLIP-normalised (what the loaders below produce;
values beyond [-3, 3], e.g. raw 0..255 floats, are refused).

Windows and truncation: a document longer than seq_len tokens (BOS/EOS included) is cut at
seq_len; one with more than max_images images is cut just before its (max_images + 1)-th
``<image>`` token (as M3W: at most 5 images per 256-token window). An image is kept exactly
when its ``<image>`` token is inside the window, so no image ever lacks its token nor a token
its image. A document whose first ``<image>`` falls outside the window is refused (InputError).

Datasets (`make_interleaved_dataset`)
-------------------------------------
* ``m3w``: interleaved documents of 1..max_images real handwritten digits (scikit-learn's
  1,797 scans, `mmjax.data.digits`). Per document either the few-shot style
  ``<image>Output:seven<|endofchunk|>`` for every chunk, or each chunk a short sentence naming
  its digit (`M3W_SENTENCES`, the CLIP digits captions among them); after each chunk, with
  probability `filler_prob`, one or two real sentences of Python's documentation
  (``pydoc_data.topics``; train split: its first 90%, test: the last 10%) as free text.
  The first image is always the first token after BOS, so it always fits. One document per
  anchor image: anchors run through the split's digits in a seeded order, reshuffled every
  epoch; the other images and all texts are drawn by a per-example seeded generator.
* ``pairs``: one image and a caption, ``<image>{caption}<|endofchunk|>``; images from
  `pair_sources`: "digits" (captions `mmjax.data.digits.TRAIN_TEMPLATES`), "photos" (the eight
  scikit-image photo classes of `mmjax.data.photo_captions`: cat, coins, brick, grass, gravel,
  moon, printed text, coffee) and "faces" (LFW faces and LFW non-face patches from
  ``skimage.data.lfw_subset``), captions `PHOTO_TEMPLATES`. The pool of the chosen sources is
  run through in a seeded order, reshuffled every epoch; captions drawn per example.
* Held-out images: digits and photos are split stratified per class with
  `mmjax.data.digits.stratified_split(labels, test_fraction, split_seed)`, the split of
  `load_digits_captions` / `load_caption_set`, so ``split="test"`` only ever shows images no
  training example contains (M3W's extra images are drawn from the same split as its anchor).
  Digits and LFW faces are distinct images; scikit-image ships one photograph per photo class,
  so held-out photos are other random crops of the same photographs (new images, not new
  scenes).

Mixture, batches, state: the two sources are mixed with grain's ``MapDataset.mix`` at the
config's weights (default M3W 1.0, pairs 0.2); grain turns the weights into an exact
deterministic interleaving (1 : 0.2 -> 5 documents then 1 pair, repeating), so every window of
6 examples holds the proportions. A zero weight drops that source. Each process reads its own
shard of anchors (``process_index::process_count`` of every source, with its own seeds), then
examples are batched with ``batch(batch_size, drop_remainder=True)`` (batch_size per
process). Endless unless `num_epochs` is set (then it ends when a source runs out). Everything
is a pure function of (config, tokenizer, split, seed, process): the iterator's state is a
position, ``get_state()`` is a small JSON-safe dict and ``set_state`` on a fresh iterator of the
same pipeline gives exactly the same next batches, also after ``json.dumps`` / ``json.loads``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from mmjax import configs
from mmjax.errors import ConfigError, InputError

IMAGE_TOKEN = "<image>"
END_OF_CHUNK = "<|endofchunk|>"
MIXTURE = ("m3w", "pairs")  # order of InterleavedDataConfig.weights
PAIR_SOURCES = ("digits", "photos", "faces")
SPLITS = ("train", "test")
SOURCE_IDS = {"m3w": 0, "pairs": 1}  # the `source` key of batches
M3W_OUTPUT = "Output:{name}"  # OpenFlamingo's few-shot classification format
M3W_SENTENCES = (
    "a photo of the digit {name}.",
    "handwritten {digit}",
    "a handwritten {name}",
    "the number {name}",
    "This scan shows the digit {name}.",
    "Someone wrote a {name} here.",
    "The next one is a {digit}.",
    "Here the writer drew the number {name} by hand.",
)
_FACE_CLASSES = (0, 1)  # PHOTO_CLASSES rows taken from lfw_subset (faces, non-face patches)
_MIN_SEQ_LEN = 8
_FLOAT_RANGE = 3.0  # CLIP-normalised pixels lie in [-1.79, 2.15]; beyond this a float image is raw


class Chunk(NamedTuple):
    """One chunk of a document: an image and the text that follows it (rendered
    ``<image>{text}<|endofchunk|>``)."""

    image: Any
    text: str


# ----------------------------------------------------------------------------------- format


def render_document(document: Sequence[Any]) -> tuple[str, list[Any]]:
    """A document (a list of `Chunk` / ``(image, text)`` items and free-text strings) ->
    (text with ``<image>`` markers and ``<|endofchunk|>`` ends, the chunk images in order)."""
    if isinstance(document, (str, Chunk)) or not isinstance(document, Sequence):
        raise InputError("a document is a list of chunks (image, text) and free-text strings, "
                         f"got {type(document).__name__}")
    parts: list[str] = []
    images: list[Any] = []
    for i, item in enumerate(document):
        if isinstance(item, str):
            _check_no_markers(item, f"free text item {i}")
            parts.append(item)
            continue
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InputError(f"document item {i} is a {type(item).__name__}: expected a Chunk(image, "
                             "text), an (image, text) pair or a free-text string")
        image, text = item
        if image is None:
            raise InputError(f"chunk {i} ({text!r}) has no image: every chunk is "
                             f"{IMAGE_TOKEN}{{text}}{END_OF_CHUNK}; put text without an image in a "
                             "free-text string item")
        if not isinstance(text, str):
            raise InputError(f"chunk {i}: its text must be a str, got {type(text).__name__}")
        _check_no_markers(text, f"chunk {i} text")
        parts.append(f"{IMAGE_TOKEN}{text}{END_OF_CHUNK}")
        images.append(image)
    if not images:
        raise InputError("the document has no chunk with an image: an interleaved example needs "
                         "at least one image")
    return "".join(parts), images


def _check_no_markers(text: str, what: str) -> None:
    for marker in (IMAGE_TOKEN, END_OF_CHUNK):
        if marker in text:
            raise InputError(f"{what} contains {marker!r}: markers are written by render_document; "
                             "pass the image as its own chunk instead")


@dataclasses.dataclass(frozen=True)
class MarkerIds:
    """The tokenizer's ids that the interleaved format needs."""

    image: int
    end_of_chunk: int
    bos: int
    eos: int
    pad: int


def marker_ids(tokenizer: Any) -> MarkerIds:
    """Check that ``<image>`` and ``<|endofchunk|>`` each encode to exactly one id (InputError
    naming the missing symbol otherwise) and return them with BOS/EOS/pad."""
    ids = {}
    for symbol in (IMAGE_TOKEN, END_OF_CHUNK):
        encoded = list(tokenizer.encode(symbol))
        if len(encoded) != 1 or encoded[0] in (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id,
                                               getattr(tokenizer, "unk_id", None)):
            raise InputError(
                f"the tokenizer has no single token for {symbol!r} (it encodes to {len(encoded)} "
                f"ids {encoded[:8]}): interleaved data needs {IMAGE_TOKEN!r} and {END_OF_CHUNK!r} as "
                "one token each; train the tokenizer with user_defined_symbols=('<image>', "
                "'<|endofchunk|>') (mmjax.data.tokenizer.Tokenizer.train's default)")
        ids[symbol] = int(encoded[0])
    if ids[IMAGE_TOKEN] == ids[END_OF_CHUNK]:
        raise InputError(f"{IMAGE_TOKEN!r} and {END_OF_CHUNK!r} encode to the same id {ids[IMAGE_TOKEN]}")
    return MarkerIds(ids[IMAGE_TOKEN], ids[END_OF_CHUNK], int(tokenizer.bos_id),
                     int(tokenizer.eos_id), int(tokenizer.pad_id))


def check_image(image: Any, image_size: int, index: int = 0) -> np.ndarray:
    """One image -> float32 [S, S, 3] CLIP-normalised. uint8 pixels ([S, S] or [S, S, 1|3|4])
    are normalised; float [S, S, 3] is taken as already normalised; any other size, layout or
    dtype is an InputError naming image `index` and the expected size."""
    from mmjax.data.images import CLIP_MEAN, CLIP_STD, normalize, to_rgb_uint8

    fix = (f"resize it first, e.g. mmjax.data.images.clip_preprocess(image, size={image_size}, "
           f"crop_size={image_size})")
    if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating):
        if image.shape != (image_size, image_size, 3):
            raise InputError(f"image {index} has shape {image.shape}, expected ({image_size}, "
                             f"{image_size}, 3) (image_size={image_size}, RGB, channels last): {fix}")
        if not np.all(np.isfinite(image)):
            raise InputError(f"image {index} holds NaN or infinite values")
        if image.size and (image.min() < -_FLOAT_RANGE or image.max() > _FLOAT_RANGE):
            raise InputError(f"image {index} is float with values in [{image.min():.3g}, {image.max():.3g}]: "
                             "float images must be CLIP-normalised (about [-1.8, 2.2]); pass uint8 "
                             "pixels 0..255 to have them normalised here")
        return image.astype(np.float32, copy=False)
    if image is None:
        raise InputError(f"image {index} is None: every <image> marker needs an image")
    try:
        rgb = to_rgb_uint8(image)
    except InputError as e:
        raise InputError(f"image {index}: {e}") from None
    if rgb.shape[:2] != (image_size, image_size):
        raise InputError(f"image {index} is {rgb.shape[0]}x{rgb.shape[1]}, expected "
                         f"{image_size}x{image_size} (image_size): {fix}")
    return normalize(rgb, CLIP_MEAN, CLIP_STD)


def _check_structure(ids: Sequence[int], markers: MarkerIds, text: str) -> list[int]:
    """Positions (in `ids`) of the <image> tokens; InputError for a malformed marker sequence."""
    positions: list[int] = []
    open_chunk = False
    chunk = 0
    for pos, token in enumerate(ids):
        if token == markers.image:
            if open_chunk:
                raise InputError(f"<image> {len(positions)} opens a chunk before chunk {chunk} "
                                 f"(its <image> at token {positions[-1]}) is closed by {END_OF_CHUNK}: "
                                 "each image is one chunk <image>{text}<|endofchunk|>")
            positions.append(pos)
            open_chunk = True
        elif token == markers.end_of_chunk:
            if not open_chunk:
                raise InputError(f"chunk {chunk} has no image: {END_OF_CHUNK} at token {pos} closes a "
                                 "chunk that no <image> opened (text: "
                                 f"{text[:80]!r}{'...' if len(text) > 80 else ''})")
            open_chunk = False
            chunk += 1
    if open_chunk:
        raise InputError(f"the chunk of <image> {len(positions) - 1} (token {positions[-1]}) is never "
                         f"closed: end it with {END_OF_CHUNK}")
    return positions


def encode_example(text: str, images: Sequence[Any], tokenizer: Any, seq_len: int, max_images: int,
                   image_size: int) -> dict[str, np.ndarray]:
    """One example (see the module docstring: keys, masks, truncation) from rendered `text` and
    its images (one per ``<image>``, in order)."""
    return _encode(text, images, tokenizer, marker_ids(tokenizer), seq_len, max_images, image_size)


def _encode(text: str, images: Sequence[Any], tokenizer: Any, markers: MarkerIds, seq_len: int,
            max_images: int, image_size: int) -> dict[str, np.ndarray]:
    if not isinstance(text, str):
        raise InputError(f"the example text must be a str, got {type(text).__name__}")
    if seq_len < 2 or max_images < 1:
        raise InputError(f"seq_len must be >= 2 and max_images >= 1, got {seq_len}, {max_images}")
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif images is None or isinstance(images, np.ndarray) or not isinstance(images, Sequence):
        raise InputError("images must be a list of images (or an array [N, H, W, C]), one per <image>")
    ids = list(tokenizer.encode(text))
    positions = _check_structure(ids, markers, text)
    if len(positions) != len(images):
        more = ("images than <image> markers" if len(images) > len(positions)
                else "<image> markers than images")
        raise InputError(f"more {more}: the text has {len(positions)} <image> marker(s) but "
                         f"{len(images)} image(s) were given; each image needs exactly one <image>")
    if not positions:
        raise InputError("the text has no <image> marker and no image: an interleaved example needs "
                         "at least one image")
    checked = [check_image(im, image_size, k) for k, im in enumerate(images)]
    full = [markers.bos] + ids + [markers.eos]
    positions = [p + 1 for p in positions]  # BOS shifts every position by one
    if positions[0] >= seq_len:
        raise InputError(f"the first <image> is token {positions[0]} of the document, outside the "
                         f"seq_len={seq_len} window: shorten the text before it or raise seq_len")
    keep = min(len(full), seq_len)
    if len(positions) > max_images:
        keep = min(keep, positions[max_images])  # cut before the (max_images + 1)-th <image>
    n_images = sum(p < keep for p in positions)
    tokens = np.full(seq_len, markers.pad, np.int32)
    tokens[:keep] = full[:keep]
    input_mask = np.zeros(seq_len, bool)
    input_mask[:keep] = True
    targets = np.full(seq_len, markers.pad, np.int32)
    targets[:-1] = tokens[1:]
    loss_mask = input_mask.copy()
    loss_mask[:-1] &= input_mask[1:]
    loss_mask[-1] = False
    loss_mask &= targets != markers.image
    out_images = np.zeros((max_images, image_size, image_size, 3), np.float32)
    if n_images:
        out_images[:n_images] = np.stack(checked[:n_images])
    image_valid = np.zeros(max_images, bool)
    image_valid[:n_images] = True
    return {"tokens": tokens, "targets": targets, "input_mask": input_mask, "loss_mask": loss_mask,
            "images": out_images, "image_valid": image_valid}


# ----------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class InterleavedDataConfig(configs.Config):
    """Settings of the interleaved pipeline (see the module docstring).

    seq_len: tokens per example (BOS/EOS included), M3W's 256-token window.
    max_images: image slots per example (M3W: 5); documents hold 1..max_images images.
    image_size: images are image_size x image_size RGB (the vision tower's input).
    batch_size: examples per batch, per process.
    weights: mixture weights (m3w, pairs), or a mapping {"m3w": w, "pairs": w}; normalised,
      zero drops a source.
    pair_sources: image sources of the pairs: "digits", "photos", "faces".
    filler_prob: probability of free pydoc text after each chunk of an M3W document.
    test_fraction, split_seed: the stratified held-out split (`mmjax.data.digits`), independent
      of `seed` so that changing the data order never changes which images are held out.
    seed: example order, image picks and texts.
    num_epochs: passes over each source's anchor images; None = endless.
    read_threads, prefetch: grain read threads and batches prefetched.
    """

    seq_len: int = 256
    max_images: int = 5
    image_size: int = 32
    batch_size: int = 8
    weights: Any = (1.0, 0.2)
    pair_sources: tuple[str, ...] = PAIR_SOURCES
    filler_prob: float = 0.3
    test_fraction: float = 0.2
    split_seed: int = 0
    seed: int = 0
    num_epochs: int | None = None
    read_threads: int = 2
    prefetch: int = 4

    NAME = "interleaved data"

    def __post_init__(self):
        for name in ("seq_len", "max_images", "image_size", "batch_size", "read_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"InterleavedDataConfig.{name}={value!r}: must be a positive int")
        if self.seq_len < _MIN_SEQ_LEN:
            raise ConfigError(f"InterleavedDataConfig.seq_len={self.seq_len}: must be >= {_MIN_SEQ_LEN} "
                              "(BOS, <image>, caption, <|endofchunk|>; M3W uses 256)")
        if self.max_images >= self.seq_len:
            raise ConfigError(f"InterleavedDataConfig.max_images={self.max_images}: must be < seq_len="
                              f"{self.seq_len} (each image takes one <image> token; M3W: 5 per 256)")
        if self.image_size < 8:
            raise ConfigError(f"InterleavedDataConfig.image_size={self.image_size}: must be >= 8 (the "
                              "digits are 8x8 scans; the CLIP digits recipe uses 32)")
        if self.prefetch < 0:
            raise ConfigError(f"InterleavedDataConfig.prefetch={self.prefetch}: must be >= 0")
        if self.num_epochs is not None and (isinstance(self.num_epochs, bool) or not isinstance(
                self.num_epochs, (int, np.integer)) or self.num_epochs <= 0):
            raise ConfigError(f"InterleavedDataConfig.num_epochs={self.num_epochs!r}: must be a positive "
                              "int or None (endless)")
        if not 0.0 <= self.filler_prob <= 1.0:
            raise ConfigError(f"InterleavedDataConfig.filler_prob={self.filler_prob}: must be in [0, 1]")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"InterleavedDataConfig.test_fraction={self.test_fraction}: must be in (0, 1)")
        object.__setattr__(self, "weights", _weights(self.weights))
        sources = self.pair_sources
        sources = (sources,) if isinstance(sources, str) else tuple(sources)
        for s in sources:
            if s not in PAIR_SOURCES:
                raise ConfigError(f"InterleavedDataConfig.pair_sources: unknown source {s!r}"
                                  f"{configs.closest_name(s, PAIR_SOURCES)}; known: {', '.join(PAIR_SOURCES)}")
        if len(set(sources)) != len(sources):
            raise ConfigError(f"InterleavedDataConfig.pair_sources={sources}: a source is listed twice")
        if self.weights[1] > 0 and not sources:
            raise ConfigError("InterleavedDataConfig.pair_sources is empty but the pairs weight is "
                              f"{self.weights[1]}: name at least one of {', '.join(PAIR_SOURCES)} or set "
                              "weights=(1.0, 0.0)")
        object.__setattr__(self, "pair_sources", sources)

    @property
    def mixture(self) -> dict[str, float]:
        """{"m3w": w, "pairs": w}, normalised to sum 1."""
        total = sum(self.weights)
        return {name: w / total for name, w in zip(MIXTURE, self.weights)}


def _weights(weights: Any) -> tuple[float, float]:
    if isinstance(weights, Mapping):
        configs.check_keys("InterleavedDataConfig.weights", weights.keys(), MIXTURE)
        weights = tuple(weights.get(name, 0.0) for name in MIXTURE)
    try:
        values = tuple(float(w) for w in weights)
    except (TypeError, ValueError):
        raise ConfigError(f"InterleavedDataConfig.weights={weights!r}: give (m3w, pairs) weights, e.g. "
                          "(1.0, 0.2), or {'m3w': 1.0, 'pairs': 0.2}") from None
    if len(values) != len(MIXTURE):
        raise ConfigError(f"InterleavedDataConfig.weights={weights!r}: needs {len(MIXTURE)} weights "
                          f"({', '.join(MIXTURE)}), e.g. (1.0, 0.2)")
    if any(not math.isfinite(w) or w < 0 for w in values) or sum(values) <= 0:
        raise ConfigError(f"InterleavedDataConfig.weights={values}: weights must be finite, >= 0 and "
                          "not all zero (M3W 1.0, pairs 0.2 as Flamingo)")
    return values


# ---------------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class ImagePool:
    """Preprocessed images of one split and their classes (0..9 digits, 10..19 PHOTO_CLASSES)."""

    images: np.ndarray  # float32 [N, S, S, 3], CLIP-normalised
    labels: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return len(self.labels)


@functools.lru_cache(maxsize=4)
def _digits(image_size: int, test_fraction: float, split_seed: int) -> tuple[ImagePool, ImagePool]:
    from mmjax.data.digits import digit_images, stratified_split

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError("the digits need scikit-learn (pip install scikit-learn; it is in mmjax's "
                         "'test' extra)") from None
    digits = load_digits()
    labels = digits.target.astype(np.int32)
    train, test = stratified_split(labels, test_fraction, split_seed)
    images = digit_images(digits.images, image_size)
    return ImagePool(images[train], labels[train]), ImagePool(images[test], labels[test])


@functools.lru_cache(maxsize=4)
def _photos(image_size: int, test_fraction: float, split_seed: int) -> tuple[ImagePool, ImagePool]:
    from mmjax.data.digits import stratified_split
    from mmjax.data.images import clip_preprocess
    from mmjax.data.photo_captions import photo_images

    raw, labels = photo_images(seed=split_seed)
    train, test = stratified_split(labels, test_fraction, split_seed)
    images = clip_preprocess(raw, size=image_size, crop_size=image_size)
    return (ImagePool(images[train], labels[train] + 10),
            ImagePool(images[test], labels[test] + 10))


def image_pool(source: str, split: str, image_size: int, test_fraction: float = 0.2,
               split_seed: int = 0) -> ImagePool:
    """One image source ("digits", "photos", "faces") of one split, CLIP-preprocessed (cached)."""
    if split not in SPLITS:
        raise InputError(f"split {split!r}{configs.closest_name(split, SPLITS)}; known: {', '.join(SPLITS)}")
    k = SPLITS.index(split)
    if source == "digits":
        return _digits(image_size, test_fraction, split_seed)[k]
    if source not in PAIR_SOURCES:
        raise InputError(f"unknown image source {source!r}{configs.closest_name(source, PAIR_SOURCES)}; "
                         f"known: {', '.join(PAIR_SOURCES)}")
    pool = _photos(image_size, test_fraction, split_seed)[k]
    faces = np.isin(pool.labels - 10, _FACE_CLASSES)
    keep = faces if source == "faces" else ~faces
    return ImagePool(pool.images[keep], pool.labels[keep])


def class_caption(label: int, rng: np.random.Generator) -> str:
    """A caption of class `label` (digits: TRAIN_TEMPLATES, photos/faces: PHOTO_TEMPLATES)."""
    from mmjax.data.digits import TRAIN_TEMPLATES, caption
    from mmjax.data.photo_captions import PHOTO_CLASSES, PHOTO_TEMPLATES

    if label < 10:
        return caption(TRAIN_TEMPLATES[int(rng.integers(len(TRAIN_TEMPLATES)))], label)
    template = PHOTO_TEMPLATES[int(rng.integers(len(PHOTO_TEMPLATES)))]
    return template.format(name=PHOTO_CLASSES[label - 10][0])


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_NOT_PROSE = re.compile(r"[<>|*=_{}\\]|\+-|--")  # tables, markup, code, marker-like text


@functools.lru_cache(maxsize=2)
def filler_sentences(split: str) -> tuple[str, ...]:
    """Prose sentences of Python's documentation topics (train: first 90%, test: last 10%),
    30..160 printable ASCII characters, starting upper case, ending with a full stop, at least
    85% letters and spaces, and nothing table-, code- or marker-like (``< > | * = _ { } \\``)."""
    from mmjax.data.corpora import load_corpus

    text = load_corpus("pydoc")[SPLITS.index(split)]
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        if ">>>" in paragraph or paragraph.startswith((" ", "\t")):
            continue  # examples and code blocks
        for s in _SENTENCE_END.split(" ".join(paragraph.split())):
            if (30 <= len(s) <= 160 and s[0].isupper() and s.endswith(".") and s.isascii()
                    and s.isprintable() and not _NOT_PROSE.search(s)
                    and sum(ch.isalpha() or ch == " " for ch in s) >= 0.85 * len(s)):
                out.append(s)
    if not out:  # pragma: no cover - the corpus ships with CPython
        raise InputError(f"no filler sentences in the pydoc {split} text")
    return tuple(out)


def m3w_document(anchor: int, pool: ImagePool, max_images: int, filler: Sequence[str],
                 filler_prob: float, rng: np.random.Generator) -> list[Any]:
    """An M3W-like document: the anchor digit first, then up to max_images - 1 random digits
    of the pool, each a chunk; free pydoc text after a chunk with probability filler_prob."""
    from mmjax.data.digits import DIGIT_NAMES

    n = int(rng.integers(1, max_images + 1))
    rows = [int(anchor)] + [int(r) for r in rng.integers(len(pool), size=n - 1)]
    few_shot = rng.random() < 0.5
    document: list[Any] = []
    for row in rows:
        label = int(pool.labels[row])
        template = M3W_OUTPUT if few_shot else M3W_SENTENCES[int(rng.integers(len(M3W_SENTENCES)))]
        text = template.format(name=DIGIT_NAMES[label], digit=label)
        document.append(Chunk(pool.images[row], text))
        if rng.random() < filler_prob:
            k = int(rng.integers(1, 3))
            picks = rng.integers(len(filler), size=k)
            document.append(" ".join(filler[int(i)] for i in picks) + "\n")
    return document


@dataclasses.dataclass(frozen=True)
class _MakeM3W:
    pool: ImagePool
    filler: tuple[str, ...]
    tokenizer: Any
    markers: MarkerIds
    config: InterleavedDataConfig

    def __call__(self, anchor: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        c = self.config
        doc = m3w_document(anchor, self.pool, c.max_images, self.filler, c.filler_prob, rng)
        text, images = render_document(doc)
        ex = _encode(text, images, self.tokenizer, self.markers, c.seq_len, c.max_images,
                     c.image_size)
        ex["source"] = np.int32(SOURCE_IDS["m3w"])
        return ex


@dataclasses.dataclass(frozen=True)
class _MakePair:
    pool: ImagePool
    tokenizer: Any
    markers: MarkerIds
    config: InterleavedDataConfig

    def __call__(self, row: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        c = self.config
        chunk = Chunk(self.pool.images[row], class_caption(int(self.pool.labels[row]), rng))
        text, images = render_document([chunk])
        ex = _encode(text, images, self.tokenizer, self.markers, c.seq_len, c.max_images,
                     c.image_size)
        ex["source"] = np.int32(SOURCE_IDS["pairs"])
        return ex


def _seed(seed: int, *keys: str | int) -> int:
    entropy = [int(seed) % 2**32] + [
        k if isinstance(k, int) else int.from_bytes(k.encode()[:8], "little") for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def make_interleaved_dataset(config: InterleavedDataConfig, tokenizer: Any, split: str = "train",
                             seed: int | None = None, *, process_index: int | None = None,
                             process_count: int | None = None) -> Any:
    """A grain IterDataset of batches (module docstring: keys, mixture, state). `seed` overrides
    ``config.seed``; this process reads shard ``process_index::process_count`` (default: jax's)."""
    import grain

    from mmjax.data.text import JsonStateIterDataset

    if not isinstance(config, InterleavedDataConfig):
        raise ConfigError(f"make_interleaved_dataset needs an InterleavedDataConfig, got {type(config).__name__}")
    if split not in SPLITS:
        raise InputError(f"split {split!r}{configs.closest_name(split, SPLITS)}; known: {', '.join(SPLITS)}")
    markers = marker_ids(tokenizer)  # fail before loading any image
    seed = config.seed if seed is None else int(seed)
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise InputError(f"process_index={process_index} must lie in [0, process_count={process_count})")

    def anchors(n: int, name: str) -> Any:
        ds = grain.MapDataset.range(n)[process_index::process_count]
        if len(ds) == 0:
            raise InputError(f"the {name} source of split {split!r} has {n} images: none for process "
                             f"{process_index} of {process_count}")
        ds = ds.shuffle(seed=_seed(seed, name, "order", process_index)).repeat(config.num_epochs)
        return ds

    args = (config.image_size, config.test_fraction, config.split_seed)
    parts, weights = [], []
    w_m3w, w_pairs = config.weights
    if w_m3w > 0:
        pool = image_pool("digits", split, *args)
        make = _MakeM3W(pool, filler_sentences(split), tokenizer, markers, config)
        parts.append(anchors(len(pool), "m3w").random_map(
            make, seed=_seed(seed, "m3w", process_index)))
        weights.append(w_m3w)
    if w_pairs > 0:
        pools = [image_pool(s, split, *args) for s in config.pair_sources]
        pool = ImagePool(np.concatenate([p.images for p in pools]),
                         np.concatenate([p.labels for p in pools]))
        make = _MakePair(pool, tokenizer, markers, config)
        parts.append(anchors(len(pool), "pairs").random_map(
            make, seed=_seed(seed, "pairs", process_index)))
        weights.append(w_pairs)
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    ds = ds.batch(config.batch_size, drop_remainder=True)
    options = grain.ReadOptions(num_threads=config.read_threads,
                                prefetch_buffer_size=config.prefetch)
    return JsonStateIterDataset(ds.to_iter_dataset(options))
