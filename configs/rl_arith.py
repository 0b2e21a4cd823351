"""RL demo on a CPU: a tiny dense transformer learns 2-digit addition ("47+38=" -> "85").

    python -m train --config configs/rl_arith.py       # or: python -m rl --config ...

A short supervised warm-up on (prompt, answer) demonstrations leaves the model partly
right; GRPO with rollouts sampled in the same jitted step then raises the greedy accuracy
on held-out prompts (a hash split of the prompt space that training never samples).
"""

from configs import rl_base


def get_config():
    c = rl_base.get_config()
    c.workdir = "runs/rl_arith"
    c.model.update(
        dict(
            vocab_size=272,  # bytes + EOS (256), padded
            d_model=128,
            n_layers=2,
            n_heads=4,
            ffn_dim=384,
            max_seq_len=16,  # prompt "99+99=" (6) + up to 3 digits + EOS
            attention="mha",
        )
    )
    c.mesh.data = 1  # one CPU device
    c.rl.task = "addition"
    c.rl.tasks.addition.update(dict(min_digits=1, max_digits=2))
    c.rl.loss = "grpo"
    c.rl.n_prompts = 32
    c.rl.group_size = 8
    c.rl.temperature = 1.0
    c.rl.updates_per_batch = 2
    c.rl.warmup_steps = 150
    c.rl.warmup_batch_size = 64
    c.rl.warmup_lr = 3e-3
    c.rl.eval_every = 20
    c.rl.eval_prompts = 512
    c.optim.lr = 1e-3
    c.optim.clip_norm = 1.0
    c.train.steps = 600
    c.train.log_every = 5
    c.checkpoint.every = 50
    return c
