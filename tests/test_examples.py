"""The runnable examples, each run end to end in its quick mode.

Each test states what the example promises its reader; accuracy is only
checked loosely (quick mode trains for a few epochs), consistency exactly.

`make demo`'s quickstart runs on every backend. The other examples (here,
and the MiniLM and causal-LM examples in test_minilm / test_hub) run on one
backend each, the backends taking turns: each is a tour of behaviours that
their own tests pin on all three backends, and running every example on
every backend was ~800 of the suite's process-seconds. The backend chosen
is the one the example's point is hardest on (merged export from torch,
whose Keras exporter cannot) or the cheapest (the keras-hub examples).
"""

import contextlib
import importlib
import io
import os
import sys

import pytest

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")


@pytest.fixture(scope="module")
def example():
    """Imports `examples/<name>.py` as a module (examples import `_common`)."""
    sys.path.insert(0, EXAMPLES_DIR)
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(EXAMPLES_DIR)


@pytest.fixture(scope="module")
def quickstart_run(example, tmp_path_factory):
    """One quick `make demo` run: `(results, printed report, output dir)`.

    `merged_export` reuses its base model and adapter file.
    """
    output_dir = tmp_path_factory.mktemp("quickstart")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        results = example("quickstart").main(quick=True, output_dir=str(output_dir))
    return results, stdout.getvalue(), output_dir


def test_quickstart_adapts_saves_merges_and_serves(quickstart_run):
    results, report, output_dir = quickstart_run

    assert results["lora"] > results["before"] + 0.3
    assert results["lora_trainable"] < results["full_trainable"] / 5
    assert results["adapter_bytes"] < results["full_bytes"] / 5
    assert results["reload_diff"] < 1e-6
    assert results["merged_diff"] < 1e-4
    assert results["served_diff"] < 1e-4
    assert "keras_lora imported: no" in report
    assert "outputs match" in report
    assert "trainable params:" in report
    for name in ("base_digits.keras", "rotated_digits.safetensors",
                 "merged_rotated_digits.keras", "rotated_digits_savedmodel"):
        assert (output_dir / name).exists(), name


def test_quickstart_user_code_uses_only_public_names(example):
    import keras_lora

    quickstart = example("quickstart")
    used = {
        line.split("keras_lora.")[1].split("(")[0]
        for line in quickstart.USER_CODE.splitlines()
        if "keras_lora." in line
    }
    assert used <= set(keras_lora.__all__), used - set(keras_lora.__all__)


@pytest.mark.backend("tensorflow")
def test_adapter_swap_reproduces_each_task_on_one_base(example, tmp_path):
    adapter_swap = example("adapter_swap")
    results = adapter_swap.main(quick=True, output_dir=str(tmp_path))

    assert results["reproduced"] == {"rotated": 0.0, "mirrored": 0.0}
    assert results["swap_back"] == 0.0
    assert results["between_adapters"] > 0.1
    table = results["accuracy"]
    assert table["1. load_adapter(rotated)"]["rotated"] > table["base model"]["rotated"] + 0.3
    assert table["2. load_adapter(mirrored)"]["mirrored"] > table["base model"]["mirrored"] + 0.3


@pytest.mark.backend("torch")
def test_merged_export_serves_without_keras_lora(example, quickstart_run, tmp_path):
    _, _, quickstart_dir = quickstart_run
    results = example("merged_export").main(
        quick=True,
        output_dir=str(tmp_path),
        base_path=str(quickstart_dir / "base_digits.keras"),
        adapter_path=str(quickstart_dir / "rotated_digits.safetensors"),
    )

    assert not any("LoRA" in name for name in results["merged_classes"])
    assert results["merged_diff"] < 1e-4
    assert results["served_diff"] < 1e-4
    assert results["merged_imports"] == "keras_lora imported: no"
    assert results["served_imports"] == "keras_lora imported: no"
    assert results["in_place_diff"] < 1e-4
    assert results["in_place_lora_layers"] == 0


@pytest.mark.backend("jax")
def test_multi_task_serving_trains_two_adapters_and_serves_both_from_one_saved_model(
    example, tmp_path
):
    multi_task = example("multi_task_serving")
    results = multi_task.main(quick=True, output_dir=str(tmp_path))

    assert results["report"] == "keras_lora imported: no"
    assert results["max_difference"] < 1e-4
    assert results["served_accuracy"] == results["accuracy"]
    assert all(value > 0.5 for value in results["accuracy"].values())
