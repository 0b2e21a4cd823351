"""Hugging Face interop: load and save DeepSeek-V3 / Kimi-K2 / Moonlight, Qwen3-MoE, Qwen3,
Qwen2 and Llama checkpoints (safetensors) with logit parity.

    from model import hf
    cfg, variables = hf.load("path/to/hf_dir", mesh=mesh, dtype="bfloat16")
    logits, aux = Transformer(cfg, mesh=mesh).apply(variables, tokens)
    hf.save("out_dir", cfg, variables)      # transformers.AutoModelForCausalLM loads it

`load` reads tensors one at a time from memory-mapped safetensors and puts each straight
into its sharding (no host copy of the whole model); see `model.hf.convert` for the
architecture table, the tensor mapping and what the loaded config sets
(`scale_embeddings=False`, a no-drop `capacity_factor`). Unsupported architectures or
features, and missing or unexpected tensors, raise `ValueError` listing them.

Command line (see `model.hf.checkpoint` for the Orbax layout, which
`python -m train --config.init_from=DST` starts from):

    python -m model.hf import SRC_HF_DIR DST [--dtype bfloat16] [--scan-layers] [--mesh fsdp=-1]
    python -m model.hf export SRC DST_HF_DIR [--dtype bfloat16]
"""

from model.hf.checkpoint import (
    copy_tokenizer,
    export_checkpoint,
    import_checkpoint,
    read_orbax,
    write_orbax,
)
from model.hf.convert import (
    ARCHITECTURES,
    config_from_hf,
    config_to_hf,
    dequantize_fp8,
    load,
    save,
    tensor_maps,
)

__all__ = [
    "ARCHITECTURES",
    "config_from_hf",
    "config_to_hf",
    "copy_tokenizer",
    "dequantize_fp8",
    "export_checkpoint",
    "import_checkpoint",
    "load",
    "read_orbax",
    "save",
    "tensor_maps",
    "write_orbax",
]
