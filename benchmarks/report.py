"""Renders the results of a run as the Markdown page `docs/benchmarks.md`."""

import os

from benchmarks import report_minilm
from benchmarks import targets as targets_module
from benchmarks import names as variants

_FINDINGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "FINDINGS.md")

_VARIANT_LABELS = {
    variants.FULL: "full",
    variants.KERAS_LORA: "keras-lora",
    variants.KERAS_ENABLE_LORA: "Keras enable_lora",
    variants.KERAS_DORA: "keras-lora DoRA",
}


def _fmt(value, digits=2):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _size(n):
    if n >= 2**20:
        return f"{n / 2**20:.2f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n} B"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _status_line(section):
    if section is None:
        return "not run"
    if section.get("status") in ("skipped", "error"):
        return f"**{section['status']}**: {section.get('reason')}"
    return None


def targets_section(results):
    lines = ["## Targets", ""]
    rows = []
    for result in results:
        for check in targets_module.check(result):
            jit = check["jit_compile"]
            mode = "–" if jit is None else ("jit" if jit else "no jit")
            met = {True: "met", False: "**missed**", None: "not measured"}[
                check["met"]]
            rows.append([result["backend"], check["label"], mode,
                         _fmt(check["value"], 3), _fmt(check["limit"]), met])
    for check in report_minilm.checks(results):
        mode = "jit" if check["jit_compile"] else "no jit"
        met = {True: "met", False: "**missed**", None: "not measured"}[
            check["met"]]
        rows.append([check["backend"],
                     f"MiniLM {check['targets']}: keras-lora / full ≤ PEFT / "
                     "transformers full (torch, eager)", mode,
                     _fmt(check["value"], 3), _fmt(check["limit"]), met])
    lines += _table(["backend", "target", "mode", "ratio", "limit", ""], rows)
    return lines + [""]


def training_section(results, chart_name):
    lines = [
        "## Training step time",
        "",
        "Adam, MSE loss, `model.train_on_batch`, alpha = rank, every base "
        "weight frozen in both LoRA variants (the biases of Keras's "
        "`enable_lora` targets are frozen too, so both train exactly A and "
        "B). Ratios are medians of per-round ratios; lower is better. "
        "Keras's `EinsumDense.enable_lora` factors the kernel as "
        "`kernel.shape[:-1]` × last axis, so on the query/key/value "
        "projections (kernel hidden × heads × head_dim) its A is "
        "hidden × heads × r: more trainable parameters than keras-lora's "
        "contracted/free split (A: hidden × r, B: r × heads × head_dim).",
        "",
    ]
    if chart_name:
        lines += [f"![step-time ratios per backend]({chart_name})", ""]
    for result in results:
        section = result["sections"].get("training")
        lines += [f"### {result['backend']}", ""]
        status = _status_line(section)
        if status:
            lines += [status, ""]
            continue
        rows, notes = [], set()
        for row in section["rows"]:
            jit = "jit" if row["jit_compile"] else "no jit"
            if "error" in row or "skipped" in row:
                why = (f"error: {row['error'][:100]}" if "error" in row
                       else f"skipped: {row['skipped']}")
                rows.append([row["workload"], row["targets"], jit, why,
                             "", "", "", ""])
                continue
            ratios, ms = row["ratios"], row["median_ms"]
            params = row["trainable_params"]
            rows.append([
                row["workload"], row["targets"], jit,
                _fmt(ratios[targets_module.LORA_FULL]),
                _fmt(ratios[f"{variants.KERAS_ENABLE_LORA}/{variants.FULL}"]),
                _fmt(ratios[targets_module.LORA_BUILTIN]),
                " / ".join(_fmt(ms[v], 0) for v in variants.VARIANTS),
                " / ".join(f"{params[v]:,}" for v in variants.VARIANTS),
            ])
            notes.update(row.get("notes", []))
        lines += _table(
            ["workload", "targets", "mode", "keras-lora / full",
             "enable_lora / full", "keras-lora / enable_lora",
             "median ms (full / keras-lora / enable_lora)",
             "trainable params (same order)"],
            rows,
        )
        lines += [""] + [
            f"- keras-lora variant made with: `{note}`" for note in sorted(notes)
        ] + [""]
    return lines


def peft_section(results):
    lines = ["## keras-lora (torch backend) vs Hugging Face PEFT", ""]
    for result in results:
        section = result["sections"].get("peft")
        if result["backend"] != "torch" or section is None:
            continue
        status = _status_line(section)
        if status:
            return lines + [status, ""]
        lines += [
            "Same MLP: Keras on the torch backend (`jit_compile=False`) and an "
            "`nn.Linear` stack with PEFT `LoraConfig(r=8, lora_alpha=8)` on "
            "every Linear, `torch.optim.Adam`, eager.",
            "",
        ]
        lines += _table(
            ["", "median ms"],
            [[k, _fmt(v, 0)] for k, v in section["median_ms"].items()],
        )
        lines += [""]
        lines += _table(
            ["ratio", "value"],
            [[k, _fmt(v)] for k, v in section["ratios"].items()],
        )
        return lines + [""]
    return lines + ["Not run (no torch backend in this run).", ""]


def inference_section(results):
    lines = [
        "## Inference",
        "",
        "`predict_on_batch`, `jit_compile=\"auto\"` (the backend default). "
        "Every `lora_b` is set to random values so the adapter changes the "
        "output; the last column checks that merging is exact.",
        "",
    ]
    rows, notes = [], set()
    for result in results:
        section = result["sections"].get("inference")
        status = _status_line(section)
        if status:
            rows.append([result["backend"], status, "", "", "", ""])
            continue
        for row in section["rows"]:
            if "error" in row:
                rows.append([result["backend"], row["workload"],
                             f"error: {row['error'][:80]}", "", "", ""])
                continue
            ms = row["median_ms"]
            rows.append([
                result["backend"], row["workload"],
                _fmt(row["ratios"]["merged/base"], 3),
                _fmt(row["ratios"]["lora_unmerged/base"], 3),
                " / ".join(_fmt(v, 1) for v in ms.values()),
                f"{row['max_abs_diff_merged_vs_unmerged']:.1e} "
                f"(outputs up to {row['max_abs_output']:.1f})",
            ])
            notes.update(row.get("notes", []))
    lines += _table(
        ["backend", "workload", "merged / base", "unmerged / base",
         "median ms (base / unmerged / merged)", "max abs(merged − unmerged)"],
        rows,
    )
    return lines + [""] + [
        f"- merged model made with: `{n}`" for n in sorted(notes)
    ] + [""]


def _memory_rows(result):
    """One training row per case (the first mode that has counts)."""
    seen, rows = set(), []
    for row in result["sections"].get("training", {}).get("rows", []):
        case = (row["workload"], row["targets"])
        if "memory" in row and case not in seen:
            seen.add(case)
            rows.append(row)
    return rows


def _same_counts_line(first, results):
    def counts(result):
        return [(r["workload"], r["targets"], r["memory"])
                for r in _memory_rows(result)]

    def trainable(result):
        return [(w, t, {v: (c["trainable_params"], c["trainable_bytes"])
                        for v, c in m.items()}) for w, t, m in counts(result)]

    def optimizer(result):
        return [c["optimizer_state_bytes"] for _, _, m in counts(result)
                for c in m.values()]

    others = [r for r in results if r is not first and _memory_rows(r)]
    line = f"Counted on the {first['backend']} backend"
    if not others:
        return line + "."
    differ = [r["backend"] for r in others if trainable(r) != trainable(first)]
    if differ:
        line += ("; trainable counts differ on " + ", ".join(differ)
                 + " (see the raw JSON)")
    else:
        line += "; the trainable counts are identical on every backend"
    gap = max(abs(a - b) for r in others
              for a, b in zip(optimizer(r), optimizer(first)))
    if gap:
        line += (f", the optimizer state differs by at most {gap} bytes "
                 "(the optimizer's scalar counters)")
    return line + "."


def memory_section(results):
    lines = [
        "## Memory",
        "",
        "Exact bytes of the trainable variables and of the optimizer's "
        "state (the variables of the Adam optimizer of the timed models, "
        "after training: two moments per trainable variable plus counters).",
        "",
    ]
    first = next((r for r in results if _memory_rows(r)), None)
    if first is None:
        lines += ["Not counted (no training rows).", ""]
    else:
        rows = []
        for row in _memory_rows(first):
            for variant, counts in row["memory"].items():
                rows.append([
                    row["workload"], row["targets"], _VARIANT_LABELS[variant],
                    f"{counts['trainable_params']:,}",
                    _size(counts["trainable_bytes"]),
                    _size(counts["optimizer_state_bytes"]),
                    _size(counts["all_weight_bytes"]),
                ])
        lines += _table(
            ["workload", "targets", "variant", "trainable params",
             "trainable bytes", "optimizer state", "all weights"],
            rows,
        )
        lines += ["", _same_counts_line(first, results), ""]
    lines += [
        "Resident memory of a short training run (`jit_compile=\"auto\"`), "
        "one fresh process per variant started from the small `run.py` "
        "process (a child's `ru_maxrss` starts at its parent's peak). "
        "\"growth\" is RSS after the training steps minus RSS after the "
        "model was built: what training adds (optimizer state, gradients, "
        "activations, compiled step; allocators keep what they reserved). "
        "\"peak\" is the kernel's VmHWM, the highest RSS of the process "
        "(imports, build and compilation included); `ru_maxrss` is "
        "`resource.getrusage(RUSAGE_SELF)`.",
        "",
    ]
    rows = []
    for result in results:
        section = result["sections"].get("memory", {})
        if section.get("status") != "ok":
            continue
        rss = section["peak_rss"]
        for variant, values in rss["variants"].items():
            label = _VARIANT_LABELS.get(variant, variant)
            run = f"{rss['workload']} {rss['targets']}, {label}"
            if "error" in values:
                rows.append([result["backend"], run,
                             f"error: {values['error'][:80]}", "", "", "", ""])
                continue
            rows.append([
                result["backend"], run,
                _fmt(values.get("rss_after_build_mib"), 0),
                _fmt(values.get("rss_after_training_mib"), 0),
                _fmt(values.get("training_growth_mib"), 0),
                _fmt(values.get("peak_rss_mib"), 0),
                _fmt(values.get("ru_maxrss_mib"), 0),
            ])
    lines += _table(
        ["backend", "run", "RSS after build (MiB)",
         "RSS after training (MiB)", "growth (MiB)", "peak (MiB)",
         "ru_maxrss (MiB)"],
        rows,
    )
    return lines + [""] + _peak_summary(results)


def _peak_summary(results):
    """Peak RSS per variant as a multiple of the full fine-tune's peak."""
    header, rows = None, []
    for result in results:
        rss = result["sections"].get("memory", {}).get("peak_rss", {})
        peaks = {v: f.get("peak_rss_mib")
                 for v, f in rss.get("variants", {}).items()}
        if not peaks.get(variants.FULL):
            continue
        header = header or [v for v in peaks if v != variants.FULL]
        rows.append([result["backend"], _fmt(peaks[variants.FULL], 0)] + [
            _fmt(peaks[v] / peaks[variants.FULL]) if peaks.get(v) else "–"
            for v in header])
    if not rows:
        return []
    labels = [_VARIANT_LABELS.get(v, v) + " / full" for v in header]
    return ["Peak RSS as a multiple of the full fine-tune's:", ""] + _table(
        ["backend", "full peak (MiB)", *labels], rows) + [""]


def lifecycle_section(results):
    lines = ["## apply_lora, save / load / merge", ""]
    rows, io_rows, reasons = [], [], set()
    for result in results:
        section = result["sections"].get("lifecycle")
        if section is None:
            continue
        status = _status_line(section)
        if status:
            reasons.add(f"{result['backend']}: {status}")
            continue
        apply = section["apply_lora"]
        if apply["status"] != "ok":
            reasons.add(f"apply_lora timing skipped: {apply['reason']}")
        else:
            for row in apply["rows"]:
                rows.append([result["backend"], row["num_layers"],
                             row["adapted_layers"], _fmt(row["seconds"], 3),
                             _fmt(row["ms_per_adapted_layer"], 1)])
        io = section["adapter_io"]
        if io["status"] != "ok":
            reasons.add(f"adapter save/load/merge skipped: {io['reason']}")
        else:
            io_rows.append([result["backend"], _fmt(io["save_seconds"], 3),
                            _fmt(io["load_seconds"], 3),
                            _fmt(io["merge_seconds"], 3),
                            f"{io['file_bytes']:,}",
                            f"{io['adapter_tensor_bytes']:,}"])
    if rows:
        lines += ["`apply_lora` on a BERT backbone, all Dense/EinsumDense "
                  "targets:", ""]
        lines += _table(["backend", "transformer layers", "adapted layers",
                         "seconds", "ms per adapted layer"], rows) + [""]
    if io_rows:
        lines += ["Adapter files (BERT stack, all-linear targets):", ""]
        lines += _table(["backend", "save_adapter s", "load_adapter s",
                         "merge_lora s", "file bytes", "adapter tensor bytes"],
                        io_rows) + [""]
    lines += [f"- {r}" for r in sorted(reasons)]
    return lines + [""]


def machine_section(machine, command, quick, results):
    lines = ["## How this was run", "", "```bash", command, "```", ""]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    limits = {r["backend"]: r.get("threads", {}) for r in results}
    for backend, limit in limits.items():
        if limit.get("requested"):
            lines.append(
                f"- {backend} process pinned to {limit['schedulable_cores']} "
                f"core(s), thread pools of {limit['requested']} "
                "(`--threads`, see `benchmarks/threads.py`)"
            )
    if quick:
        lines += ["- **quick mode**: tiny sizes, a smoke run; the numbers "
                  "mean nothing."]
    return lines + [""]


def sizes_lines(results, deviations):
    if not results:
        return []
    s = results[0]["sizes"]
    notes = [f"- {d}" for d in deviations]
    return [
        f"Workloads: MLP of {s['mlp_depth']} × Dense({s['mlp_width']}), batch "
        f"{s['mlp_batch']}; BERT (keras-hub `BertBackbone`) with "
        f"{s['num_layers']} layers, hidden {s['hidden_dim']}, intermediate "
        f"{s['intermediate_dim']}, {s['num_heads']} heads, sequence "
        f"{s['seq_len']}, batch {s['seq_batch']}; rank {s['rank']}. "
        f"Per variant: {s['warmup']} untimed warm-up step(s), then "
        f"{s['repeats']} timed rounds.",
        "",
    ] + (["Departures from the issue's suggested sizes:", ""] + notes + [""]
         if notes else [])


def render(results, machine, command, chart_name, quick, gpu_note,
           deviations=()):
    """Returns the whole page as a string."""
    versions = results[0]["versions"] if results else {}
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by benchmarks/run.py; edit benchmarks/report.py or "
        "benchmarks/FINDINGS.md instead. -->",
        "",
        "Every comparison runs in one process per backend, the variants "
        "interleaved step by step (one step of each, in rotating order, per "
        "round), after warm-up. Only ratios measured side by side are "
        "reported as results: the machine is shared, so absolute times are "
        "noise. This run was on a shared 2-core machine with other jobs "
        "running: read the ratios, not the milliseconds.",
        "",
    ]
    pinned = {(r.get("threads") or {}).get("requested") for r in results}
    pinned.discard(None)
    if pinned:
        count = max(pinned)
        lines += [
            f"Each backend process was pinned to {count} core(s) with thread "
            f"pools of {count} (`--threads {count}`): with two threads on "
            "this machine, every op waits for "
            "threads the neighbours preempt, which charges LoRA's many "
            "small ops milliseconds each (Analysis, section 2).",
            "",
        ]
    lines += sizes_lines(results, deviations)
    lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
              ""]
    lines += targets_section(results)
    lines += training_section(results, chart_name)
    lines += peft_section(results)
    lines += report_minilm.section(results)
    lines += inference_section(results)
    lines += memory_section(results)
    lines += lifecycle_section(results)
    lines += machine_section(machine, command, quick, results)
    lines += ["## GPU", "", gpu_note, ""]
    if os.path.exists(_FINDINGS):
        with open(_FINDINGS) as file:
            findings = file.read().strip()
        lines += ["## Analysis", "", findings.split("\n", 1)[1].strip()
                  if findings.startswith("# ") else findings, ""]
    return "\n".join(lines)

