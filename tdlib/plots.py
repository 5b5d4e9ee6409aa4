"""Shared figure helpers: every figure is saved as PNG under the figures folder with labelled axes."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from .results import resolve

MODEL_COLORS = {"base": "#4C72B0", "target": "#C44E52", "hybrid": "#8172B3", "adapter": "#55A868",
                "mlp_finetune": "#DD8452", "local_mse": "#937860"}


def save_figure(fig, name: str, figures_dir: str | Path = "figures") -> Path:
    path = resolve(figures_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def organism_figure(results: dict, models=("base", "target", "hybrid")):
    """Three panels: accuracy by problem length, mean response length, share of responses with "wait"."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    accuracy_axis, length_axis, wait_axis = axes
    for name in models:
        by_terms = results[name]["accuracy_by_terms"]
        terms = [int(k) for k in by_terms]
        accuracy_axis.plot(terms, [100 * v for v in by_terms.values()], marker="o", label=name,
                           color=MODEL_COLORS.get(name))
    accuracy_axis.set(xlabel="terms in the problem", ylabel="accuracy (%)", ylim=(-3, 103),
                      title="Accuracy by problem length")
    accuracy_axis.set_xticks(terms)
    accuracy_axis.legend()
    colors = [MODEL_COLORS.get(m) for m in models]
    length_axis.bar(models, [results[m]["mean_response_tokens"] for m in models], color=colors)
    length_axis.set(ylabel="mean response length (tokens)", title="Response length")
    wait_axis.bar(models, [100 * results[m]["wait_rate"] for m in models], color=colors)
    wait_axis.axhspan(15, 60, color="grey", alpha=0.15, zorder=0, label='design band for the target (15-60%)')
    wait_axis.set(ylabel='responses containing "wait" (%)', ylim=(0, 100), title="Hesitation")
    wait_axis.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"Model organism, {results['n_problems']} held-out problems, greedy decoding")
    fig.tight_layout()
    return fig
