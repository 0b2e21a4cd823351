"""Shared defaults of RL jobs (`job='rl'`): the base config plus the `rl` section.

    python -m train --config configs/rl_arith.py      # (or python -m rl --config ...)

`train.steps` counts RL steps; `optim` is the RL optimizer (its schedule runs over
steps x updates_per_batch x minibatches optimizer updates when `total_steps` is None);
`checkpoint`, `mesh`, `train.log_every` and `train.progress` work as in pretraining.
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from configs import base


def get_config() -> ConfigDict:
    c = base.get_config()
    c.job = "rl"
    c.workdir = "runs/rl"
    c.optim.lr = 1e-4
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.train.steps = 100
    c.train.log_every = 1
    c.checkpoint.every = 50
    c.rl = ConfigDict(
        dict(
            # addition | reverse | sort | countdown (fields in rl.tasks) | dataset (your JSONL
            # prompts and a verifier: configs/rl_dataset.py, its rl.dataset section)
            task="addition",
            tasks=dict(
                addition=dict(min_digits=1, max_digits=3, format_reward=0.0),
                reverse=dict(min_len=2, max_len=6, format_reward=0.0),
                sort=dict(min_len=2, max_len=6, format_reward=0.0),
                countdown=dict(n_numbers=3, max_number=10, ops="+-*", format_reward=0.0),
            ),
            loss="grpo",  # grpo | dr_grpo | dapo | gspo | gspo_token | gmpo
            n_prompts=16,
            group_size=8,  # G completions per prompt
            max_new_tokens=placeholder(int),  # None -> the task's min_new_tokens (longest answer + EOS)
            temperature=1.0,  # the policy is softmax(logits / T), see rl/step.py
            top_k=0,
            top_p=1.0,
            updates_per_batch=1,  # mu
            minibatches=1,
            eps_lo=placeholder(float),  # PPO clip range; None -> the loss's default (DAPO 0.2/0.28)
            eps_hi=placeholder(float),
            beta=0.0,  # k3 KL to the frozen initial policy (kept in the state when > 0)
            tis=False,  # truncated importance sampling vs the sampler's log-probs
            tis_cap=2.0,
            dynamic_sampling=placeholder(bool),  # None: on for dapo, else off | True | False
            # DAPO soft overlong interval; None -> max(N // 4, 1) for dapo, else 0
            overlong_cache_len=placeholder(int),
            # divide advantages by the group std; None: off for dr_grpo, else on | True | False
            adv_std=placeholder(bool),
            # dr_grpo's normaliser: False -> (rows with a token) x L_max, which moves when rows
            # are masked; True -> B x L_max, the paper's constant (rl/losses.py dr_grpo)
            dr_grpo_constant=False,
            holdout_modulus=10,  # 1/m of prompts are eval-only (0: no split)
            eval_every=25,  # greedy held-out accuracy every this many steps and at the last (0: never)
            eval_prompts=256,
            eval_seed=1234,
            init_from="",  # workdir (or checkpoint dir) of a pretraining / RL run
            warmup_steps=0,  # supervised warm-up on task demonstrations before RL
            warmup_batch_size=64,
            warmup_lr=3e-3,  # warm-up optimizer: config.optim with this LR and schedule
            warmup_schedule="warmup_cosine",  # warmup_cosine | wsd | constant
            warmup_target_accuracy=0.0,  # > 0: stop the warm-up once greedy accuracy on
            # fixed training-split prompts reaches this (checked every eval_every steps)
            # > 0: train on a fixed pool of this many distinct training-split prompts of a
            # synthetic task (dataset tasks are a pool already); 0: draw prompts afresh
            prompt_pool=0,
            # prompt curriculum (rl/curriculum.py): keep per-prompt pass-rate estimates of
            # the pool and sample, of candidates x n_prompts uniform draws, the n_prompts
            # whose estimate is closest to target (PCL); needs a pool
            curriculum=dict(enabled=False, candidates=4, target=0.5, ema=0.5,
                            prior=placeholder(float)),  # prior None: the seen prompts' mean
            # time the sampling and update phases every this many RL steps (one extra
            # rollout each time) for sampling_frac, rollout/update tokens/s; 0: never
            throughput_every=10,
        )
    )
    return c
