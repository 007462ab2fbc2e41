"""Linen layers whose parameters carry logical axis names."""

from mmjax.nn.attention import Attention
from mmjax.nn.cache import KVCache
from mmjax.nn.embeddings import Embed, LearnedPositions
from mmjax.nn.linear import DenseGeneral
from mmjax.nn.mlp import MLP, GatedMLP
from mmjax.nn.norms import LayerNorm, RMSNorm
from mmjax.nn.resampler import QwenVLResampler

__all__ = ["Attention", "KVCache", "Embed", "LearnedPositions", "DenseGeneral", "MLP", "GatedMLP",
           "LayerNorm", "RMSNorm", "QwenVLResampler"]
