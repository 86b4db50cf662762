"""The workload sizes of a full run and of the seconds-long `--quick` run."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size a benchmark run uses.

    Attributes:
        mlp_width: units of each Dense layer of the MLP.
        mlp_depth: number of Dense layers of the MLP.
        mlp_batch: MLP batch size.
        hidden_dim: transformer hidden size.
        intermediate_dim: transformer feed-forward size.
        num_heads: attention heads.
        num_layers: transformer layers of the step-time stack.
        seq_len: sequence length.
        seq_batch: transformer batch size.
        vocab: vocabulary size of the transformer's token embedding.
        rank: LoRA rank of every adapter.
        warmup: untimed steps per variant before timing.
        repeats: timed steps per variant (the median is reported).
        apply_lora_layers: transformer depths timed for `apply_lora`.
        jit_modes: the `jit_compile` values to compare.
        memory_steps: training steps of a peak-memory subprocess.
    """

    mlp_width: int
    mlp_depth: int
    mlp_batch: int
    hidden_dim: int
    intermediate_dim: int
    num_heads: int
    num_layers: int
    seq_len: int
    seq_batch: int
    vocab: int
    rank: int
    warmup: int
    repeats: int
    apply_lora_layers: tuple
    jit_modes: tuple
    memory_steps: int


# Where the full run departs from the suggested sizes, and why.
FULL_DEVIATIONS = (
    "BERT batch 4 instead of 8 (512 tokens per step): the three backends, "
    "both jit modes and every variant have to fit in about 15 minutes on "
    "2 shared cores.",
)

FULL = Sizes(
    mlp_width=1024,
    mlp_depth=4,
    mlp_batch=1024,
    hidden_dim=512,
    intermediate_dim=2048,
    num_heads=8,
    num_layers=4,
    seq_len=128,
    seq_batch=4,
    vocab=1000,
    rank=8,
    warmup=1,
    repeats=5,
    apply_lora_layers=(6, 12, 24),
    jit_modes=(True, False),
    memory_steps=5,
)

QUICK = Sizes(
    mlp_width=32,
    mlp_depth=2,
    mlp_batch=8,
    hidden_dim=16,
    intermediate_dim=32,
    num_heads=2,
    num_layers=1,
    seq_len=8,
    seq_batch=2,
    vocab=50,
    rank=2,
    warmup=1,
    repeats=2,
    apply_lora_layers=(1, 2),
    jit_modes=(False,),
    memory_steps=1,
)


def sizes_for(quick):
    """Returns `QUICK` or `FULL`."""
    return QUICK if quick else FULL


def as_dict(sizes):
    """The sizes as a JSON-ready dict."""
    return dataclasses.asdict(sizes)


def from_dict(values):
    """Inverse of `as_dict`."""
    values = dict(values)
    values["apply_lora_layers"] = tuple(values["apply_lora_layers"])
    values["jit_modes"] = tuple(values["jit_modes"])
    return Sizes(**values)
