"""The toy model: its world of generated speech and sounds, and its training."""
