"""The tiny dense model and the `sweep` section shared by the scaling experiments.

Sized for a CPU (each figure in minutes): 2 layers, sequences of 64 bytes, 16 sequences a
step, 200 files of the Python standard library. At scale, override the model, data and
steps on the command line or in a copy of the experiment config; the grid stays.
"""

from ml_collections import ConfigDict

from configs import base


def grid(values: dict) -> ConfigDict:
    """A `sweep.grid`: config-key paths (dotted) -> lists of values."""
    return ConfigDict(values, allow_dotted_keys=True)


def get_config(name: str) -> ConfigDict:
    c = base.get_config()
    c.workdir = f"runs/scaling/{name}"
    c.model.update(dict(vocab_size=320, d_model=128, n_layers=2, n_heads=4, ffn_dim=512,
                        max_seq_len=64, attention="mha"))
    c.data.update(dict(max_files=200, seq_len=64, batch_size=16))
    c.train.update(dict(steps=200, log_every=5, eval_every=0, eval_batches=4))
    c.optim.update(dict(lr=3e-3, warmup_steps=20))
    c.checkpoint.update(dict(every=100000, keep=1, async_save=False))
    # Mirrors train.sweep.default_sweep (configs import nothing from the project).
    c.sweep = ConfigDict(
        dict(
            name=name,
            steps=0,
            flop_budget=0.0,
            shard=0,
            num_shards=1,
            publish_dir="",
            compile_cache="auto",
            spikes=dict(window=20, loss_ratio=1.2, grad_ratio=3.0),
            plot=dict(kind="curves"),
        )
    )
    return c
