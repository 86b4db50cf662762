"""The `keras-lora` command: inspect adapters, merge them, export for serving.

```
keras-lora inspect ADAPTER [--json]
keras-lora merge MODEL.keras [ADAPTER] -o MERGED.keras
keras-lora export MODEL.keras [ADAPTER] -o PATH [--format tf_saved_model]
```

`MODEL.keras` is a base model (the adapter is applied to it) or a model
saved with its adapters (`keras_lora.save_model` or `model.save`; then
ADAPTER may be left out). Errors print one
line to stderr and exit with status 1; usage errors exit with status 2.
"""

import argparse
import json
import os
import sys
import tempfile

_FAILURE = 1


def main(argv=None):
    """Runs the `keras-lora` command line.

    Args:
        argv: the arguments after the program name; `sys.argv[1:]` when
            `None`.

    Returns:
        The exit status: 0 on success, 1 on a bad file or model, 2 on a
        usage error (from argparse, which exits).

    Example:

    >>> main(["inspect", "task.safetensors"])  # doctest: +SKIP
    0
    """
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except (OSError, ValueError, TypeError, ImportError, RuntimeError) as error:
        print(f"keras-lora {args.command}: error: {error}", file=sys.stderr)
        return _FAILURE
    return 0


def _parser():
    parser = argparse.ArgumentParser(
        prog="keras-lora",
        description="Inspect, merge and export keras-lora adapters.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser(
        "inspect", help="list an adapter file's layers, ranks and sizes"
    )
    inspect.add_argument("adapter", help="an adapter .safetensors file")
    inspect.add_argument(
        "--json", action="store_true", help="print a JSON document instead"
    )
    inspect.set_defaults(run=_inspect)

    merge = commands.add_parser(
        "merge", help="fold an adapter into a model; write a plain .keras file"
    )
    merge.add_argument("model", help="a .keras model (base or LoRA)")
    merge.add_argument("adapter", nargs="?", help="an adapter file")
    merge.add_argument("-o", "--output", required=True, help="MERGED.keras")
    merge.set_defaults(run=_merge)

    export = commands.add_parser(
        "export", help="merge and export for serving (needs TensorFlow)"
    )
    export.add_argument("model", help="a .keras model (base or LoRA)")
    export.add_argument("adapter", nargs="?", help="an adapter file")
    export.add_argument("-o", "--output", required=True, help="output path")
    export.add_argument(
        "--format",
        default="tf_saved_model",
        help="tf_saved_model (default) or litert",
    )
    export.set_defaults(run=_export)
    return parser


def _inspect(args):
    from keras_lora.adapters import read_adapter

    adapter = read_adapter(args.adapter)
    file_bytes = os.path.getsize(args.adapter)
    tensor_bytes = sum(t.nbytes for t in adapter.tensors.values())
    summary = {
        "path": args.adapter,
        "file_bytes": file_bytes,
        "tensor_bytes": tensor_bytes,
        "header_bytes": file_bytes - tensor_bytes,
        "parameters": adapter.parameter_count,
        **{k: v for k, v in adapter.metadata.items() if k != "layers"},
        "layers": adapter.metadata["layers"],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    meta = adapter.metadata
    print(f"Adapter: {args.adapter}")
    print(
        f"Format: {meta['format']} v{meta['format_version']}, written by "
        f"keras-lora {meta.get('keras_lora_version')} (Keras "
        f"{meta.get('keras_version')}, {meta.get('backend')} backend)"
    )
    print(
        f"Size: {file_bytes:,} bytes ({tensor_bytes:,} adapter + "
        f"{file_bytes - tensor_bytes:,} header)"
    )
    print(
        f"Layers: {len(adapter.layers)}, LoRA parameters: "
        f"{adapter.parameter_count:,}"
    )
    rows = [("layer", "class", "rank", "alpha", "scaling", "params")]
    for record in adapter.layers.values():
        rows.append((
            record.path, record.lora_class, str(record.rank),
            f"{record.alpha:g}", f"{record.scaling:g}",
            f"{record.parameter_count:,}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


def _load_model(args):
    from keras_lora.adapters import load_adapter
    from keras_lora.adapters import read_adapter
    from keras_lora.model_io import load_model

    if args.adapter is not None:
        read_adapter(args.adapter)  # fail on a bad adapter before loading
    if not os.path.isfile(args.model):
        raise FileNotFoundError(f"Model file not found: '{args.model}'")
    try:
        # keras-lora's loader also restores adapters saved inside the file.
        model = load_model(args.model, compile=False)
    except Exception as error:  # Keras raises many types for a bad file.
        raise ValueError(
            f"cannot load model '{args.model}': {type(error).__name__}: {error}"
        ) from None
    if args.adapter is not None:
        load_adapter(model, args.adapter)
    return model


def _merge(args):
    from keras_lora.merge import merge_lora

    if not args.output.endswith(".keras"):
        raise ValueError(
            f"the merged model is a .keras file; received -o {args.output!r}"
        )
    merged = merge_lora(_load_model(args))
    target = os.path.abspath(args.output)
    parent, name = os.path.split(target)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"output directory does not exist: '{parent}'")
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{name}.", suffix=".keras", dir=parent
    )
    os.close(descriptor)
    try:
        merged.save(temporary)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    print(f"Wrote merged model to {target}")


def _export(args):
    from keras_lora import export

    export.check_format(args.format)  # before a possibly long model load
    model = _load_model(args)
    target = export.export_merged(model, args.output, format=args.format)
    print(f"Exported {args.format} to {target}")


if __name__ == "__main__":
    sys.exit(main())
