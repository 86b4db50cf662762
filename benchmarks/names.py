"""The names results are keyed by, in a module that imports no backend.

`run.py` and the report only read results; keeping these strings here lets
them (and the memory processes they start) stay free of Keras imports.
"""

# Workloads and target sets.
MLP = "mlp"
TRANSFORMER = "bert"
QUERY_VALUE = "query/value"
ALL_LINEAR = "all-linear"
# Halves of all-linear, for experiments that localise a cost.
FEED_FORWARD = "feed-forward"
ATTENTION = "attention"

# Training variants.
FULL = "full"
KERAS_LORA = "keras_lora"
KERAS_ENABLE_LORA = "keras_enable_lora"
VARIANTS = (FULL, KERAS_LORA, KERAS_ENABLE_LORA)

# Inference models.
BASE = "base"
UNMERGED = "lora_unmerged"
MERGED = "merged"

# The PEFT comparison (torch backend).
PEFT_KERAS_LORA = "keras_lora"
PEFT_KERAS_FULL = "keras_full"
PEFT_LORA = "peft_lora"
TORCH_FULL = "torch_full"

# Peak-RSS variants beyond `VARIANTS` (memory.py).
KERAS_DORA = "keras_dora"

# The real-model section: all-MiniLM-L6-v2 (minilm.py).
MINILM = "minilm"
MINILM_KERAS_FULL = "keras_full"
MINILM_TORCH_FULL = "transformers_full"


def minilm_keras_lora(targets):
    """The MiniLM variant adapted by keras-lora on `targets`."""
    return f"keras_lora {targets}"


def minilm_peft(targets):
    """The MiniLM variant (transformers) adapted by PEFT on `targets`."""
    return f"peft {targets}"


def ratio_key(numerator, denominator):
    """How a ratio between two named timings is keyed in the results."""
    return f"{numerator}/{denominator}"
