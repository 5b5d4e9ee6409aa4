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
    """Three panels: accuracy (by problem length on the organism), mean response length, share of responses
    with "wait". Works for a hub pair's 00 results too (accuracy as bars with Wilson intervals)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    accuracy_axis, length_axis, wait_axis = axes
    colors = [MODEL_COLORS.get(m) for m in models]
    organism = all("accuracy_by_terms" in results[m] for m in models)
    if organism:
        for name in models:
            by_terms = results[name]["accuracy_by_terms"]
            terms = [int(k) for k in by_terms]
            accuracy_axis.plot(terms, [100 * v for v in by_terms.values()], marker="o", label=name,
                               color=MODEL_COLORS.get(name))
        accuracy_axis.set(xlabel="terms in the problem", title="Accuracy by problem length")
        accuracy_axis.set_xticks(terms)
        accuracy_axis.legend()
    else:
        accuracy = [100 * results[m]["accuracy"] for m in models]
        errors = [[a - 100 * results[m]["accuracy_ci"][0] for a, m in zip(accuracy, models)],
                  [100 * results[m]["accuracy_ci"][1] - a for a, m in zip(accuracy, models)]]
        accuracy_axis.bar(models, accuracy, yerr=errors, capsize=4, color=colors)
        accuracy_axis.set(title="Accuracy (95% Wilson interval)")
    accuracy_axis.set(ylabel="accuracy (%)", ylim=(-3, 103))
    length_axis.bar(models, [results[m]["mean_response_tokens"] for m in models], color=colors)
    length_axis.set(ylabel="mean response length (tokens)", title="Response length")
    wait_axis.bar(models, [100 * results[m]["wait_rate"] for m in models], color=colors)
    if organism:
        wait_axis.axhspan(15, 60, color="grey", alpha=0.15, zorder=0, label='design band for the target (15-60%)')
        wait_axis.legend(loc="upper right", fontsize=8)
    wait_axis.set(ylabel='responses containing "wait" (%)', ylim=(0, 100), title="Hesitation")
    where = "Model organism" if organism else f"{results.get('target_model', 'target')} vs its base, " \
                                             f"{results.get('benchmark', '')}"
    fig.suptitle(f"{where}, {results['n_problems']} held-out problems, greedy decoding")
    fig.tight_layout()
    return fig


# The paper's sweep (DESIGN.md section 1): l1_weight -> validation L0 on the 7B pair.
PAPER_L0_SWEEP = {0.01: 10.3, 0.003: 4.3, 0.001: 1.4, 0.0003: 0.4, 0.0001: 0.1}


def _run_color(name: str, kind: str, adapter_rank: dict[str, int]):
    if kind != "adapter":
        return MODEL_COLORS.get(kind)
    return plt.cm.viridis(0.15 + 0.7 * adapter_rank[name] / max(1, len(adapter_rank) - 1))


def training_figure(logs: dict, models: dict, smooth: int = 25):
    """Notebook 01's figure: training curves (KL, L0) per run, and the sweep's end points against the paper's.

    ``logs``: {run name: DataFrame of log.csv}; ``models``: the 01_train.json ``models`` dict.
    """
    adapters = sorted((n for n in logs if models[n]["kind"] == "adapter"), key=lambda n: -models[n]["l1_weight"])
    rank = {n: i for i, n in enumerate(adapters)}
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    kl_axis, l0_axis, sweep_axis, tradeoff_axis = axes
    for name, log in logs.items():
        kind = models[name]["kind"]
        color = _run_color(name, kind, rank)
        if kind != "local_mse":  # local_mse optimises no KL: its training curve has no KL to draw
            kl_axis.plot(log["step"], log["kl"].rolling(smooth, min_periods=1).mean(), color=color, label=name)
        if kind in ("adapter", "local_mse"):
            l0_axis.plot(log["step"], log["l0"].rolling(smooth, min_periods=1).mean(), color=color, label=name,
                         linestyle="--" if kind == "local_mse" else "-")
    kl_axis.set(yscale="log", xlabel="training step", ylabel="KL(target || model) (nats/token)",
                title=f"Output KL while training ({smooth}-step mean)")
    kl_axis.legend(fontsize=7)
    l0_axis.set(yscale="log", xlabel="training step", ylabel="L0 (active features / token / layer)",
                title="Sparsity while training")
    l0_axis.legend(fontsize=7)

    weights = [models[n]["l1_weight"] for n in adapters]
    sweep_axis.plot(weights, [models[n]["l0"] for n in adapters], "o-", color=MODEL_COLORS["adapter"],
                    label="ours (held-out)")
    sweep_axis.plot(list(PAPER_L0_SWEEP), list(PAPER_L0_SWEEP.values()), "s--", color="grey",
                    label="paper, 7B pair")
    sweep_axis.set(xscale="log", yscale="log", xlabel="l1_weight", ylabel="L0 (active features / token / layer)",
                   title="Sparsity sweep")
    sweep_axis.legend(fontsize=8)

    tradeoff_axis.plot([models[n]["l0"] for n in adapters], [models[n]["kl"] for n in adapters], "o-",
                       color=MODEL_COLORS["adapter"], label="adapters")
    for name, info in models.items():
        if info["kind"] == "local_mse":
            tradeoff_axis.plot(info["l0"], info["kl"], "D", color=MODEL_COLORS["local_mse"],
                               label="local-MSE transcoder")
        elif info["kind"] in ("hybrid", "mlp_finetune"):
            tradeoff_axis.axhline(info["kl"], color=MODEL_COLORS[info["kind"]], linestyle=":",
                                  label=f"{'hybrid (no adapter)' if info['kind'] == 'hybrid' else 'MLP fine-tune (dense)'}")
    tradeoff_axis.set(xscale="log", yscale="log", xlabel="L0 (active features / token / layer)",
                      ylabel="held-out KL(target || model) (nats/token)", title="Faithfulness vs sparsity")
    tradeoff_axis.legend(fontsize=7)
    fig.tight_layout()
    return fig
