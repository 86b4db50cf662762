"""The `keras-lora` command: inspect adapters, merge them, export for serving.

```
keras-lora inspect ADAPTER [--json]
keras-lora merge MODEL.keras [ADAPTER] -o MERGED.keras
keras-lora export MODEL.keras [ADAPTER] -o PATH [--format tf_saved_model]
    [--custom-module MODULE]... [--input-signature JSON] [--overwrite]
```

`MODEL.keras` is a base model (the adapter is applied to it) or a model
saved with its adapters (`keras_lora.save_model` or `model.save`; then
ADAPTER may be left out). Errors print one
line to stderr and exit with status 1; usage errors exit with status 2.

`inspect` reads only the file (no Keras, no backend is imported), and no
command prints the backends' start-up log lines: the logging environment
below is set before anything is imported, unless the user set it already.
"""

import argparse
import contextlib
import json
import math
import os
import sys

_FAILURE = 1
# Backend start-up logging (TensorFlow's oneDNN / CUDA / cpu_feature_guard
# lines, gRPC, absl), silenced unless the user chose otherwise.
QUIET_ENVIRONMENT = {
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "TF_ENABLE_ONEDNN_OPTS": "0",
    "GRPC_VERBOSITY": "ERROR",
    "GLOG_minloglevel": "3",
    "ABSL_MIN_LOG_LEVEL": "3",
}


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
    # `inspect` imports no backend; the others may (and export starts a
    # TensorFlow process): before that, quiet logging where the user chose
    # nothing, and a stderr filtered of the start-up lines that no
    # environment variable silences.
    if args.command == "inspect":
        quiet = contextlib.nullcontext()
    else:
        from keras_lora import native_logs

        for name, value in QUIET_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
        quiet = native_logs.filtered_stderr()
    try:
        with quiet:
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
    parser.add_argument(
        "--version", action="version", version=f"keras-lora {_version()}"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser(
        "inspect", help="list an adapter file's layers, ranks and sizes"
    )
    inspect.add_argument(
        "adapter", help="an adapter .safetensors file or a PEFT adapter directory"
    )
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
    export.add_argument(
        "--custom-module", action="append", dest="custom_modules",
        metavar="MODULE", default=None,
        help="module to import first, registering the model's custom "
        "classes (repeatable)",
    )
    export.add_argument(
        "--input-signature", default=None,
        help='JSON, e.g. \'[{"shape": [null, 8], "dtype": "float32"}]\'',
    )
    export.add_argument(
        "--overwrite", action="store_true",
        help="replace whatever is at -o (by default only an earlier artifact "
        "of the same format)",
    )
    export.set_defaults(run=_export)
    return parser


def _version():
    from keras_lora import __version__

    return __version__


def _inspect(args):
    # Only the file format: no Keras, no backend.
    from keras_lora.adapter_file import read_adapter
    from keras_lora.peft_interop import peft_config

    if peft_config.adapter_directory(args.adapter) is not None:
        if args.json:
            print(json.dumps(peft_config.summary(args.adapter), indent=2))
        else:
            print(peft_config.describe(args.adapter))
        return

    adapter = read_adapter(args.adapter)
    file_bytes = os.path.getsize(args.adapter)
    tensor_bytes = sum(t.nbytes for t in adapter.tensors.values())
    if args.json:
        summary = {
            "path": args.adapter,
            "file_bytes": file_bytes,
            "tensor_bytes": tensor_bytes,
            "header_bytes": file_bytes - tensor_bytes,
            "parameters": adapter.parameter_count,
            "verified": adapter.verified,
            **{k: v for k, v in adapter.metadata.items() if k != "layers"},
            "layers": adapter.metadata["layers"],
        }
        print(json.dumps(_json_safe(summary), indent=2, allow_nan=False))
        return
    meta = adapter.metadata
    print(f"Adapter: {args.adapter}")
    print(
        f"Format: {meta['format']} v{meta['format_version']}, written by "
        f"keras-lora {meta.get('keras_lora_version')} (Keras "
        f"{meta.get('keras_version')}, {meta.get('backend')} backend)"
    )
    print(
        f"Size: {file_bytes:,} bytes ({tensor_bytes:,} tensor + "
        f"{file_bytes - tensor_bytes:,} header)"
    )
    print(
        f"Layers: {len(adapter.layers)}, LoRA parameters: "
        f"{adapter.parameter_count:,}"
    )
    if adapter.verified:
        print(f"Digests: all {len(adapter.tensors)} tensors match their CRC-32")
    else:
        print(
            "Digests: none (written before format 4): tensor data not "
            "verified"
        )
    rows = [("layer", "class", "rank", "alpha", "scaling", "params")]
    for record in adapter.layers.values():
        rows.append((
            record.path, record.lora_class, str(record.rank),
            f"{record.alpha:g}", f"{record.scaling:g}",
            f"{record.parameter_count:,}",
        ))
    _print_table(rows)
    if adapter.extra_tensors:
        trainable = ", ".join(adapter.trainable_layers) or "none"
        print(
            f"Other trained weights: {len(adapter.extra_tensors)} tensors "
            f"(fully trainable layers: {trainable})"
        )
        rows = [("tensor", "shape", "params")]
        for key, shape in adapter.extra_tensors.items():
            rows.append((key, str(tuple(shape)), f"{math.prod(shape):,}"))
        _print_table(rows)


def _print_table(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


def _json_safe(value):
    """Non-finite floats as strings: `json.dumps` would write a bare `NaN`,
    which is not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


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
    from keras_lora import atomic_files
    from keras_lora.merge import merge_lora

    if not args.output.endswith(".keras"):
        raise ValueError(
            f"the merged model is a .keras file; received -o {args.output!r}"
        )
    merged = merge_lora(_load_model(args))
    target = os.path.abspath(args.output)
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"output directory does not exist: '{parent}'")
    if os.path.isdir(target):
        raise ValueError(f"-o {args.output!r} is a directory; give a file path")
    # Written beside the target and renamed over it: a crash leaves the old
    # file (and a `.<name>.*.keras` leftover the next merge removes).
    with atomic_files.temporary_beside(target, ".keras") as (_, temporary):
        merged.save(temporary)
    print(f"Wrote merged model to {target}")


def _export(args):
    from keras_lora import export

    import importlib

    from keras_lora import export_signature

    export.check_format(args.format)  # before a possibly long model load
    signature = (
        export_signature.parse(args.input_signature)
        if args.input_signature else None
    )
    for module in args.custom_modules or ():
        importlib.import_module(module)
    model = _load_model(args)
    target = export.export_merged(
        model, args.output, format=args.format,
        overwrite=True if args.overwrite else None,
        input_signature=signature, custom_modules=args.custom_modules,
    )
    print(f"Exported {args.format} to {target}")


if __name__ == "__main__":
    sys.exit(main())
