"""Evaluation: sliding-window perplexity and bits per byte; scaling-law fits; zero-shot classification, retrieval
recall@K and linear probes for two-tower (CLIP / SigLIP) models; few-shot in-context
classification of interleaved models (`mmjax.eval.few_shot`: Flamingo; random or RICES
demonstrations, episodic nonsense-word classes)."""

from mmjax.eval.linear_probe import LinearProbe, fit_linear_probe, linear_probe_accuracy
from mmjax.eval.perplexity import bits_per_byte, perplexity, window_plan
from mmjax.eval.scaling import PowerLawFit, fit_power_law
from mmjax.eval.retrieval import retrieval_ranks, retrieval_recall
from mmjax.eval.zero_shot import build_prompts, class_embeddings, zero_shot_accuracy, zero_shot_scores

__all__ = ["bits_per_byte", "perplexity", "window_plan", "LinearProbe", "fit_linear_probe",
           "linear_probe_accuracy", "retrieval_ranks", "retrieval_recall", "build_prompts",
           "class_embeddings", "zero_shot_accuracy", "zero_shot_scores", "PowerLawFit",
           "fit_power_law"]
