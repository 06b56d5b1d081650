"""Synthetic checkpoints: random weights in the official layout, a real BPE tokenizer."""
