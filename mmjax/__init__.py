"""mmjax: multimodal large models in JAX/Flax, checked against their PyTorch references."""

__version__ = "0.1.0"
