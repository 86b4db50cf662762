"""Keras's own save / load / checkpoint / quantize / preset calls on LoRA models.

With keras_lora imported, `model.save`, `keras.saving.load_model`,
`ModelCheckpoint` and `load_weights` round-trip adapted models whose LoRA
layers sit inside other layers; `quantize` and keras-hub's `save_to_preset`
refuse, changing nothing (see keras_lora/keras_hooks.py).
"""

import json
import os
import subprocess
import sys
import zipfile

import keras
import keras_hub
import numpy as np
import pytest
from keras import layers
from test_hub import gpt2_causal_lm
from test_hub import greedy_generate
from test_hub import prompt
from test_surgery import attention

import keras_lora
from keras_lora.model_io import ADAPTER_MEMBER


@keras.saving.register_keras_serializable(package="keras_lora_tests")
class Containers(keras.Model):
    """Sub-layers held in a list and a dict, an attention block among them."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stack = [layers.Dense(6, name="stack_0"),
                      layers.Dense(6, name="stack_1")]
        self.heads = {"mha": layers.MultiHeadAttention(2, 3, name="mha"),
                      "out": layers.Dense(2, name="out")}

    def call(self, x):
        for layer in self.stack:
            x = layer(x)
        return self.heads["out"](self.heads["mha"](x, x))


def containers():
    model = Containers(name="containers")
    x = np.random.rand(4, 3, 5).astype("float32")
    model(x)
    return model, x


def out(model, x):
    return keras.ops.convert_to_numpy(model(x))


def adapted(factory):
    model, x = factory()
    base = out(model, x)
    keras_lora.apply_lora(model, rank=2)
    rng = np.random.default_rng(0)
    for layer in keras_lora.lora_layers(model).values():
        layer.lora_b.assign(rng.uniform(-0.3, 0.3, layer.lora_b.shape))
    return model, x, base


def values(model):
    return [keras.ops.convert_to_numpy(v).copy() for v in model.weights]


FACTORIES = [attention, containers]
IDS = ["multi_head_attention", "list_and_dict"]


def test_import_keras_lora_installs_the_hooks_even_before_keras():
    code = (
        "import keras_lora, keras\n"
        "from keras.src.saving import saving_lib\n"
        "print(all(hasattr(f, '_keras_lora_original') for f in ("
        "saving_lib.save_model, saving_lib.load_model, "
        "saving_lib.load_weights_only, keras.Model.quantize)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True)
    assert result.stdout.strip().splitlines()[-1] == "True", result.stderr


@pytest.mark.parametrize("factory", FACTORIES, ids=IDS)
def test_model_save_then_keras_load_model_round_trips(factory, tmp_path):
    model, x, _ = adapted(factory)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert list(keras_lora.lora_layers(loaded)) == list(
        keras_lora.lora_layers(model)
    )
    np.testing.assert_array_equal(out(loaded, x), out(model, x))
    assert loaded.trainable_weights and all(
        v.path.endswith(("lora_a", "lora_b")) for v in loaded.trainable_weights
    )
    assert sorted(os.listdir(tmp_path)) == ["m.keras"]


def test_keras_hub_task_round_trips_with_the_same_greedy_tokens(tmp_path):
    lm = gpt2_causal_lm()
    keras_lora.apply_lora(lm, rank=2)
    rng = np.random.default_rng(1)
    for layer in keras_lora.lora_layers(lm).values():
        layer.lora_b.assign(rng.normal(0, 0.5, layer.lora_b.shape))
    lm.compile(sampler="greedy")
    lm.save(tmp_path / "lm.keras")
    loaded = keras.models.load_model(tmp_path / "lm.keras")
    assert type(loaded) is type(lm)
    loaded.compile(sampler="greedy")
    np.testing.assert_array_equal(greedy_generate(loaded), greedy_generate(lm))


def test_model_checkpoint_file_loads_adapted(tmp_path):
    model, x, _ = adapted(attention)
    model.compile(optimizer="adam", loss="mse")
    y = np.zeros_like(out(model, x))
    path = str(tmp_path / "ckpt.keras")
    model.fit(x, y, epochs=2, verbose=0,
              callbacks=[keras.callbacks.ModelCheckpoint(path)])
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(out(loaded, x), out(model, x), atol=1e-6)
    before = loaded.evaluate(x, y, verbose=0)
    loaded.fit(x, y, epochs=2, verbose=0)
    assert loaded.evaluate(x, y, verbose=0) < before


def test_unadapted_models_are_saved_by_keras_unchanged(tmp_path):
    model, x = attention()
    model.save(tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as handle:
        assert ADAPTER_MEMBER not in handle.namelist()
    np.testing.assert_array_equal(
        out(keras.saving.load_model(tmp_path / "m.keras"), x), out(model, x)
    )


def test_unzipped_save_of_an_adapted_model_is_refused(tmp_path):
    model, _, _ = adapted(attention)
    with pytest.raises(ValueError, match=r"local `.keras` file only.*merge_lora"):
        model.save(tmp_path / "m", zipped=False)
    assert os.listdir(tmp_path) == []


# A trained, compiled model's file in plain Keras ---------------------------

PLAIN_KERAS = """
import json, sys, warnings
import numpy as np
warnings.simplefilter("error", UserWarning)
import keras
model = keras.saving.load_model(sys.argv[1])
print(json.dumps({
    "outputs": keras.ops.convert_to_numpy(model(np.load(sys.argv[2]))).tolist(),
    "compiled": model.compiled,
    "keras_lora": any(m.startswith("keras_lora") for m in sys.modules),
}))
"""


def test_trained_compiled_model_file_loads_in_plain_keras(tmp_path):
    model, x, base = adapted(attention)
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, np.zeros_like(base), epochs=1, verbose=0)
    keras_lora.save_model(model, tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", x)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_KERAS, str(tmp_path / "m.keras"),
         str(tmp_path / "x.npy")],
        capture_output=True, text=True, env=env, cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # The base view is saved uncompiled: no optimizer state fits it.
    assert report["keras_lora"] is False and report["compiled"] is False
    np.testing.assert_allclose(report["outputs"], base, atol=1e-5)


# save_weights / load_weights ---------------------------------------------


@pytest.mark.parametrize("factory", FACTORIES, ids=IDS)
def test_weights_load_onto_an_identically_adapted_model(factory, tmp_path):
    model, x, _ = adapted(factory)
    model.save_weights(tmp_path / "m.weights.h5")
    other, _ = factory()
    keras_lora.apply_lora(other, rank=2)
    other.load_weights(tmp_path / "m.weights.h5")
    np.testing.assert_array_equal(out(other, x), out(model, x))


def test_lora_weights_onto_a_base_model_are_refused_unchanged(tmp_path):
    model, x, _ = adapted(attention)
    model.save_weights(tmp_path / "m.weights.h5")
    base, _ = attention()
    before = values(base)
    with pytest.raises(ValueError, match=r"m\.weights\.h5.*5 LoRA layers.*"
                       r"Apply the same LoRA first"):
        base.load_weights(tmp_path / "m.weights.h5")
    assert keras_lora.lora_layers(base) == {}
    for old, new in zip(before, values(base)):
        np.testing.assert_array_equal(old, new)


def test_base_weights_onto_an_adapted_model_are_refused(tmp_path):
    base, _ = attention()
    base.save_weights(tmp_path / "base.weights.h5")
    model, _, _ = adapted(attention)
    before = values(model)
    with pytest.raises(ValueError, match="without LoRA layers.*before `apply_lora`"):
        model.load_weights(tmp_path / "base.weights.h5")
    for old, new in zip(before, values(model)):
        np.testing.assert_array_equal(old, new)


def test_load_weights_of_a_keras_lora_model_file_points_to_load_model(tmp_path):
    model, _, _ = adapted(attention)
    model.save(tmp_path / "m.keras")
    other, _, _ = adapted(attention)
    with pytest.raises(ValueError, match="keras-lora model file.*load_model"):
        other.load_weights(tmp_path / "m.keras")


# quantize and save_to_preset refuse ---------------------------------------


def test_quantize_is_refused_and_the_model_is_unchanged():
    model, x, _ = adapted(attention)
    before, outputs = values(model), out(model, x)
    kinds = [type(layer) for layer in model._flatten_layers()]
    with pytest.raises(ValueError, match=r"quantize: .*LoRA layers.*merge_lora"):
        model.quantize("int8")
    assert [type(layer) for layer in model._flatten_layers()] == kinds
    assert [v.dtype for v in model.weights] == [v.dtype for v in model.weights]
    for old, new in zip(before, values(model)):
        np.testing.assert_array_equal(old, new)
    np.testing.assert_array_equal(out(model, x), outputs)


def test_quantize_of_a_plain_model_still_works():
    model, x = attention()
    model.quantize("int8")
    assert out(model, x).shape == (16, 3)


@pytest.mark.parametrize("part", ["task", "backbone"])
def test_save_to_preset_is_refused_before_writing(part, tmp_path):
    lm = gpt2_causal_lm()
    keras_lora.apply_lora(lm, rank=2)
    target = lm if part == "task" else lm.backbone
    with pytest.raises(ValueError, match=r"save_to_preset: .*LoRA layers.*"
                       r"merge_lora\(model\)\.save_to_preset.*save_adapter"):
        target.save_to_preset(str(tmp_path / "preset"))
    assert os.listdir(tmp_path) == []


def test_save_to_preset_of_a_plain_task_still_works(tmp_path):
    lm = gpt2_causal_lm()
    lm.save_to_preset(str(tmp_path / "preset"))
    loaded = keras_hub.models.GPT2CausalLM.from_preset(str(tmp_path / "preset"))
    loaded.compile(sampler="greedy")
    lm.compile(sampler="greedy")
    np.testing.assert_array_equal(
        loaded.generate(prompt(), stop_token_ids=None)["token_ids"],
        greedy_generate(lm),
    )


def test_lora_layers_that_are_graph_nodes_are_serialized_by_keras_itself(
    tmp_path,
):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, layers.Dense(3, name="out")(inputs))
    keras_lora.apply_lora(model, rank=2)
    model.save(tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as handle:
        assert ADAPTER_MEMBER not in handle.namelist()
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded.get_layer("out")).__name__ == "LoRADense"


def test_a_legacy_h5_save_of_nested_lora_layers_is_refused(tmp_path):
    model, _, _ = adapted(attention)
    with pytest.raises(ValueError, match=r"legacy `.h5` file would lose them"):
        model.save(tmp_path / "m.h5")
    assert os.listdir(tmp_path) == []
