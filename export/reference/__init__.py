"""The full-precision PyTorch reference: log-mel, encoders, the whole model, parity reports."""
