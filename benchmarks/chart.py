"""The step-time ratio chart of `docs/benchmarks.md` (matplotlib, PNG)."""

from benchmarks import names
from benchmarks import targets as targets_module

_BARS = (
    (targets_module.LORA_FULL, "keras-lora / full"),
    (names.ratio_key(names.KERAS_ENABLE_LORA, names.FULL),
     "Keras enable_lora / full"),
)


def _case_label(row):
    jit = "jit" if row["jit_compile"] else "no jit"
    return f"{row['workload']}\n{row['targets']}\n{jit}"


def draw(results, path):
    """Draws one panel per backend: ratio bars per case; writes `path`.

    Returns:
        `path`, or `None` when no backend has training rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    panels = [
        (r["backend"], [row for row in r["sections"].get("training", {}).get(
            "rows", []) if "ratios" in row])
        for r in results
    ]
    panels = [(backend, rows) for backend, rows in panels if rows]
    if not panels:
        return None
    figure, axes = pyplot.subplots(
        1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False,
        sharey=True,
    )
    width = 0.38
    for axis, (backend, rows) in zip(axes[0], panels):
        positions = range(len(rows))
        for offset, (key, label) in enumerate(_BARS):
            axis.bar(
                [p + (offset - 0.5) * width for p in positions],
                [row["ratios"][key] for row in rows],
                width,
                label=label,
            )
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.axhline(0.70, color="tab:red", linewidth=0.8, linestyle="--",
                     label="target 0.70")
        axis.set_xticks(list(positions))
        axis.set_xticklabels([_case_label(r) for r in rows], fontsize=7)
        axis.set_title(f"{backend}: step time / full fine-tune")
    axes[0][0].set_ylabel("step-time ratio (lower is better)")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return path
