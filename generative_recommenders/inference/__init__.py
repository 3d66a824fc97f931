"""Inference: M-FALCON candidate scoring for generative ranking."""
