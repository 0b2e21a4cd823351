"""Configs of the post-training pipeline `python -m rl.pipeline` (SFT -> preference -> RL on
2-digit addition; see README, "Post-training")."""
