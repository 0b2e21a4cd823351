"""RL demo on a CPU: a tiny dense transformer learns 2-digit addition ("47+38=" -> "85").

    python -m train --config configs/rl_arith.py       # or: python -m rl --config ...

A short supervised warm-up on (prompt, answer) demonstrations leaves the model partly
right; GRPO with rollouts sampled in the same jitted step then raises the greedy accuracy
on held-out prompts (a hash split of the prompt space that training never samples).
"""

from configs import rl_base


def get_config():
    c = rl_base.get_config()  # task addition, loss grpo, groups of 8
    c.workdir = "runs/rl_arith"
    c.model.update(
        dict(
            vocab_size=272,  # bytes + EOS (256), padded
            ffn_dim=384,
            max_seq_len=16,  # prompt "99+99=" (6) + up to 3 digits + EOS
        )
    )
    c.rl.tasks.addition.update(dict(min_digits=2, max_digits=2))  # 10..99 + 10..99
    c.rl.n_prompts = 32
    c.rl.updates_per_batch = 2
    # Supervised warm-up: stopped early in its climb out of a ~10% plateau, as soon as
    # the greedy accuracy on training prompts reaches 25% (supervised training run on to
    # ~1500 steps reaches ~100%), so that RL has headroom.
    c.rl.warmup_steps = 2000
    c.rl.warmup_target_accuracy = 0.25
    c.rl.warmup_schedule = "constant"
    c.rl.eval_prompts = 512  # of the ~810 held-out problems
    # RL: a fresh Adam's first updates are ~lr * sign(g) on every weight, so keep lr low
    # and ramp it (lr=1e-3 without a ramp drops a 100%-accurate model to ~35% in one step).
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 20
    c.train.steps = 1500
    c.train.log_every = 5
    c.checkpoint.every = 100
    return c
