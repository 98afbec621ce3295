"""Pretraining: the loop (trainer.py), its data iterator (data.py), metrics (metrics.py)."""
