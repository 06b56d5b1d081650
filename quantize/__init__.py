"""mdl-edge quantize: quantized encoder (int8 ONNX) and decoder (GGUF k-quant) variants, with their measured cost."""
