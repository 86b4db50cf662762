"""Fine-tune MiniLM with keras-lora, serve the adapter with Hugging Face PEFT.

1. all-MiniLM-L6-v2 (Hugging Face `BertModel` checkpoint, offline package)
   is loaded by keras-hub as a `BertBackbone`; LoRA goes on the attention
   query/value projections and a new 2-class head sits on the pooled
   output. It trains on VADER sentiment words (see
   `minilm_text_classifier.py`) on any Keras backend.
2. `keras_lora.save_adapter(backbone, dir, format="peft")` writes a PEFT
   adapter directory (`adapter_config.json`, `adapter_model.safetensors`)
   with the checkpoint's own module names.
3. transformers' `BertModel` on the same checkpoint takes the adapter with
   `peft.PeftModel.from_pretrained`; the head's two weights are applied to
   its pooled output. Its predictions equal the Keras model's.

    python examples/minilm_to_peft.py          # ~1 minute on a 2-core CPU
"""

import os
import sys
import tempfile

import numpy as np

import keras
import keras_hub

import keras_lora
from keras_lora import hub
from minilm_text_classifier import load_vader_words
from minilm_text_classifier import split
from minilm_text_classifier import tokenize


def build_model():
    """MiniLM with LoRA on query/value and a trainable 2-class head."""
    backbone = keras_hub.models.BertBackbone.from_preset(hub.minilm_preset_dir())
    keras_lora.apply_lora(backbone, rank=4, alpha=8, targets="query_value")
    inputs = {
        name: keras.Input((None,), dtype="int32", name=name)
        for name in ("token_ids", "segment_ids", "padding_mask")
    }
    head = keras.layers.Dense(2, name="head")
    model = keras.Model(inputs, head(backbone(inputs)["pooled_output"]))
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model, backbone, head


def hf_logits(adapter_dir, head, inputs):
    """The head applied to transformers' BertModel + the PEFT adapter."""
    import peft
    import torch
    import transformers

    base = transformers.BertModel.from_pretrained(hub.minilm_preset_dir()).eval()
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        pooled = model(
            input_ids=torch.tensor(inputs["token_ids"], dtype=torch.long),
            token_type_ids=torch.tensor(inputs["segment_ids"], dtype=torch.long),
            attention_mask=torch.tensor(inputs["padding_mask"], dtype=torch.long),
        ).pooler_output.numpy()
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in head.weights)
    return pooled @ kernel + bias


def main(quick=False, output_dir=None):
    """Trains, exports, reloads in PEFT; returns the comparison figures."""
    words, labels = load_vader_words()
    train_words, train_labels, test_words, test_labels = split(words, labels)
    if quick:
        train_words, train_labels = train_words[:64], train_labels[:64]
        test_words, test_labels = test_words[:32], test_labels[:32]
    train, test = tokenize(train_words), tokenize(test_words)
    model, backbone, head = build_model()
    model.fit(train, train_labels, batch_size=32, epochs=1 if quick else 2,
              verbose=0)
    keras_logits = model.predict(test, batch_size=64, verbose=0)

    output_dir = output_dir or tempfile.mkdtemp(prefix="minilm_to_peft_")
    adapter_dir = os.path.join(output_dir, "peft_adapter")
    keras_lora.save_adapter(backbone, adapter_dir, format="peft",
                            base_model=hub.minilm_preset_dir())
    peft_logits = hf_logits(adapter_dir, head, test)

    results = {
        "keras_accuracy": float(np.mean(keras_logits.argmax(-1) == test_labels)),
        "peft_accuracy": float(np.mean(peft_logits.argmax(-1) == test_labels)),
        "same_predictions": float(np.mean(
            keras_logits.argmax(-1) == peft_logits.argmax(-1)
        )),
        "max_logit_difference": float(np.abs(keras_logits - peft_logits).max()),
        "adapter_dir": adapter_dir,
    }
    print(f"backend: {keras.backend.backend()}  test words: {len(test_words)}")
    print(f"Keras (keras-lora) accuracy:    {results['keras_accuracy']:.3f}")
    print(f"transformers + PEFT accuracy:   {results['peft_accuracy']:.3f}")
    print(f"same predictions:               {results['same_predictions']:.3f}")
    print(f"largest logit difference:       {results['max_logit_difference']:.1e}")
    print(f"PEFT adapter written to {adapter_dir}")
    return results


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
