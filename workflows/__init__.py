"""Recipes with side effects: synthetic data, stage training (DeepSpeed on Ray Train), evaluation, promotion."""
