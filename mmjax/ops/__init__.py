"""Stateless math: attention dispatch, masks, rotary embeddings."""

from mmjax.ops.attention import attention, attention_reference

__all__ = ["attention", "attention_reference"]
