"""Prompt curriculum vs uniform sampling (`python -m rl.curriculum_experiment`): GRPO on
mixed-difficulty addition (1- and 2-digit operands, "7+5=" to "47+86=") over a fixed pool of
8192 of its ~9000 training prompts, after a short supervised warm-up that leaves the easy sums mostly solved
and the hard ones mostly not: the regime where uniform sampling spends most rollouts on
groups whose rewards are all equal (no gradient).

    python -m rl.curriculum_experiment --workdir runs/rl_curriculum --publish_dir docs

The same config runs one arm on its own (`python -m rl --config configs/rl_curriculum.py`,
curriculum on; `--config.rl.curriculum.enabled=False` for the uniform arm).
"""

from configs import rl_base


def get_config():
    c = rl_base.get_config()
    c.workdir = "runs/rl_curriculum"
    c.model.update(dict(vocab_size=272, ffn_dim=384, max_seq_len=16))  # "99+99=" + 3 + EOS
    c.rl.tasks.addition.update(dict(min_digits=1, max_digits=2))
    c.rl.n_prompts = 32
    c.rl.updates_per_batch = 2
    c.rl.prompt_pool = 8192
    c.rl.curriculum.enabled = True
    c.rl.warmup_steps = 2000
    c.rl.warmup_target_accuracy = 0.25
    c.rl.warmup_schedule = "constant"
    c.rl.eval_prompts = 512
    c.rl.eval_every = 10
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 20
    c.train.steps = 400
    c.train.log_every = 5
    c.checkpoint.every = 50
    return c
