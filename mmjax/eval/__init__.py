"""Evaluation: sliding-window perplexity and bits per byte."""

from mmjax.eval.perplexity import bits_per_byte, perplexity, window_plan

__all__ = ["bits_per_byte", "perplexity", "window_plan"]
