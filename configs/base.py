"""Shared defaults for every run; experiment configs override only what differs.

`configs` imports nothing from the project: the model section mirrors the fields of
`model.ModelConfig` (an unknown key there is an error naming the key).
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.job = "pretrain"
    c.workdir = "runs/default"
    c.seed = 0
    # An imported checkpoint (`python -m model.hf import SRC DST`) to start from; its
    # architecture replaces config.model (but for train.loop.RUNTIME_FIELDS).
    c.init_from = ""

    # Every field of model.ModelConfig with its default (tests/train keep them in sync).
    c.model = ConfigDict(
        dict(
            vocab_size=320,
            d_model=128,
            n_layers=2,
            n_heads=4,
            max_seq_len=256,
            attention='mha',
            n_kv_heads=None,
            head_dim=None,
            attn_bias=False,
            qk_norm=False,
            q_lora_rank=0,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            rope_theta=10000.0,
            rope_scaling='none',
            rope_factor=1.0,
            rope_original_max_len=0,
            rope_beta_fast=32.0,
            rope_beta_slow=1.0,
            rope_mscale=0.0,
            rope_mscale_all_dim=0.0,
            rope_low_freq_factor=1.0,
            rope_high_freq_factor=4.0,
            attn_logit_scale='sqrt',
            attn_impl='explicit',
            ffn_dim=256,
            n_routed_experts=0,
            n_shared_experts=0,
            moe_ffn_dim=64,
            top_k=2,
            router_score='sigmoid',
            norm_topk_prob=True,
            routed_scaling_factor=1.0,
            n_group=1,
            topk_group=1,
            first_k_dense=0,
            aux_loss_alpha=0.0,
            bias_update_rate=0.001,
            capacity_factor=2.0,
            moe_dispatch='capacity',
            tie_embeddings=False,
            scale_embeddings=True,
            norm_eps=1e-06,
            init_std=0.02,
            mup_base_d_model=0,
            dtype='float32',
            param_dtype='float32',
            remat='none',
            scan_layers=False,
        )
    )

    c.data = ConfigDict(
        dict(
            source="stdlib",  # stdlib | text | bin | arrayrecord (see train/data.py)
            paths=(),  # text/bin/arrayrecord: files, directories, globs
            tokenizer="byte",  # byte | path to tokenizer.json | path to SentencePiece .model
            eos_token="",  # tokenizer file: EOS token ("" -> the tokenizer's own)
            cache_dir="",  # tokenizer file: cache the tokenized corpus here ("" -> none)
            record_format="text",  # arrayrecord records: text (UTF-8) | tokens (raw dtype)
            dtype="uint16",  # token files/records: uint16 | uint32 | int32
            vocab_size=0,  # token sources: 0 -> the tokenizer file's, else max token + 1
            eos_id=-1,  # token sources: -1 -> the tokenizer file's EOS, else none
            max_files=0,  # stdlib: 0 -> all files
            eval_permille=20,  # held-out thousandths (documents by crc32 of the name)
            seq_len=128,
            batch_size=16,
        )
    )

    c.optim = ConfigDict(
        dict(
            name="adamw",  # adamw | muon
            lr=3e-3,
            schedule="warmup_cosine",  # warmup_cosine | wsd | constant
            warmup_steps=20,
            total_steps=-1,  # -1 -> train.steps
            min_lr_frac=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            clip_norm=1.0,
            muon=dict(beta=0.95, nesterov=True, ns_steps=5, update_scale="moonlight", lr=-1.0,
                      weight_decay=-1.0),
            wsd=dict(decay_frac=0.2, decay="linear"),
            labels=(),
            # Filled in by the trainer from config.model.mup_base_d_model (muP on the model side).
            mup=dict(enabled=False, width_multiplier=1.0),
            qk_clip=dict(enabled=False, tau=100.0),
        )
    )

    c.train = ConfigDict(
        dict(
            steps=200,
            log_every=10,
            eval_every=100,
            eval_batches=4,
            progress=True,
            grad_accum=1,
            z_loss=0.0,
            max_bad_steps=10,  # abort after this many non-finite steps in a row (0: never)
            profile_steps=(),  # (start, stop): write a JAX profiler trace to workdir/profile
        )
    )

    c.checkpoint = ConfigDict(dict(every=100, keep=3, async_save=True))

    # Multi-host: every process runs the same command with its own process_id.
    c.distributed = ConfigDict(
        dict(coordinator_address="", num_processes=0, process_id=-1, auto=True)
    )

    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
    return c
