"""`python -m model.hf import SRC DST` / `python -m model.hf export SRC DST`.

import: a Hugging Face checkpoint directory -> an Orbax checkpoint (`model.hf.checkpoint`)
that `python -m train --config.init_from=DST` starts from. export: the reverse, to a
directory `transformers.AutoModelForCausalLM.from_pretrained` loads, LoRA adapters merged
into the weights (`model.lora.merge_lora`). DST must be new or an empty directory: nothing
is overwritten, and a failed run leaves it as it was. A user
mistake (bad path or arguments, unsupported architecture, a malformed config.json or
safetensors file, mismatched tensors, a non-empty DST) prints one line `error: ...` naming
the file and exits with 2.
"""

from __future__ import annotations

import argparse
import sys

from model.hf.checkpoint import export_checkpoint, import_checkpoint


class _UsageError(ValueError):
    """A bad command line (argparse's complaint), shown as the one `error:` line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage and exit
        raise _UsageError(f"{self.prog}: {message} (see --help)")


def _mesh(spec: str | None):
    if not spec:
        return None
    from model.sharding import make_mesh

    sizes = {}
    for part in spec.split(","):
        name, _, size = part.partition("=")
        try:
            n = int(size)
        except ValueError:
            n = None
        if n is None or not name.strip():
            raise ValueError(f"--mesh {spec!r}: expected axis=size[,axis=size ...], e.g. fsdp=-1 "
                             "or fsdp=4,expert=2")
        sizes[name.strip()] = n
    return make_mesh(sizes)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:  # e.g. permission denied, no space left
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        text = str(e)
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m model.hf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face directory -> Orbax checkpoint")
    imp.add_argument("src")
    imp.add_argument("dst", help="a new or empty directory")
    imp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                     help="parameter dtype (default: the checkpoint's)")
    imp.add_argument("--scan-layers", action="store_true", help="store layers stacked (scan_layers=True)")
    imp.add_argument("--max-seq-len", type=int, default=None, help="override max_seq_len")
    imp.add_argument("--mesh", default=None,
                     help="load onto a device mesh, e.g. fsdp=-1 or fsdp=4,expert=2 (default: one device)")
    exp = sub.add_parser("export", help="Orbax checkpoint -> Hugging Face directory")
    exp.add_argument("src")
    exp.add_argument("dst", help="a new or empty directory")
    exp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                     help="dtype of the written weights (default: the parameters')")
    exp.add_argument("--max-shard-gb", type=float, default=5.0, help="split files above this size")
    try:
        args = parser.parse_args(argv)
        if args.command == "import":
            overrides = {"scan_layers": True} if args.scan_layers else {}
            if args.max_seq_len is not None:
                overrides["max_seq_len"] = args.max_seq_len
            cfg = import_checkpoint(args.src, args.dst, mesh=_mesh(args.mesh), dtype=args.dtype,
                                    **overrides)
        else:
            cfg = export_checkpoint(args.src, args.dst, dtype=args.dtype,
                                    max_shard_bytes=int(args.max_shard_gb * 2**30))
    except (ValueError, OSError) as e:  # user errors (model.hf raises ValueError naming the file)
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    counts = cfg.param_counts()
    print(f"{args.command}ed {args.src} -> {args.dst}: {cfg.n_layers} layers, d_model {cfg.d_model}, "
          f"{counts['total'] / 1e6:.1f}M parameters ({counts['active'] / 1e6:.1f}M active)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
