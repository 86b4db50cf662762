"""Hugging Face PEFT adapters in and out of keras-hub models.

Tiny random Llama, Gemma, Mistral, Qwen2 and GPT-2 checkpoints are written
with transformers' `save_pretrained` once per module and loaded into
keras-hub with `from_preset`; PEFT adapters are made with `get_peft_model`
(non-zero `lora_B`). Each test compares the change an adapter makes to the
logits (adapted − base) in Keras and in transformers, after checking the
bases agree. torch and transformers run on CPU beside any Keras backend.
"""

import json
import os
import shutil

import keras
import numpy as np
import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
keras_hub = pytest.importorskip("keras_hub")

import keras_lora  # noqa: E402
from keras_lora import cli  # noqa: E402

TOKENS = np.array([[1, 5, 9, 3, 7, 2]])
_SIZES = dict(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)
# {architecture: (config, causal LM class, PEFT targets, rank_pattern)}
ARCHITECTURES = {
    "llama": (lambda: transformers.LlamaConfig(**_SIZES, tie_word_embeddings=False),
              "LlamaForCausalLM", "all-linear", {"v_proj": 2}),
    "gemma": (lambda: transformers.GemmaConfig(**_SIZES, head_dim=4),
              "GemmaForCausalLM", ["q_proj", "o_proj", "down_proj"], {"o_proj": 2}),
    "mistral": (lambda: transformers.MistralConfig(**_SIZES, head_dim=4),
                "MistralForCausalLM", ["k_proj", "up_proj"], {}),
    "qwen2": (lambda: transformers.Qwen2Config(**_SIZES),
              "Qwen2ForCausalLM", "all-linear", {"gate_proj": 3}),
    "gpt2": (lambda: transformers.GPT2Config(
                 vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=64),
             "GPT2LMHeadModel", ["c_attn", "c_proj", "c_fc"], {"c_fc": 2}),
}


def _randomize(model):
    # transformers' default init (std 0.02) leaves tiny models nearly
    # linear; larger weights make the comparisons meaningful.
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.2)
            else:
                parameter.uniform_(0.5, 1.5)
    return model.eval()  # a model built from a config is in train mode


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """`{architecture: checkpoint dir}`, written once."""
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for name, (config, cls, _, _) in ARCHITECTURES.items():
        dirs[name] = str(root / name)
        _randomize(getattr(transformers, cls)(config())).save_pretrained(dirs[name])
    return dirs


def _hf_model(checkpoints, name):
    cls = getattr(transformers, ARCHITECTURES[name][1])
    return cls.from_pretrained(checkpoints[name]).eval()


def _hf_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def _keras_logits(backbone):
    hidden = keras.ops.convert_to_numpy(backbone(
        {"token_ids": TOKENS, "padding_mask": np.ones_like(TOKENS)}
    ))
    embedding = backbone.token_embedding
    kernel = (embedding.embeddings if embedding.tie_weights
              else keras.ops.transpose(embedding.reverse_embeddings))
    return hidden @ keras.ops.convert_to_numpy(kernel).T


def _peft_adapter(hf_model, directory, targets, rank_pattern, **options):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, rank_pattern=rank_pattern,
        alpha_pattern={next(iter(rank_pattern), "x"): 5.0},
        init_lora_weights=False, **options,
    )
    adapted = peft.get_peft_model(hf_model, config)
    adapted.save_pretrained(directory)
    return adapted


def _load_checked(hf_model, directory):
    """`PeftModel.from_pretrained`, failing on missing or unexpected keys
    (PEFT only warns)."""
    adapted = peft.PeftModel.from_pretrained(hf_model, directory)
    from safetensors.numpy import load_file

    in_file = set(load_file(os.path.join(directory, "adapter_model.safetensors")))
    in_model = set(peft.get_peft_model_state_dict(adapted))
    assert in_file == in_model, (in_file ^ in_model)
    return adapted


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_peft_adapter_changes_keras_hub_model_as_peft_changes_transformers(
    checkpoints, tmp_path, name
):
    _, _, targets, rank_pattern = ARCHITECTURES[name]
    hf_model = _hf_model(checkpoints, name)
    hf_base = _hf_logits(hf_model)
    hf_adapted = _hf_logits(_peft_adapter(hf_model, tmp_path, targets, rank_pattern))
    backbone = keras_hub.models.Backbone.from_preset(checkpoints[name])
    keras_base = _keras_logits(backbone)
    # keras-hub's Mistral differs from transformers' by ~1e-3 (its numerics).
    tolerance = 5e-3 if name == "mistral" else 1e-4
    np.testing.assert_allclose(keras_base, hf_base, atol=tolerance)

    keras_lora.load_adapter(backbone, str(tmp_path))

    effect = _keras_logits(backbone) - keras_base
    assert np.abs(hf_adapted - hf_base).max() > 0.1
    np.testing.assert_allclose(effect, hf_adapted - hf_base, atol=tolerance)
    # Back out to PEFT: the same adapter, loading with every key matched.
    out = str(tmp_path / "exported")
    keras_lora.save_adapter(backbone, out, format="peft",
                            base_model=checkpoints[name])
    reloaded = _load_checked(_hf_model(checkpoints, name), out)
    np.testing.assert_allclose(_hf_logits(reloaded), hf_adapted, atol=1e-5)
    if name == "gpt2":
        _check_trained_gpt2_export(backbone, keras_base, hf_base, checkpoints, tmp_path)


def _check_trained_gpt2_export(backbone, keras_base, hf_base, checkpoints, tmp_path):
    """q, k, v trained apart (own lora_a) export as one c_attn of rank 3r:
    lora_A stacked, lora_B block-diagonal."""
    rng = np.random.default_rng(0)
    for layer in keras_lora.lora_layers(backbone).values():
        layer.lora_a.assign(rng.normal(0, 0.5, layer.lora_a.shape))
    effect = _keras_logits(backbone) - keras_base
    out = tmp_path / "trained"
    keras_lora.save_adapter(backbone, str(out), format="peft",
                            base_model=checkpoints["gpt2"])
    adapted = _load_checked(_hf_model(checkpoints, "gpt2"), str(out))
    np.testing.assert_allclose(_hf_logits(adapted) - hf_base, effect, atol=1e-4)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["fan_in_fan_out"] is True
    assert config["rank_pattern"]["transformer.h.0.attn.c_attn"] == 12


def test_dora_adapter_both_directions(checkpoints, tmp_path):
    hf_model = _hf_model(checkpoints, "llama")
    hf_base = _hf_logits(hf_model)
    peft_model = _peft_adapter(
        hf_model, tmp_path, ["q_proj", "down_proj"], {}, use_dora=True
    )
    with torch.no_grad():  # magnitudes away from ‖W‖, so they matter
        for module in peft_model.modules():
            if hasattr(module, "lora_magnitude_vector") and module.lora_magnitude_vector:
                module.lora_magnitude_vector["default"].weight.mul_(1.5)
    peft_model.save_pretrained(tmp_path)
    hf_adapted = _hf_logits(peft_model)
    backbone = keras_hub.models.Backbone.from_preset(checkpoints["llama"])
    keras_base = _keras_logits(backbone)

    keras_lora.load_adapter(backbone, str(tmp_path / "adapter_model.safetensors"))

    assert all(layer.use_dora for layer in keras_lora.lora_layers(backbone).values())
    np.testing.assert_allclose(
        _keras_logits(backbone) - keras_base, hf_adapted - hf_base, atol=1e-4
    )
    out = str(tmp_path / "exported")
    keras_lora.save_adapter(backbone, out, format="peft")
    reloaded = _load_checked(_hf_model(checkpoints, "llama"), out)
    np.testing.assert_allclose(_hf_logits(reloaded), hf_adapted, atol=1e-5)


def test_adapter_of_hf_base_model_loads_into_backbone(checkpoints, tmp_path):
    # PEFT on LlamaModel: keys lack the causal LM's "model." prefix.
    base = transformers.LlamaModel.from_pretrained(checkpoints["llama"]).eval()
    _peft_adapter(base, tmp_path, ["q_proj"], {})
    backbone = keras_hub.models.Backbone.from_preset(checkpoints["llama"])

    keras_lora.load_adapter(backbone, str(tmp_path))

    assert len(keras_lora.lora_layers(backbone)) == 2


def test_peft_adapter_loads_beside_another_only_under_a_new_name(
    checkpoints, llama_peft_dir
):
    backbone = keras_hub.models.Backbone.from_preset(checkpoints["llama"])
    keras_lora.load_adapter(backbone, str(llama_peft_dir))
    with pytest.raises(ValueError, match="already has adapters \\['default'\\]"):
        keras_lora.load_adapter(backbone, str(llama_peft_dir))

    keras_lora.load_adapter(backbone, str(llama_peft_dir), adapter_name="second")

    assert keras_lora.list_adapters(backbone) == ["default", "second"]
    layer = next(iter(keras_lora.lora_layers(backbone).values()))
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(layer.adapters["second"].lora_a),
        keras.ops.convert_to_numpy(layer.adapters["default"].lora_a),
    )


@pytest.fixture(scope="module")
def llama_peft_dir(checkpoints, tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama_peft")
    _peft_adapter(_hf_model(checkpoints, "llama"), directory, ["q_proj"], {})
    return directory


def _edited(source, target, **changes):
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    config.update(changes)
    (target / "adapter_config.json").write_text(json.dumps(config))
    return str(target)


@pytest.mark.parametrize("option, value, message", [
    ("peft_type", "IA3", "peft_type='IA3'"),
    ("lora_bias", True, "lora_bias=True"),
    ("layers_to_transform", [0], "layers_to_transform=\\[0\\]"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("bias", "all", "bias='all'"),
])
def test_unsupported_peft_options_are_refused_naming_the_option(
    checkpoints, llama_peft_dir, tmp_path, option, value, message
):
    path = _edited(llama_peft_dir, tmp_path / "edited", **{option: value})
    backbone = keras_hub.models.Backbone.from_preset(checkpoints["llama"])
    with pytest.raises(ValueError, match=message):
        keras_lora.load_adapter(backbone, path)
    assert keras_lora.lora_layers(backbone) == {}


def test_adapter_of_another_architecture_is_refused(checkpoints, llama_peft_dir):
    backbone = keras_hub.models.Backbone.from_preset(checkpoints["gpt2"])
    before = np.array(keras.ops.convert_to_numpy(backbone.weights[0]))
    with pytest.raises(ValueError, match="self_attn.q_proj' is not a weight"):
        keras_lora.load_adapter(backbone, str(llama_peft_dir))
    assert keras_lora.lora_layers(backbone) == {}
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(backbone.weights[0]), before
    )


def test_shape_mismatch_names_the_key(checkpoints, tmp_path):
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{**_SIZES, "hidden_size": 8, "head_dim": 2}
    ))
    _peft_adapter(base, tmp_path, ["q_proj"], {})
    backbone = keras_hub.models.Backbone.from_preset(checkpoints["llama"])
    with pytest.raises(ValueError, match="q_proj.lora_A.weight' has shape"):
        keras_lora.load_adapter(backbone, str(tmp_path))
    assert keras_lora.lora_layers(backbone) == {}


def test_export_refuses_layers_without_a_hugging_face_weight(checkpoints, tmp_path):
    backbone = keras_hub.models.Backbone.from_preset(checkpoints["llama"])
    inputs = {"token_ids": keras.Input((None,), dtype="int32"),
              "padding_mask": keras.Input((None,), dtype="int32")}
    head = keras.layers.Dense(2, name="head")
    model = keras.Model(inputs, head(backbone(inputs)))
    keras_lora.apply_lora(model, rank=2, targets=["head", "query"])
    with pytest.raises(ValueError, match="'head'.*fills no Hugging Face"):
        keras_lora.save_adapter(model, str(tmp_path / "out"), format="peft")
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_unknown_save_format_is_refused(checkpoints, tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    keras_lora.apply_lora(model, rank=1)
    with pytest.raises(ValueError, match="format='onnx'"):
        keras_lora.save_adapter(model, str(tmp_path / "a"), format="onnx")


def test_inspect_shows_a_peft_directory(llama_peft_dir, capsys):
    assert cli.main(["inspect", str(llama_peft_dir)]) == 0
    shown = capsys.readouterr().out
    assert "PEFT adapter" in shown and "lora_alpha: 8" in shown
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight [4, 16]" in shown


def test_minilm_all_linear_with_rank_pattern_both_directions(tmp_path):
    directory = keras_lora.hub.minilm_preset_dir()
    hf_model = transformers.BertModel.from_pretrained(directory).eval()
    ids = np.array([[101, 7592, 2088, 2003, 2307, 102]])
    inputs = {"token_ids": ids, "segment_ids": np.zeros_like(ids),
              "padding_mask": np.ones_like(ids)}

    def hf_out(model):
        with torch.no_grad():
            return model(input_ids=torch.tensor(ids)).last_hidden_state.numpy()

    def keras_out(model):
        return keras.ops.convert_to_numpy(model(inputs)["sequence_output"])

    hf_base = hf_out(hf_model)
    peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(
        r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False,
        rank_pattern={"intermediate.dense": 1}, use_rslora=True,
    ))
    peft_model.save_pretrained(tmp_path)
    hf_effect = hf_out(peft_model) - hf_base
    backbone = keras_hub.models.BertBackbone.from_preset(directory)
    keras_base = keras_out(backbone)
    np.testing.assert_allclose(keras_base, hf_base, atol=1e-2)

    keras_lora.load_adapter(backbone, str(tmp_path))

    assert len(keras_lora.lora_layers(backbone)) == 6 * 6 + 1  # + pooler
    assert np.abs(hf_effect).max() > 0.1
    np.testing.assert_allclose(keras_out(backbone) - keras_base, hf_effect, atol=1e-2)
    out = str(tmp_path / "exported")
    keras_lora.save_adapter(backbone, out, format="peft", base_model=directory)
    reloaded = _load_checked(transformers.BertModel.from_pretrained(directory), out)
    np.testing.assert_allclose(hf_out(reloaded) - hf_base, hf_effect, atol=1e-5)
