"""The model and task shared by the pipeline's stages: a 0.22M-parameter 2-layer dense
transformer (configs/rl_arith.py's at half its width; vocab = bytes + EOS, 16 positions)
on 2-digit addition, byte tokenizer, prompts rendered raw ("47+38=" -> "85" EOS, as the RL
task samples them). Every stage states it; the later stages take it from `init_from`."""

from ml_collections import ConfigDict

MODEL = dict(vocab_size=272, d_model=64, n_layers=2, n_heads=4, ffn_dim=384, max_seq_len=16)
TASK = dict(min_digits=2, max_digits=2)  # rl.tasks.Addition: 10..99 + 10..99


def chat_data(c: ConfigDict, batch_size: int) -> None:
    """`c.data` for JSONL prompt/completion records in the RL task's raw byte layout."""
    c.data.update(dict(paths=(), tokenizer="byte", seq_len=16, batch_size=batch_size,
                       eval_permille=10))
    c.data.chat_template = "raw"  # prompt + completion + EOS, no roles (train/chat.py)
