"""Pallas kernels, imported as `mmjax.kernels` (docs/kernels.md).

    flash_attention      blockwise exact attention, forward + backward (Triton GPU kernels)
    flash_attention_tpu  the same kernels for TPU (Mosaic)
    ring_attention       attention with the sequence sharded over a mesh axis
"""
