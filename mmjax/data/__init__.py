"""Data: sentencepiece tokenizers and grain pipelines (text packing, mixtures, sharding)."""
