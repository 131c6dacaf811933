"""Training: the pure GAN step (step.py) and the Ray Train loop (loop.py)."""
