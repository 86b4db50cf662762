"""LoRA on a keras-hub `CausalLM`: teach a small GPT-2 a new habit, generate.

1. Trains a small GPT-2 (2 layers, hidden size 64, 40-token vocabulary,
   built from a config, no download) to count: `5 6 7 8 ...`. This stands
   in for "your pretrained language model".
2. Adapts it with `keras_lora.apply_lora(lm, rank=8)`; the model is still a
   `GPT2CausalLM`, and `generate` still works. Only the adapters train, on
   a new task: count in threes, `5 8 11 14 ...` (modulo the vocabulary).
3. Greedy generation before and after, then after merging the adapters into
   the kernels (`layer.merge()`), which gives the same tokens at the base
   model's inference cost.

Runs on every Keras backend (`KERAS_BACKEND=jax|tensorflow|torch`) in about
a minute on a 2-core CPU:

    python examples/causal_lm_generate.py
"""

import sys
import time

import _common
import numpy as np

import keras
import keras_hub

import keras_lora
from keras_lora import hub

VOCABULARY = 40  # token 0 is padding; counting wraps around 1..39
LENGTH = 12
NUM = 256  # training sequences per task


def counting_sequences(step, num, seed):
    """`num` sequences `s, s+step, s+2·step, ...` over tokens 1..39."""
    starts = np.random.default_rng(seed).integers(1, VOCABULARY, size=(num, 1))
    return ((starts - 1 + step * np.arange(LENGTH)) % (VOCABULARY - 1) + 1).astype(
        "int32"
    )


def next_token_data(sequences):
    """`(x, y)` for `CausalLM.fit` without a preprocessor."""
    x = {
        "token_ids": sequences[:, :-1],
        "padding_mask": np.ones_like(sequences[:, :-1], dtype=bool),
    }
    return x, sequences[:, 1:]


def build_lm():
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCABULARY, num_layers=2, num_heads=2, hidden_dim=64,
        intermediate_dim=128, max_sequence_length=LENGTH, dropout=0.0,
    )
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)


def compile_lm(lm, learning_rate):
    lm.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        sampler="greedy",
    )
    return lm


def greedy(lm, starts, length=8):
    """Greedy continuations of one-token prompts, to `length` tokens."""
    token_ids = np.zeros((len(starts), length), "int32")
    token_ids[:, 0] = starts
    outputs = lm.generate(
        {"token_ids": token_ids, "padding_mask": token_ids != 0},
        stop_token_ids=None,  # no preprocessor, no end token
    )
    return keras.ops.convert_to_numpy(outputs["token_ids"])


def step_accuracy(tokens, step):
    """Share of generated tokens that follow the counting rule."""
    expected = (tokens[:, :-1] - 1 + step) % (VOCABULARY - 1) + 1
    return float(np.mean(tokens[:, 1:] == expected))


@_common.one_torch_thread
def main(quick=False, seed=0):
    """Runs the demo and returns its numbers (used by the tests).

    Args:
        quick: fewer training epochs (for the test suite).
        seed: seeds data and weights.

    Returns:
        A dict with the counting accuracies of greedy generations and
        whether the merged model generates the same tokens.
    """
    started = time.time()
    keras.utils.set_random_seed(seed)
    epochs = 2 if quick else 8
    starts = np.array([5, 20, 37])

    lm = compile_lm(build_lm(), 3e-3)
    lm.fit(*next_token_data(counting_sequences(1, NUM, seed)),
           batch_size=32, epochs=epochs, shuffle=False, verbose=0)
    before = greedy(lm, starts)
    print("Pretrained base, counting by one:\n", before)

    keras_lora.apply_lora(lm, rank=8)
    print(type(lm).__name__, "with LoRA:", keras_lora.trainable_parameter_report(lm))
    compile_lm(lm, 1e-2)
    lm.fit(*next_token_data(counting_sequences(3, NUM, seed + 1)),
           batch_size=32, epochs=epochs, shuffle=False, verbose=0)
    adapted = greedy(lm, starts)
    print("With the adapter, counting by three:\n", adapted)

    for layer in keras_lora.lora_layers(lm).values():
        layer.merge()
    # `merge()` changes what the layers compute; retrace `generate`.
    hub.reset_compiled_functions(lm)
    merged = greedy(lm, starts)
    same = bool(np.array_equal(merged, adapted))
    print("After merging, the same tokens:", same)
    result = {
        "base_counts_by_one": step_accuracy(before, 1),
        "lora_counts_by_three": step_accuracy(adapted, 3),
        "merged_generates_the_same": same,
        "seconds": time.time() - started,
    }
    print(
        f"Counting-by-one accuracy of the base: {result['base_counts_by_one']:.2f}; "
        f"counting-by-three with LoRA: {result['lora_counts_by_three']:.2f} "
        f"({result['seconds']:.0f} s, {keras.backend.backend()})"
    )
    return result


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
