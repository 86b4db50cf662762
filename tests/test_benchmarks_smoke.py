"""Smoke test of the benchmark harness: `benchmarks/run.py --quick`.

Runs every section once with tiny sizes on the current backend, in this
process, and checks the shape of what comes out. It never checks a time.
"""

import json

import keras
import keras_hub  # noqa: F401  (the harness's BERT workload needs it)
import matplotlib  # noqa: F401  (the harness draws its chart with it)
import pytest

from benchmarks import run
from benchmarks import targets
from benchmarks import variants

SECTIONS = ("training", "peft", "inference", "memory", "lifecycle")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    page = run.main([
        "--quick", "--in-process",
        "--output", str(folder / "benchmarks.md"),
        "--json", str(folder / "results.json"),
    ])
    with open(folder / "results.json") as file:
        results = json.load(file)["results"]
    with open(page) as file:
        text = file.read()
    return folder, results, text


def test_quick_run_covers_only_the_current_backend(quick_run):
    _, results, _ = quick_run
    assert [r["backend"] for r in results] == [keras.backend.backend()]


def test_every_section_reports_a_status(quick_run):
    _, results, _ = quick_run
    sections = results[0]["sections"]
    assert set(sections) == set(SECTIONS)
    for name in ("training", "inference", "memory"):
        assert sections[name]["status"] == "ok", sections[name]


def test_training_rows_compare_the_three_variants(quick_run):
    _, results, _ = quick_run
    rows = results[0]["sections"]["training"]["rows"]
    assert {(r["workload"], r["targets"]) for r in rows} == {
        ("mlp", "all-linear"), ("bert", "query/value"), ("bert", "all-linear")
    }
    for row in rows:
        assert "error" not in row, row.get("traceback")
        assert set(row["median_ms"]) == set(variants.VARIANTS)
        assert set(row["ratios"]) == {
            "keras_lora/full", "keras_enable_lora/full",
            "keras_lora/keras_enable_lora",
        }
        assert all(v > 0 for v in row["ratios"].values())


def test_lora_variants_train_fewer_parameters_than_full(quick_run):
    _, results, _ = quick_run
    for row in results[0]["sections"]["training"]["rows"]:
        params = row["trainable_params"]
        assert 0 < params["keras_lora"] < params["full"]
        assert 0 < params["keras_enable_lora"] < params["full"]


def test_optimizer_state_shrinks_with_the_trainable_set(quick_run):
    _, results, _ = quick_run
    for row in results[0]["sections"]["training"]["rows"]:
        memory = row["memory"]
        assert (memory["keras_lora"]["optimizer_state_bytes"]
                < memory["full"]["optimizer_state_bytes"])


def test_merged_inference_matches_unmerged(quick_run):
    _, results, _ = quick_run
    for row in results[0]["sections"]["inference"]["rows"]:
        assert "error" not in row, row
        assert row["max_abs_diff_merged_vs_unmerged"] <= (
            1e-4 * max(1.0, row["max_abs_output"]))
        assert row["merged_class_names_match_base"]


def test_peak_rss_is_measured_for_full_and_lora(quick_run):
    _, results, _ = quick_run
    rss = results[0]["sections"]["memory"]["peak_rss"]["variants"]
    for variant in ("full", "keras_lora"):
        figures = rss[variant]
        assert figures["peak_rss_mib"] >= figures["rss_after_training_mib"] > 0
        assert figures["ru_maxrss_mib"] > 0, figures


def test_peft_section_runs_on_torch_only(quick_run):
    _, results, _ = quick_run
    peft = results[0]["sections"]["peft"]
    if keras.backend.backend() == "torch":
        assert peft["status"] == "ok", peft
        assert "keras_lora/peft_lora" in peft["ratios"]
    else:
        assert peft["status"] == "skipped"


def test_lifecycle_times_apply_lora_and_adapter_files(quick_run):
    _, results, _ = quick_run
    lifecycle = results[0]["sections"]["lifecycle"]
    apply_rows = lifecycle["apply_lora"]["rows"]
    assert [r["num_layers"] for r in apply_rows] == [1, 2]
    assert all(r["adapted_layers"] > 0 for r in apply_rows)
    assert lifecycle["adapter_io"]["file_bytes"] > 0


def test_memory_cases_name_real_workloads_and_variants():
    from benchmarks import memory
    from benchmarks import names
    from benchmarks import workloads

    for workload, targets_name in memory.RSS_CASES.values():
        assert workload in (workloads.MLP, workloads.TRANSFORMER)
        assert targets_name == workloads.ALL_LINEAR
    assert set(memory.RSS_VARIANTS) == {*variants.VARIANTS, names.KERAS_DORA} - {
        variants.KERAS_ENABLE_LORA}
    assert set(memory.QUICK_RSS_VARIANTS) < set(memory.RSS_VARIANTS)


def test_dora_memory_variant_trains_lora_and_the_magnitude():
    from benchmarks import memory
    from benchmarks import names

    model, x, _ = memory.build_variant(names.KERAS_DORA, quick=True)
    trained = {v.path.split("/")[-1] for v in model.trainable_variables}
    assert trained == {"lora_a", "lora_b", "lora_magnitude"}
    assert model.compiled and x.shape[1:] == model.input_shape[1:]


def test_quick_runs_leave_the_minilm_section_out_unless_named():
    assert "minilm" not in run.chosen_sections(None, quick=True)
    assert "minilm" in run.chosen_sections(None, quick=False)
    assert run.chosen_sections(["minilm"], quick=True) == ["minilm"]


def test_minilm_rows_render_beside_peft_with_the_target_verdict():
    from benchmarks import names
    from benchmarks import report_minilm

    def row(jit, timed, ratios):
        return {"jit_compile": jit, "ratios": ratios,
                "median_ms": {name: 10.0 for name in timed}}

    keras_ratios = {
        names.ratio_key(names.minilm_keras_lora(t), names.MINILM_KERAS_FULL): r
        for t, r in ((names.QUERY_VALUE, 0.5), (names.ALL_LINEAR, 0.8))}
    peft_ratios = {
        names.ratio_key(names.minilm_peft(t), names.MINILM_TORCH_FULL): 0.7
        for t in (names.QUERY_VALUE, names.ALL_LINEAR)}
    keras_ms = [names.MINILM_KERAS_FULL] + [
        names.minilm_keras_lora(t) for t in report_minilm.TARGETS]
    torch_ms = [names.MINILM_TORCH_FULL] + [
        names.minilm_peft(t) for t in report_minilm.TARGETS]
    full_key = names.ratio_key(names.MINILM_KERAS_FULL, names.MINILM_TORCH_FULL)
    results = [
        {"backend": "jax", "sections": {"minilm": {"status": "ok", "rows": [
            row(True, keras_ms, keras_ratios)]}}},
        {"backend": "torch", "sections": {"minilm": {"status": "ok", "rows": [
            {"jit_compile": True, "skipped": "slow"},
            row(False, keras_ms + torch_ms,
                {**keras_ratios, **peft_ratios, full_key: 1.2})]}}},
    ]
    verdicts = {(c["backend"], c["targets"]): c["met"]
                for c in report_minilm.checks(results)}
    assert verdicts == {("jax", "query/value"): True,
                        ("jax", "all-linear"): False,
                        ("torch", "query/value"): True,
                        ("torch", "all-linear"): False}
    text = "\n".join(report_minilm.section(results))
    assert "| jax | jit | keras-lora | 0.50 | 0.80 | met / **missed** |" in text
    assert "| torch | no jit | PEFT (transformers) | 0.70 | 0.70 |" in text
    assert "skipped: slow" in text


def test_every_target_is_checked(quick_run):
    _, results, _ = quick_run
    labels = {c["label"] for c in targets.check(results[0])}
    assert {t[4] for t in targets.STEP_TARGETS} <= labels


def test_page_has_the_tables_chart_and_command(quick_run):
    folder, _, text = quick_run
    for heading in ("## Targets", "## Training step time", "## Inference",
                    "## Memory", "## apply_lora, save / load / merge",
                    "## How this was run"):
        assert heading in text
    assert "python benchmarks/run.py --quick --in-process" in text
    assert (folder / "benchmarks_step_ratios.png").stat().st_size > 0


@pytest.fixture(scope="module")
def mixed_batch_rows(tmp_path_factory):
    from benchmarks import mixed_batch

    path = tmp_path_factory.mktemp("bench") / "mixed_batch.json"
    mixed_batch.main(["--quick", "--json", str(path)])
    with open(path) as file:
        return json.load(file)


def test_mixed_batch_quick_run_times_every_variant_and_the_switch(mixed_batch_rows):
    from benchmarks import mixed_batch

    assert mixed_batch_rows["backend"] == keras.backend.backend()
    (row,) = mixed_batch_rows["rows"]
    assert row["adapters"] == 4 and row["targets"] == "all-linear"
    assert set(row["median_ms"]) == set(mixed_batch.VARIANTS)
    assert len(row["ratios"]) == 3
    assert all(value > 0 for value in row["ratios"].values())
    assert row["max_abs_diff_mixed_vs_single"] <= 1e-4
    switching = row["switching"]
    assert switching["switch_and_predict_ms"] > 0
    assert isinstance(switching["retraced"], bool)


def test_dora_quick_run_compares_dora_with_lora(capsys):
    from benchmarks import dora

    result = dora.main(["--quick"])
    assert result["backend"] == keras.backend.backend()
    rows = result["keras_lora"]
    assert rows and all(row["dora/lora"] > 0 for row in rows.values())
    if keras.backend.backend() == "torch":
        assert result["peft_mlp"]["peft_dora/peft_lora"] > 0
    else:
        assert result["peft_mlp"]["status"] == "skipped"
