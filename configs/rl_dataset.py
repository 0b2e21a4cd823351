"""RL on your own prompts and verifier: `rl.task = "dataset"` (`rl/dataset.py`).

    python -m rl --config configs/rl_dataset.py --config.init_from=runs/imported \\
        --config.rl.dataset.paths=train.jsonl [--config.rl.dataset.verifier=regex \\
        --config.rl.dataset.pattern='answer is {answer}']

`rl.dataset.paths`: JSONL files of {"prompt": str, "answer": str | number} or
{"messages": [...ending with the user turn], "answer": ...} records. With `init_from` (a
`python -m model.hf import` directory) the checkpoint's architecture, `tokenizer.json` and
chat template; from scratch the tiny model below with the byte tokenizer and the built-in
ChatML template. Rewards: the verifier on each completion's text, on the host (a
`jax.pure_callback` that leaves the compiled graph, `rl/verifiers.py`).
"""

from ml_collections import ConfigDict

from configs import rl_base


def get_config():
    c = rl_base.get_config()
    c.workdir = "runs/rl_dataset"
    c.model.update(dict(d_model=64, n_layers=2, n_heads=4, ffn_dim=192, max_seq_len=256))
    c.data.tokenizer = ""  # "" -> init_from's tokenizer.json, else "byte"
    # "" -> the template beside the tokenizer, else the built-in ChatML; "builtin"; a path;
    # "raw": the prompt's text as it is, no roles (train/chat.py)
    c.data.chat_template = ""
    c.rl.task = "dataset"
    c.rl.dataset = ConfigDict(dict(
        paths=(),  # JSONL files, directories of them, globs
        eval_paths=(),  # held-out prompts; () -> a holdout_fraction of paths, by prompt hash
        holdout_fraction=0.1,  # used when eval_paths is empty
        verifier="exact_number",  # exact_number | regex | python (rl/verifiers.py)
        pattern="",  # regex: re.search'd in the completion, {answer} -> the escaped answer
        function="",  # python: "module:function", fn(prompt, completion, answer) -> float
        max_prompt_len=0,  # prompt width; 0 -> the longest prompt
        long_prompts="error",  # prompts over max_prompt_len: error | drop
        stop_tokens=(),  # extra stop tokens (each one token) besides EOS and end of turn
    ))
    # Dataset prompts have no natural completion budget: this one (prompt width + it must
    # fit in the model's max_seq_len).
    c.rl.max_new_tokens = 64
    c.rl.holdout_modulus = 0  # the dataset has its own held-out split
    c.rl.eval_prompts = 64  # at most this many held-out prompts (the first ones)
    c.rl.eval_every = 25
    return c
