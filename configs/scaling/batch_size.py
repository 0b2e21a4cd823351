"""Batch-size science: the same model trained for the same tokens at batch sizes 1..64
sequences, with Adam's beta2 fixed vs scaled to keep its half-life in tokens constant
(Marek et al. 2025: beta2' = beta2^(B'/B_ref)); the gradient noise scale B_simple
(McCandlish et al. 2018) measured on the reference batch.

    python -m train.batch_size_experiment --config configs/scaling/batch_size.py
        [--sweep.publish_dir=docs/scaling]

runs the sweep (`train.sweep.run_sweep`: finished points skipped) and then writes
`runs/scaling/batch_size/batch_size_summary.json`, `batch_size.md` and `batch_size.png`
(copied to `--publish_dir`); ~8 min on 2 CPU cores. Every point sees TOKENS tokens
(steps = TOKENS / (B x 64)); the peak LR is the same at every batch size (2e-3, not scaled
with B), the cosine schedule, the warmup and the eval cadence are fixed in tokens, and the
eval set is the same 64 held-out sequences at every batch size. The reference point (B=16,
beta2=0.95, the same in both arms) trains with `train.grad_accum=2` and logs the noise
scale's inputs every NOISE_EVERY steps (`train.noise_scale_every`); accumulation does not
change the update, so it is still the reference run.
"""

from configs.scaling import common

SEQ = 64
BATCHES = (1, 2, 4, 8, 16, 32, 64)  # sequences per step
REF_BATCH = 16
B2 = 0.95  # beta2 at REF_BATCH (and everywhere in the "fixed" arm)
TOKENS = 64 * SEQ * 60  # 245,760 tokens per point: 60 steps at B=64, 3840 at B=1
WARMUP_TOKENS = 64 * SEQ * 3  # 3 steps at B=64, 192 at B=1
EVAL_TOKENS = 64 * SEQ * 6  # 10 evaluations per run
EVAL_SEQS = 64  # the held-out set: EVAL_SEQS / B batches of B sequences
NOISE_EVERY = 2


def scaled_b2(batch: int) -> float:
    """beta2 with the same half-life in tokens as B2 at REF_BATCH: B2^(batch/REF_BATCH)."""
    return round(B2 ** (batch / REF_BATCH), 6)


KEYS = ("data.batch_size,optim.b2,sweep.steps,optim.warmup_steps,train.eval_every,"
        "train.eval_batches,train.log_every,train.grad_accum,train.noise_scale_every")


def point(batch: int, b2: float) -> tuple:
    steps = TOKENS // (batch * SEQ)
    ref = batch == REF_BATCH
    return (batch, b2, steps, max(1, WARMUP_TOKENS // (batch * SEQ)),
            EVAL_TOKENS // (batch * SEQ), max(1, EVAL_SEQS // batch),
            max(1, steps // 120), 2 if ref else 1, NOISE_EVERY if ref else 0)


def get_config():
    c = common.get_config("batch_size")
    c.sweep.name = "batch_size_sweep"  # batch_size.png is the experiment's figure
    c.optim.update(dict(lr=2e-3, schedule="warmup_cosine", min_lr_frac=0.1))
    c.data.max_files = 0  # all 1762 files: no repeats
    pts = [point(b, B2) for b in BATCHES]
    pts += [point(b, scaled_b2(b)) for b in BATCHES if b != REF_BATCH]
    c.sweep.grid = common.grid({KEYS: pts})
    # The sweep's own figure (eval loss against step, a line per point); batch_size.png
    # is the experiment's.
    c.sweep.plot = dict(
        kind="curves", series=KEYS, metrics=("eval_loss",), report=("loss", "eval_loss"),
        labels=[f"B={p[0]}, b2={p[1]:g}" for p in pts],
        title=f"Batch size 1..64 at {TOKENS} tokens: beta2 fixed vs scaled",
    )
    # Read by `python -m train.batch_size_experiment` (not by the sweep).
    c.sweep.batch_size = dict(ref_batch=REF_BATCH, b2=B2, seq_len=SEQ, noise_tail=0.5)
    return c
