"""RL post-training with rollouts sampled inside the same compiled program as the update.

`rl.losses` (GRPO-family objectives, group advantages, DAPO helpers), `rl.tasks` (verifiable
tasks with in-graph prompts and rewards), `rl.sampling` (jittable generation with the
model's KV / MLA latent cache), `rl.generate` (text in, text out).
"""
