"""Training objectives beyond next-item retrieval (loss.py): generative ranking."""
