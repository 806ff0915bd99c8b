"""Inference and evaluation: autoregressive decoding with the KV cache."""
