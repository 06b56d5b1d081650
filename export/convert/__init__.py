"""Conversion: an official checkpoint (safetensors or the GGUF pair) into a bundle."""
