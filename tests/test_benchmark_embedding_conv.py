"""Smoke test of `benchmarks/embedding_conv.py --quick`: shape, never time."""

import json

import keras
import pytest

from benchmarks import embedding_conv


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "rows.json"
    embedding_conv.main(["--quick", "--json", str(path)])
    with open(path) as file:
        return json.load(file)


def test_quick_run_reports_both_workloads_on_this_backend(rows):
    assert rows["backend"] == keras.backend.backend()
    assert sorted(row["workload"] for row in rows["rows"]) == ["cnn", "embedding"]


def test_every_variant_has_a_time_and_every_ratio_is_positive(rows):
    for row in rows["rows"]:
        assert set(row["median_ms"]) == set(embedding_conv.VARIANTS)
        assert len(row["ratios"]) == 3
        assert all(value > 0 for value in row["ratios"].values())


def test_lora_variants_train_the_same_fewer_parameters_than_full(rows):
    for row in rows["rows"]:
        params = {k: v["trainable_params"] for k, v in row["memory"].items()}
        assert 0 < params["keras_lora"] == params["keras_enable_lora"] < params["full"]


def test_full_sizes_are_the_issues_32k_by_512_table():
    sizes = embedding_conv.Sizes()
    assert (sizes.vocab, sizes.dim) == (32000, 512)
    assert sizes.memory_steps > 0


def test_one_memory_process_reports_its_peak_and_growth():
    figures = embedding_conv.measure_memory_here(
        "embedding", embedding_conv.KERAS_LORA, embedding_conv.QUICK)
    assert figures["peak_rss_mib"] >= figures["rss_after_training_mib"] > 0
    assert "device_peak_mib" in figures
