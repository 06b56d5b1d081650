"""mdl-edge export: official checkpoints in, artefacts out; plus the full-precision PyTorch reference.

Needs the ``export`` extra (torch, transformers, safetensors, gguf, onnx). Modules here import
torch at module level; the runtime never imports them.
"""
