"""RL post-training with rollouts sampled inside the same compiled program as the update.

`rl.losses` (GRPO-family objectives, group advantages, DAPO helpers), `rl.tasks` (verifiable
tasks with in-graph prompts and rewards), `rl.sampling` (jittable generation with the
model's KV / MLA latent cache), `rl.step` (the jitted RL step: sample -> reward ->
advantages -> mu policy-gradient updates), `rl.loop` (`run(config)`: warm-up / init,
RL, evaluation, checkpoints; `python -m rl` or `python -m train` with `job='rl'`),
`rl.generate` (text in, text out; `python -m rl.generate`), `rl.plot` (curves).
"""
