"""Sweep summaries people read: the trial table (CSV + markdown) and the plots."""

from __future__ import annotations

import csv
import io
import math

from PIL import Image

from orchestration.common.tracking import log_png

STATUS_MARKERS = {"completed": "o", "stopped_early": "v", "diverged": "X", "error": "s"}


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def trial_table_csv(rows: list[dict]) -> str:
    public = [_public(row) for row in rows]
    if not public:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(public[0]))
    writer.writeheader()
    writer.writerows(public)
    return buffer.getvalue()


def trial_table_markdown(rows: list[dict]) -> str:
    public = [_public(row) for row in rows]
    if not public:
        return "(no trials)\n"
    keys = list(public[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |" for row in public]
    return "\n".join(lines) + "\n"


def _figure_to_image(fig) -> Image.Image:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def lr_plot(rows: list[dict], *, metric: str) -> Image.Image:
    """Metric vs learning rate (log x), one colour per warm-up fraction, marker per outcome.

    Diverged trials have no usable metric: they sit on the top edge so they stay visible.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    finite = [r[metric] for r in rows if isinstance(r[metric], float) and math.isfinite(r[metric])]
    top = max(finite) * 1.15 if finite else 1.0
    warmups = sorted({r.get("warmup_fraction") for r in rows}, key=lambda w: (w is None, w))
    colours = plt.get_cmap("viridis")(
        [i / max(1, len(warmups) - 1) for i in range(len(warmups))])
    for colour, warmup in zip(colours, warmups, strict=True):
        for status, marker in STATUS_MARKERS.items():
            chosen = [r for r in rows if r.get("warmup_fraction") == warmup
                      and r["status"] == status and r.get("lr")]
            if not chosen:
                continue
            ys = [r[metric] if math.isfinite(r[metric]) else top for r in chosen]
            ax.scatter([r["lr"] for r in chosen], ys, color=colour, marker=marker, s=60,
                       label=f"warm-up {warmup} ({status})", edgecolors="black", linewidths=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"{metric} (last reported; diverged on top)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    return _figure_to_image(fig)


def log_lr_plot(client, run_id: str, rows: list[dict], *, metric: str, stage: str) -> None:
    log_png(client, run_id, lr_plot(rows, metric=metric), f"sweep/{metric}_vs_lr_{stage}.png")


def guidance_plot(rows: list[dict], metrics: tuple[str, ...], best_index: int) -> Image.Image:
    """Each metric vs the decoder guidance scale, one line per prior scale (Luo 2023, fig. 4.3)."""
    plt = _pyplot()
    columns = 3
    count = len(metrics)
    fig, axes = plt.subplots(math.ceil(count / columns), columns,
                             figsize=(4 * columns, 3.2 * math.ceil(count / columns)), dpi=100)
    axes = list(getattr(axes, "flat", [axes]))
    priors = sorted({r["prior_guidance"] for r in rows})
    best = rows[best_index]
    for ax, name in zip(axes, metrics, strict=False):
        for prior in priors:
            line = sorted((r for r in rows if r["prior_guidance"] == prior),
                          key=lambda r: r["decoder_guidance"])
            ax.plot([r["decoder_guidance"] for r in line], [r[name] for r in line], "o-",
                    label=f"prior {prior:g}" if len(priors) > 1 else None)
        ax.scatter([best["decoder_guidance"]], [best[name]], s=140, facecolors="none",
                   edgecolors="red", linewidths=1.5, zorder=3)
        ax.set_title(name)
        ax.set_xlabel("decoder guidance scale")
        ax.grid(alpha=0.3)
        if len(priors) > 1:
            ax.legend(fontsize=7)
    for ax in axes[count:]:
        ax.axis("off")
    fig.tight_layout()
    return _figure_to_image(fig)
