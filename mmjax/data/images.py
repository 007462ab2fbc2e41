"""Image preprocessing for ViT / CLIP / SigLIP, in numpy + PIL (no torch).

    pixels = clip_preprocess([img_uint8_hwc, pil_image, ...])   # [B, 224, 224, 3] float32 NHWC
    emb = model.apply({"params": p}, jnp.asarray(pixels), method=CLIP.encode_image)

`clip_preprocess` computes what transformers' `CLIPImageProcessor` computes (its PIL backend,
the one used without torchvision), step for step: convert to RGB (alpha composited onto
white), resize so the shortest side is `size` with PIL's bicubic filter (the long side is
`int(size * long / short)`), center crop (`top = (h - crop) // 2`, zero padding when the image
is smaller), rescale by 1/255 (in float64, then float32), normalise with CLIP's mean/std in
float32. The same PIL call on the same uint8 pixels gives the same bytes, so the outputs are
identical, not just close. Output layout is NHWC (mmjax), transformers' is NCHW.

`siglip_preprocess` is SigLIP's processor: resize to size x size (bicubic), no crop,
mean = std = 0.5. `resize_images` resizes float batches already on the device (jax.image), the
explicit resampling the ViT error messages point to.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from mmjax.errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)  # SigLIP
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
RESAMPLING = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def _pil():
    try:
        import PIL.Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        raise InputError("image preprocessing needs Pillow (pip install Pillow)") from None
    return PIL.Image


def _resample(name: str) -> int:
    if name not in RESAMPLING:
        from mmjax.configs import closest_name

        raise InputError(f"unknown resampling {name!r}{closest_name(name, RESAMPLING)}; "
                         f"known: {', '.join(RESAMPLING)}")
    return getattr(_pil().Resampling, name.upper())


def to_rgb_uint8(image: Any) -> np.ndarray:
    """A PIL image or a uint8 array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> uint8 [H, W, 3].

    Grayscale is repeated over the channels; alpha is composited onto white (as transformers'
    `convert_to_rgb`). Anything else is an InputError naming the problem.
    """
    Image = _pil()
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
        return np.array(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise InputError(f"images must be PIL images or numpy uint8 arrays [H, W, C], got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InputError(f"image arrays must be uint8 pixels 0..255 [H, W, C], got dtype {image.dtype} "
                         "(convert floats with (x * 255).round().astype(np.uint8))")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise InputError(f"an image must be [H, W] or [H, W, C], got shape {image.shape}")
    c = image.shape[-1]
    if c not in (1, 3, 4):
        hint = " (channels-first? pass [H, W, C])" if image.shape[0] in (1, 3, 4) else ""
        raise InputError(f"an image must have 1, 3 or 4 channels in its last axis, got shape "
                         f"{image.shape}{hint}")
    if min(image.shape[:2]) < 1:
        raise InputError(f"empty image of shape {image.shape}")
    if c == 1:
        return np.repeat(image, 3, axis=-1)
    if c == 4:
        alpha = image[..., 3:4] / 255
        return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return image


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) with the shorter side = size and the aspect ratio kept (long side
    truncated: int(size * long / short)), transformers' / torchvision's rule."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def resize(image: np.ndarray, size: tuple[int, int], resample: str = "bicubic") -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size[0], size[1], 3] with PIL (`Image.resize`)."""
    Image = _pil()
    h, w = size
    return np.array(Image.fromarray(image).resize((w, h), resample=_resample(resample)))


def resize_shortest_edge(image: np.ndarray, size: int, resample: str = "bicubic") -> np.ndarray:
    """uint8 [H, W, 3] resized so that its shorter side is `size` (aspect ratio kept)."""
    h, w = image.shape[:2]
    new = shortest_edge_size(h, w, size)
    return image if new == (h, w) else resize(image, new, resample)


def center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W, C] -> [size[0], size[1], C], centred (top = (H - h) // 2); an image smaller than
    the crop is zero-padded first (centred, the extra pixel at the bottom/right)."""
    ch, cw = size
    h, w = image.shape[:2]
    if h < ch or w < cw:
        nh, nw = max(h, ch), max(w, cw)
        top, left = -(-(nh - h) // 2), -(-(nw - w) // 2)  # ceil, as transformers
        padded = np.zeros((nh, nw) + image.shape[2:], image.dtype)
        padded[top:top + h, left:left + w] = image
        image, h, w = padded, nh, nw
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[top:top + ch, left:left + cw]


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float],
              rescale: float = 1 / 255) -> np.ndarray:
    """uint8 [..., C] -> float32 (x * rescale - mean) / std (rescale in float64, then float32)."""
    x = (image.astype(np.float64) * rescale).astype(np.float32)
    m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if m.shape != (x.shape[-1],) or s.shape != (x.shape[-1],):
        raise InputError(f"mean/std need {x.shape[-1]} values (one per channel), got {len(mean)} and {len(std)}")
    return (x - m) / s


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        if not images:
            raise InputError("no images to preprocess (empty list)")
        return list(images)
    return [images]


def _pair(x: int | Iterable[int], what: str) -> tuple[int, int]:
    pair = (int(x), int(x)) if np.isscalar(x) else tuple(int(v) for v in x)
    if len(pair) != 2 or min(pair) <= 0:
        raise InputError(f"{what} must be a positive int or (height, width), got {x!r}")
    return pair


def clip_preprocess(images: Any, size: int = 224, crop_size: int | tuple[int, int] = 224, *,
                    mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                    resample: str = "bicubic") -> np.ndarray:
    """CLIPImageProcessor: images (one, a list, or a uint8 batch [B, H, W, C]) ->
    float32 [B, crop_h, crop_w, 3] NHWC. See the module docstring for the steps."""
    if int(size) <= 0:
        raise InputError(f"size must be positive, got {size}")
    crop = _pair(crop_size, "crop_size")
    out = []
    for image in _as_list(images):
        rgb = to_rgb_uint8(image)
        rgb = resize_shortest_edge(rgb, int(size), resample)
        out.append(normalize(center_crop(rgb, crop), mean, std))
    return np.stack(out)


def siglip_preprocess(images: Any, size: int | tuple[int, int] = 224, *,
                      mean: Sequence[float] = IMAGENET_STANDARD_MEAN,
                      std: Sequence[float] = IMAGENET_STANDARD_STD, resample: str = "bicubic") -> np.ndarray:
    """SiglipImageProcessor: resize to size x size (no crop), rescale, normalise (0.5 / 0.5)
    -> float32 [B, h, w, 3] NHWC."""
    hw = _pair(size, "size")
    return np.stack([normalize(resize(to_rgb_uint8(im), hw, resample), mean, std) for im in _as_list(images)])


def resize_images(images: Any, size: tuple[int, int], method: str = "bilinear") -> Any:
    """Float images [B, H, W, C] (jax or numpy) resized to `size` = (h, w) with
    `jax.image.resize` (antialiased when shrinking): the explicit resampling for inputs whose
    resolution does not fit a ViT."""
    import jax
    import jax.numpy as jnp

    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4:
        raise InputError(f"resize_images: images must be [batch, height, width, channels], got shape {shape}")
    h, w = _pair(size, "size")
    return jax.image.resize(jnp.asarray(images), (shape[0], h, w, shape[3]), method=method)
