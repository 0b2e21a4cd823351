"""Scaling-experiment configs for `python -m train.sweep` (see README, "Scaling experiments")."""
