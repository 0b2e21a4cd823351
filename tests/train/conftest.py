"""Shared pieces of the subprocess tests that run `python -m train`."""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A tiny MLA+MoE model on 40 standard-library files: compiles and trains in seconds.
TINY_MODEL_ARGS = [
    "--config", "configs/tiny.py",
    "--config.model.d_model=48", "--config.model.n_layers=2", "--config.model.n_heads=2",
    "--config.model.q_lora_rank=0", "--config.model.kv_lora_rank=16",
    "--config.model.qk_nope_head_dim=16", "--config.model.qk_rope_head_dim=8",
    "--config.model.v_head_dim=16", "--config.model.ffn_dim=96",
    "--config.model.n_routed_experts=4", "--config.model.moe_ffn_dim=32",
    "--config.model.max_seq_len=64",
    "--config.data.max_files=40", "--config.data.seq_len=32", "--config.data.batch_size=8",
    "--config.train.progress=False",
]


def _cpu_env(devices: int) -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu")


@pytest.fixture
def tiny_args() -> list[str]:
    """`python -m train` arguments of the tiny model (add steps, mesh, workdir)."""
    return list(TINY_MODEL_ARGS)


@pytest.fixture
def cpu_env():
    """`cpu_env(n)`: the environment of a subprocess with n fake CPU devices."""
    return _cpu_env


@pytest.fixture
def root() -> str:
    return ROOT
