"""The notebooks' figures, kept apart from the experiment code that computes what they show.

Each function takes the numbers a notebook wrote to its results (or an equivalent dict) and returns a matplotlib
figure with labelled axes; ``save_figure`` writes it as a PNG under the figures folder.
"""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np

from .paper import hesitation_reference, reported
from .results import resolve

MODEL_COLORS = {"base": "#4C72B0", "target": "#C44E52", "hybrid": "#8172B3", "adapter": "#55A868",
                "mlp_finetune": "#DD8452", "local_mse": "#937860"}


def save_figure(fig, name: str, figures_dir: str | Path = "figures") -> Path:
    path = resolve(figures_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def pair_figure(results: dict, models=("base", "target", "hybrid"), pair_name: str | None = None,
                design_band: tuple[float, float] | None = None):
    """Three panels: accuracy (by problem length on the organism), mean response length, share of responses
    with the hesitation word. Works for a hub pair's 00 results too (accuracy as bars with Wilson intervals).
    ``design_band``: the share of the target's responses that should hesitate by design (the organism's,
    ``pair.kind.design_band``), drawn as a band."""
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
    if design_band is not None:
        low, high = (100 * b for b in design_band)
        wait_axis.axhspan(low, high, color="grey", alpha=0.15, zorder=0,
                          label=f"design band for the target ({low:.0f}-{high:.0f}%)")
        wait_axis.legend(loc="upper right", fontsize=8)
    word = results.get("hesitation_token", "wait").strip()
    wait_axis.set(ylabel=f'responses containing "{word}" (%)', ylim=(0, 100), title="Hesitation")
    where = "Model organism" if organism else f"{pair_name or results.get('target_model', 'target')}: target " \
                                             f"vs base, {results.get('benchmark', '')}"
    fig.suptitle(f"{where}, {results['n_problems']} held-out problems, greedy decoding")
    fig.tight_layout()
    return fig




def _run_color(name: str, kind: str, adapter_rank: dict[str, int]):
    if kind != "adapter":
        return MODEL_COLORS.get(kind)
    return plt.cm.viridis(0.15 + 0.7 * adapter_rank[name] / max(1, len(adapter_rank) - 1))


def training_figure(logs: dict, models: dict, smooth: int = 25):
    """Notebook 01's figure: training curves (KL, L0) per run, and the sweep's end points against the paper's.

    ``logs``: {run name: DataFrame of log.csv}; ``models``: the 01_train.json ``models`` dict. Curves are rolling
    means over ``smooth`` steps, or over the whole run when it is shorter; the titles say which, and how many steps
    each run trained.
    """
    steps = sorted({len(log) for log in logs.values()})
    window = min(smooth, max(steps, default=1))
    what = "per step" if window <= 1 else f"{window}-step rolling mean"
    trained = f"{steps[0]} steps" if len(steps) == 1 else f"{steps[0]}-{steps[-1]} steps"
    adapters = sorted((n for n in logs if models[n]["kind"] == "adapter"), key=lambda n: -models[n]["l1_weight"])
    rank = {n: i for i, n in enumerate(adapters)}
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    kl_axis, l0_axis, sweep_axis, tradeoff_axis = axes
    for name, log in logs.items():
        kind = models[name]["kind"]
        color = _run_color(name, kind, rank)
        if kind != "local_mse":  # local_mse optimises no KL: its training curve has no KL to draw
            kl_axis.plot(log["step"], log["kl"].rolling(window, min_periods=1).mean(), color=color, label=name)
        if kind in ("adapter", "local_mse"):
            l0_axis.plot(log["step"], log["l0"].rolling(window, min_periods=1).mean(), color=color, label=name,
                         linestyle="--" if kind == "local_mse" else "-")
    kl_axis.set(yscale="log", xlabel="training step", ylabel="KL(target || model) (nats/token)",
                title=f"Output KL while training ({what})")
    kl_axis.legend(fontsize=7)
    l0_axis.set(yscale="log", xlabel="training step", ylabel="L0 (active features / token / layer)",
                title=f"Sparsity while training ({what})")
    l0_axis.legend(fontsize=7)

    weights = [models[n]["l1_weight"] for n in adapters]
    sweep_axis.plot(weights, [models[n]["l0"] for n in adapters], "o-", color=MODEL_COLORS["adapter"],
                    label="ours (held-out)")
    paper_sweep = {float(l1): l0 for l1, l0 in reported()["l0_sweep"].items()}  # l1_weight -> L0, 7B pair
    sweep_axis.plot(list(paper_sweep), list(paper_sweep.values()), "s--", color="grey",
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
    fig.suptitle(f"{len(logs)} training runs, {trained} each; held-out numbers on the right")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------ notebook 02: faithfulness
def model_kind(name: str, train_results: dict | None = None) -> str:
    if train_results and name in train_results.get("models", {}):
        return train_results["models"][name].get("kind", name)
    return "adapter" if name.startswith("adapter") else name


def _interval(entry: dict, key: str) -> list[float]:
    low, high = entry[f"{key}_ci"]
    return [entry[key] - low, high - entry[key]]


def output_faithfulness_figure(models: dict[str, dict], train_results: dict | None = None, suffix: str = ""):
    """Fig. 2 style: KL and top-1 disagreement against L0 (log x); adapters as a line with 95% intervals, models
    without an L0 (base, hybrid, MLP fine-tuning) as horizontal lines; ``suffix="_uncertain"`` for that subset."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    adapters = sorted((n for n, e in models.items() if model_kind(n, train_results) == "adapter" and e["l0"]),
                      key=lambda n: models[n]["l0"])
    for axis, key, label in ((axes[0], "kl" + suffix, "KL(target || model) (nats / token)"),
                             (axes[1], "top1_error" + suffix, "top-1 disagreement with the target (%)")):
        scale = 100 if key.startswith("top1") else 1
        if adapters:
            l0 = [models[n]["l0"] for n in adapters]
            values = [scale * models[n][key] for n in adapters]
            errors = np.array([_interval(models[n], key) for n in adapters]).T * scale
            axis.errorbar(l0, values, yerr=errors, marker="o", capsize=3, color=MODEL_COLORS["adapter"],
                          label="adapters (sparsity sweep)")
            for n, x, y in zip(adapters, l0, values):
                axis.annotate(n.replace("adapter_l1_", "l1="), (x, y), textcoords="offset points", xytext=(4, 4),
                              fontsize=7)
        for name, entry in models.items():
            kind = model_kind(name, train_results)
            if kind == "adapter":
                continue
            value = scale * entry[key]
            if entry.get("l0"):
                axis.errorbar([entry["l0"]], [value], yerr=np.array([_interval(entry, key)]).T * scale, marker="s",
                              capsize=3, linestyle="none", color=MODEL_COLORS.get(kind), label=name)
            else:
                axis.axhline(value, linestyle="--", color=MODEL_COLORS.get(kind, "grey"), label=f"{name} (no L0)")
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))
        axis.xaxis.set_minor_formatter(mticker.NullFormatter())
        shown = [scale * e[key] for e in models.values()]
        axis.set_yscale("log" if min(shown) > 0 else "linear")
        axis.set(xlabel="L0 (active features per token per layer)", ylabel=label)
        axis.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7, loc="best")
    title = "on uncertain tokens (target top prob <= 0.8)" if suffix else "on the target's own responses"
    fig.suptitle(f"Output faithfulness {title}; error bars: sequence-bootstrap 95% interval")
    fig.tight_layout()
    return fig


def nmse_figure(models: dict[str, dict], train_results: dict | None = None):
    """NMSE of each hidden state against the target's; x = 0 is the embedding output, x = i the output of layer
    i - 1."""
    fig, axis = plt.subplots(figsize=(7, 4.2))
    adapters = [n for n in models if model_kind(n, train_results) == "adapter"]
    shades = dict(zip(adapters, plt.cm.Greens(np.linspace(0.45, 0.95, max(len(adapters), 1)))))
    n_layers = 0
    for name, entry in models.items():
        kind = model_kind(name, train_results)
        values = entry["nmse_by_layer"][1:]
        n_layers = max(n_layers, len(values))
        axis.plot(range(len(values)), values, marker="o", label=name,
                  color=shades[name] if kind == "adapter" else MODEL_COLORS.get(kind),
                  linestyle="-" if kind == "adapter" else "--")
    axis.set_yscale("log")
    axis.set_xticks(range(n_layers))
    axis.set(xlabel="layer i (its output hidden state; the embedding output is shared)",
             ylabel="NMSE vs the target's hidden state", title="Internal faithfulness: NMSE by layer")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def subset_figure(kl_by_subset: dict[str, float], model_name: str, subsets: dict[str, list[int]] | None = None):
    """KL when only a subset of layers uses the adapter, by family, at a fixed size whatever the layer count: left,
    each single layer against its index; right, the first k and the last k layers against k (a single layer is
    k = 1, all layers k = L), other blocks as grey points. The all-layers KL is the dashed reference; a subset at
    or above it is marked red. ``subsets`` (name -> layers) places each subset; without it the names are read
    (``layer i``, ``first k``, ``last k``, ``layers i-j``, ``first half``, ``second half``)."""
    all_layers = kl_by_subset["all"]
    layers = {name: subsets[name] if subsets else _subset_layers(name, kl_by_subset) for name in kl_by_subset}
    n_layers = len(layers["all"])
    fig, (single_axis, family_axis) = plt.subplots(1, 2, figsize=(12, 4.2), width_ratios=(3, 2), sharey=True)
    singles = sorted((ls[0], kl_by_subset[n]) for n, ls in layers.items() if len(ls) == 1)
    if singles:
        x, y = zip(*singles)
        single_axis.bar(x, y, color=["#C44E52" if v >= all_layers else "#55A868" for v in y])
        single_axis.xaxis.set_major_locator(mticker.MaxNLocator(integer=True, nbins=16))
    single_axis.set(xlabel="the one layer using the adapter", title="Single layers")
    families = {"first k layers": [], "last k layers": [], "other blocks": []}
    for name, ls in layers.items():
        prefix, suffix = ls == list(range(len(ls))), ls == list(range(n_layers - len(ls), n_layers))
        if prefix:
            families["first k layers"].append((len(ls), kl_by_subset[name]))
        if suffix:
            families["last k layers"].append((len(ls), kl_by_subset[name]))
        if not (prefix or suffix) and len(ls) > 1:  # interior single layers are on the left
            families["other blocks"].append((len(ls), kl_by_subset[name]))
    styles = {"first k layers": ("o-", "#4C72B0"), "last k layers": ("s-", "#DD8452"), "other blocks": ("o", "grey")}
    for family, points in families.items():
        if points:
            x, y = zip(*sorted(points))
            family_axis.plot(x, y, styles[family][0], color=styles[family][1], label=family, alpha=0.8)
            bad = [(a, b) for a, b in points if b >= all_layers and a < n_layers]
            if bad:
                family_axis.plot(*zip(*bad), "x", color="#C44E52", markersize=9)
    family_axis.set(xlabel="k: layers using the adapter", title="First k and last k layers")
    family_axis.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
    for axis in (single_axis, family_axis):
        axis.axhline(all_layers, color="black", linestyle="--", label=f"all {n_layers} layers: {all_layers:.3g}")
        axis.grid(alpha=0.3)
    single_axis.set(ylabel="KL(target || model) (nats / token)", ylim=(0, None))
    family_axis.legend(fontsize=7, loc="best")
    fig.suptitle(f"Layer-subset replacement ({model_name}; the other layers run the target's MLP; red: at or above "
                 "the all-layers KL)")
    fig.tight_layout()
    return fig


def _subset_layers(name: str, kl_by_subset: dict[str, float]) -> list[int]:
    """The layers a subset name stands for (see ``tdlib.faithfulness.layer_subsets``)."""
    singles = [int(key.split()[1]) for key in kl_by_subset if re.fullmatch(r"layer \d+", key)]
    if not singles:
        raise ValueError("the layer count is read from the single-layer subsets ('layer i'), and there are none; "
                         "pass subset_figure(..., subsets=...) with each subset's layers")
    n_layers = 1 + max(singles)
    if name == "all":
        return list(range(n_layers))
    if match := re.fullmatch(r"layers? (\d+)(?:-(\d+))?", name):
        low, high = int(match[1]), int(match[2] or match[1])
        return list(range(low, high + 1))
    if match := re.fullmatch(r"(first|last) (\d+)", name):
        k = int(match[2])
        return list(range(k)) if match[1] == "first" else list(range(n_layers - k, n_layers))
    half = n_layers // 2
    if name in ("first half", "second half"):
        return list(range(half)) if name == "first half" else list(range(half, n_layers))
    raise ValueError(f"cannot place the layer subset {name!r}; pass subset_figure(..., subsets=...) with its layers")


# ---------------------------------------------------------------------------------------- notebook 06: ablation
def _paper_notes(paper: dict) -> dict[str, str | None]:
    """Annotation texts from the paper's numbers recorded in 06_ablation.json (``results["paper"]``); a missing
    number gives no annotation."""
    def note(template: str, *keys: str) -> str | None:
        return template.format(*(paper[k] for k in keys)) if all(k in paper for k in keys) else None

    return {"adapter_wait": note("paper {}", "adapter_wait_per_1k"),
            "adapter_tokens": note("paper {}", "adapter_response_tokens"),
            "ablated_output_wait": note("paper {}", "ablated_output_wait_per_1k"),
            "ablated_wait": note("paper {}", "ablated_both_wait_per_1k"),
            "ablated_tokens": note("paper {}", "ablated_response_tokens"),
            "hybrid_plus_template_wait": note("paper {}", "hybrid_plus_template_wait_per_1k"),
            "hybrid_plus_output_wait": note("paper {}", "hybrid_plus_output_wait_per_1k"),
            "hybrid_plus_wait": note("paper {}", "hybrid_plus_both_wait_per_1k"),
            "steered_shorter": "paper: shorter" if paper else None}


def _error_bar(entry: dict, key: str) -> tuple[float, float]:
    """(below, above) the value: the 95% bootstrap interval where recorded, else +-1 std (random draws)."""
    interval = entry.get(f"{key}_ci")
    if interval and None not in interval:
        return max(0.0, entry[key] - interval[0]), max(0.0, interval[1] - entry[key])
    spread = entry.get(f"{key}_std", 0.0)
    return spread, spread


def ablation_figure(results: dict, word: str):
    """Notebook 06's figure: the hesitation ``word`` per 1k response tokens and mean response length for every
    condition, with 95% bootstrap intervals over responses (random control: mean over draws, +-1 std across draws);
    the paper's numbers (``results["paper"]``) as annotations where they correspond."""
    steered = results["steered"]
    notes = _paper_notes(results.get("paper", {}))
    bars = [("adapter", results["adapter"], MODEL_COLORS["adapter"], notes["adapter_wait"], notes["adapter_tokens"])]
    if "ablated_output" in results:
        bars.append(("ablated:\noutput", results["ablated_output"], "#6FAF7F", notes["ablated_output_wait"], None))
    bars += [("ablated:\nboth groups", results["ablated"], "#2E6B3A", notes["ablated_wait"], notes["ablated_tokens"]),
             ("random\ncontrol", results["random_control"], "#AAAAAA", None, None)]
    optional = [("adapter_clamped", "adapter\n+clamp", "#8FD19E", None),
                ("hybrid", "hybrid", MODEL_COLORS["hybrid"], None),
                ("hybrid_plus_template", "hybrid\n+template", "#D3CBEA", notes["hybrid_plus_template_wait"]),
                ("hybrid_plus_output", "hybrid\n+output", "#C5B8E4", notes["hybrid_plus_output_wait"]),
                ("hybrid_plus_features", "hybrid\n+both", "#B3A6D9", notes["hybrid_plus_wait"]),
                ("hybrid_plus_features_clamped", "hybrid\n+both clamped", "#E3DDF2", None),
                ("target", "target", MODEL_COLORS["target"], None)]
    for key, label, color, note in optional:
        if key in steered:
            bars.append((label, steered[key], color, note, None))
    for key in sorted(k for k in steered if k.startswith("target_steered")):
        bars.append((f"target\nsteered {steered[key]['scale']:+g}", steered[key], "#E8A3A5",
                     notes["steered_shorter"] if steered[key]["scale"] == -0.5 else None, None))
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.05 * len(bars)), 7.5))
    for axis, key, ylabel, note_index in ((axes[0], "wait_per_1k_tokens", f'"{word.strip()}" per 1,000 response tokens', 3),
                                          (axes[1], "mean_response_tokens", "mean response length (tokens)", 4)):
        x = range(len(bars))
        heights = [b[1][key] for b in bars]
        errors = np.array([_error_bar(b[1], key) for b in bars]).T
        axis.bar(x, heights, yerr=errors, capsize=4, color=[b[2] for b in bars])
        axis.set_xticks(list(x), [b[0] for b in bars], fontsize=8)
        axis.set_ylabel(ylabel)
        top = max([h + e for h, e in zip(heights, errors[1])] + [1.0])
        for i, bar in enumerate(bars):
            if bar[note_index]:
                axis.annotate(bar[note_index], (i, heights[i] + errors[1][i]), xytext=(0, 3),
                              textcoords="offset points", ha="center", va="bottom", fontsize=7, color="#444444")
        axis.set_ylim(0, top * 1.35)
    axes[0].set_title('Hesitation (paper annotations: 7B model, "Wait" per 1k tokens)')
    axes[1].set_title("Response length (paper annotations: 7B model, tokens)")
    n_draws = results["random_control"]["n_draws"]
    fig.suptitle(f"Ablating / adding {results['n_features_chosen']} hesitation features "
                 f"({results['n_problems']} held-out problems, greedy; bars: 95% bootstrap intervals; random "
                 f"control: {n_draws} draw{'s' if n_draws != 1 else ''}, ±1 std)")
    fig.tight_layout()
    return fig


def decision_figure(study: dict, word: str):
    """Notebook 06's decision study (``tdlib.decisions``): teacher-forced P(word) at held-out planted decision points
    for the adapter model with each set ablated and for the hybrid with each set added (95% bootstrap intervals
    over traces; the matched random controls as their draws), the dose-response over the top k features, and the
    sampled hesitation rate per 1,000 tokens (95% bootstrap intervals over problems) with the paper's values."""
    tf, sampled = study["teacher_forced"], study["sampled"]
    controls = sorted(name for name in tf if name.startswith("ablate control"))
    fig, axes = plt.subplots(2, 2, figsize=(14, 8.5))
    label = f'P("{word.strip()}") at planted decision points'

    def panel(axis, names, color, title, reference=None):
        names = [n for n in names if n in tf]
        means = [tf[n]["trigger"]["mean"] for n in names]
        errors = np.array([[m - tf[n]["trigger"]["ci"][0], tf[n]["trigger"]["ci"][1] - m]
                           for n, m in zip(names, means)]).T
        axis.bar(range(len(names)), means, yerr=errors, capsize=3,
                 color=["#AAAAAA" if "control" in n or "baseline" in n else color for n in names])
        axis.set_xticks(range(len(names)), [n.replace(" + ", "\n+ ").replace("ablate ", "ablate\n") for n in names],
                        fontsize=7)
        if reference is not None:
            axis.axhline(reference, color=MODEL_COLORS["target"], linestyle=":", label="target, unedited")
            axis.legend(fontsize=8, loc="upper right")
        axis.set_ylabel(label)
        axis.set_ylim(0, 1.05)
        axis.set_title(title)

    groups = [n.split(" ", 1)[1] for n in tf if n.startswith("ablate ") and not n.startswith(("ablate control",
                                                                                              "ablate top"))]
    panel(axes[0, 0], ["adapter", *[f"ablate {g}" for g in groups], *controls], MODEL_COLORS["adapter"],
          "Necessity: the adapter model, sets ablated", tf.get("target", {}).get("trigger", {}).get("mean"))
    panel(axes[0, 1], ["hybrid", *[f"hybrid + {g}" for g in groups],
                       *[c.replace("ablate", "hybrid +") for c in controls]], MODEL_COLORS["hybrid"],
          "Sufficiency: the hybrid, sets added", tf.get("target", {}).get("trigger", {}).get("mean"))
    doses = study["doses"]
    dose_axis = axes[1, 0]
    for prefix, color, name in (("ablate top", MODEL_COLORS["adapter"], "adapter model, top k ablated"),
                                ("hybrid + top", MODEL_COLORS["hybrid"], "hybrid, top k added")):
        means = [tf[f"{prefix} {k}"]["trigger"]["mean"] for k in doses]
        low = [tf[f"{prefix} {k}"]["trigger"]["ci"][0] for k in doses]
        high = [tf[f"{prefix} {k}"]["trigger"]["ci"][1] for k in doses]
        dose_axis.plot(doses, means, marker="o", color=color, label=name)
        dose_axis.fill_between(doses, low, high, color=color, alpha=0.2)
    for reference, color, name in (("adapter", MODEL_COLORS["adapter"], "adapter model"),
                                   ("hybrid", MODEL_COLORS["hybrid"], "hybrid")):
        dose_axis.axhline(tf[reference]["trigger"]["mean"], color=color, linestyle="--", linewidth=1,
                          label=f"{name}, unedited")
    dose_axis.set_xscale("log", base=2)
    dose_axis.set_xlabel("k: top features by selection score (log scale)")
    dose_axis.set_ylabel(label)
    dose_axis.set_ylim(0, 1.05)
    dose_axis.legend(fontsize=7)
    dose_axis.set_title("Dose-response")
    rate_axis = axes[1, 1]
    names = list(sampled)
    means = [sampled[n]["per_1k"]["mean"] for n in names]
    errors = np.array([[max(m - sampled[n]["per_1k"]["ci"][0], 0), max(sampled[n]["per_1k"]["ci"][1] - m, 0)]
                       for n, m in zip(names, means)]).T
    rate_axis.bar(range(len(names)), means, yerr=errors, capsize=3,
                  color=["#AAAAAA" if "control" in n or "baseline" in n else
                         (MODEL_COLORS["hybrid"] if n.startswith("hybrid") else MODEL_COLORS["adapter"])
                         for n in names])
    rate_axis.set_xticks(range(len(names)), names, fontsize=7, rotation=40, ha="right")
    reference = hesitation_reference()
    paper = {"adapter": reference["adapter_wait_per_1k"], "ablate set": reference["ablated_both_wait_per_1k"],
             "hybrid + set": reference["hybrid_plus_both_wait_per_1k"]}
    for name, value in paper.items():
        if name in names:
            i = names.index(name)
            rate_axis.plot([i - 0.4, i + 0.4], [value, value], color="black", linestyle=":", linewidth=1.5,
                           label="paper (7B)" if name == "adapter" else None)
    rate_axis.legend(fontsize=8)
    rate_axis.set_ylabel(f'"{word.strip()}" per 1,000 response tokens (sampled)')
    split = study["split"]
    rate_axis.set_title(f"Sampled: T {study['preregistered']['temperature']}, top-p {study['preregistered']['top_p']}, "
                        f"{study['preregistered']['n_samples']} per problem, {split['sampled_problems']} problems")
    fig.suptitle(f"Held-out decision points ({split['evaluation_traces']['trigger']} at planted triggers in "
                 f"{split['evaluation_traces']['traces']} traces); bars: 95% bootstrap intervals; grey: matched "
                 "random controls and the no-attribution baseline")
    fig.tight_layout()
    return fig


def ground_truth_figure(score: dict):
    """The hesitation features scored against the organism's rule (``tdlib.organism.ground_truth``): per-feature AUROC at
    the decision positions beside the set's and a probe's, and the teacher-forced effect of ablating the set."""
    fig, (detect_axis, ablate_axis) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [2, 1]})
    features = sorted(score["per_feature"], key=lambda e: -(e["auroc"] if e["auroc"] == e["auroc"] else 0))
    layers = sorted({e["layer"] for e in features})
    palette = plt.get_cmap("viridis")(np.linspace(0.1, 0.9, max(len(layers), 1)))
    colors = [palette[layers.index(e["layer"])] for e in features]
    detect_axis.bar(range(len(features)), [e["auroc"] for e in features], color=colors, width=1.0)
    from matplotlib.patches import Patch

    layer_handles = [Patch(color=color, label=f"feature in layer {layer}") for layer, color in zip(layers, palette)]
    detect_axis.axhline(score["set"]["auroc"], color="black", linestyle="-",
                        label=f"the set's summed activation ({score['set']['auroc']:.2f})")
    detect_axis.axhline(score["probe"]["auroc"], color="#C44E52", linestyle="--",
                        label=f"logistic probe on all adapter features ({score['probe']['auroc']:.2f})")
    detect_axis.axhline(0.5, color="grey", linestyle=":", label="chance (0.5)")
    detect_axis.set(xlabel="hesitation feature (sorted by AUROC)", ylabel="AUROC at step ends",
                    ylim=(0, 1.02), title=f"Detecting where the rule fires ({score['n_fires']} of "
                                          f"{score['n_decisions']} step ends)")
    handles, _ = detect_axis.get_legend_handles_labels()
    detect_axis.legend(handles=handles + layer_handles, fontsize=8, loc="lower left")
    ablation = score["ablation"]
    labels = ["\"wait\" is the top-1\nwhere the rule fires", "top-1 unchanged\nelsewhere"]
    before = [ablation["wait_top1_where_rule_fires"]["before"], 1.0]
    after = [ablation["wait_top1_where_rule_fires"]["after"], ablation["top1_agreement_elsewhere"]]
    x = np.arange(len(labels))
    ablate_axis.bar(x - 0.2, before, width=0.4, label="adapter model", color=MODEL_COLORS["adapter"])
    ablate_axis.bar(x + 0.2, after, width=0.4, label="hesitation features ablated", color="#999999")
    ablate_axis.set_xticks(x, labels)
    ablate_axis.set(ylabel="share of positions", ylim=(0, 1.05),
                    title="Teacher-forced ablation on the target's traces")
    ablate_axis.legend(fontsize=8)
    fig.suptitle(f"Hesitation features against the organism's known rule ({score['n_problems']} held-out problems)")
    fig.tight_layout()
    return fig


INTERVENTION_SCALES = (("small", "actual_small", "removal of 5%, per unit removed"),
                       ("full", "actual", "full removal"))


def intervention_figure(checks: dict[str, dict], word: str):
    """Per attribution mode (columns) and removal scale (rows: a small removal divided by its size, which tests the
    linearisation; the full removal, which is what ablation does): each checked feature's logit change predicted by
    the graph (minus its total effect) against the change in the real model, the diagonal drawn; titles give the
    within-prompt and pooled rank correlations and the calibration slope."""
    modes = list(checks)
    scales = [s for s in INTERVENTION_SCALES if all("scales" in checks[m] for m in modes) or s[0] == "full"]
    fig, axes = plt.subplots(len(scales), len(modes), figsize=(4.2 * len(modes), 4 * len(scales)), squeeze=False)
    for row, (scale, key, label) in enumerate(scales):
        for ax, mode in zip(axes[row], modes):
            records = [r for r in checks[mode]["records"] if r.get(key) == r.get(key) and key in r]
            predicted = [r["predicted_total"] for r in records]
            actual = [r[key] for r in records]
            ax.scatter(actual, predicted, s=9, alpha=0.6, color="#4C72B0" if scale == "full" else "#55A868")
            values = predicted + actual
            if values:
                low, high = min(values), max(values)
                ax.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1,
                        label="predicted = actual")
                ax.legend(fontsize=8, loc="upper left")
            ax.axhline(0, color="#ccc", linewidth=0.5)
            ax.axvline(0, color="#ccc", linewidth=0.5)
            summary = checks[mode].get("scales", {}).get(scale) or checks[mode]["total_effect"]
            ax.set(xlabel=f'actual change of the "{word.strip()}" logit ({label})',
                   ylabel="predicted by the graph (- total effect)",
                   title=f"{mode}, {scale} removals ({summary['n']})\nSpearman within prompts "
                         f"{summary.get('within_prompt_rank_correlation', float('nan')):.2f}, pooled "
                         f"{summary['rank_correlation']:.2f}\ncalibration slope {summary.get('slope', float('nan')):.2f}")
            ax.title.set_fontsize(9)
            ax.xaxis.label.set_fontsize(8)
    fig.tight_layout()
    return fig


def selection_rule_figure(selection: dict, reference: float = 0.8):
    """Each rule's agreement with full feature removals in the real model: on the selection half (two-fold
    cross-fit, what chose the rule) and on the held-out evaluation half, within-prompt rank correlation; the bar
    the chosen rule must clear is drawn."""
    rules = list(selection["rules"])
    cross_fit = [selection["rules"][r]["selection_cross_fit"] for r in rules]
    held_out = [selection["rules"][r]["held_out"]["within_prompt_rank_correlation"] for r in rules]
    x = np.arange(len(rules))
    fig, ax = plt.subplots(figsize=(1.6 * len(rules) + 2, 3.8))
    ax.bar(x - 0.2, cross_fit, 0.4, label="selection half (cross-fit): chooses", color="#8172B3")
    ax.bar(x + 0.2, held_out, 0.4, label="evaluation half: held out", color="#55A868")
    ax.axhline(reference, color="#C44E52", linestyle="--", linewidth=1, label=f"target {reference:g}")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xticks(x, [f"{r}\n(chosen)" if r == selection["rule"] else r for r in rules])
    ax.set(ylabel="rank correlation with removals\n(within prompt, mean)", ylim=(-1, 1),
           title=f"Selection rule: {selection['rule']} ({selection['n_selection_prompts']} selection, "
                 f"{selection['n_evaluation_prompts']} evaluation prompts; pool of {selection['pool_size']})")
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


SCOREBOARD_ROWS = ("crossing", "repeat", "slip", "hesitation", "period")
SCOREBOARD_ROW_LABELS = {"crossing": "crossing (local)", "repeat": "repeat (context)", "slip": "slip (functional)",
                         "hesitation": "hesitation (all three)", "period": "period (distractor)"}


def scoreboard_rows(benchmark: dict, study: dict | None = None, stability: dict | None = None) -> dict[str, dict]:
    """The scoreboard's numbers: per mechanism (rows), detection against the answer key with its baselines
    (notebook 05), and when given, necessity / sufficiency (notebook 06: behaviour per 1k tokens as a share of the
    adapter model's, or the hybrid's gain) and the set's Jaccard overlap across two adapter seeds."""
    rows = {}
    for mechanism in SCOREBOARD_ROWS:
        score = benchmark["scores"].get(mechanism)
        if score is None:
            continue
        row = {"features": score.get("n_features", 0),
               "set AUROC": score.get("set", {}).get("auroc"),
               "best feature AUROC": score.get("best_feature", {}).get("auroc"),
               "random set AUROC": score.get("random_set", {}).get("auroc_mean"),
               "probe AUROC: all adapter features": score["probes"]["adapter features"]["auroc"],
               "probe AUROC: base MLP": score["probes"]["base MLP"]["auroc"],
               "probe AUROC: hybrid MLP": score["probes"]["hybrid MLP"]["auroc"]}
        entry = (study or {}).get("sets", {}).get(mechanism)
        if entry is not None:
            def rate(condition, m=mechanism):
                return condition["mechanisms"][m]["per_1k_tokens"]
            before = rate(study["adapter"])
            row["ablated / adapter"] = rate(entry["ablated"]) / before if before else None
            row["random / adapter"] = (float(np.mean([rate(d) for d in entry["random"]])) / before
                                       if before and entry["random"] else None)
            row["hybrid + set (per 1k)"] = rate(entry["hybrid_plus"])
            row["hybrid (per 1k)"] = rate(study["hybrid"])
        if stability and mechanism in stability:
            row["Jaccard across seeds"] = stability[mechanism]["jaccard"]
        rows[mechanism] = row
    return rows


def stability_entries(stability: dict | None) -> dict:
    """A seed-stability record (notebook 05 on the organism) without its ``seed_model`` name: the per-set entries
    the scoreboard and its table show."""
    return {k: v for k, v in (stability or {}).items() if k != "seed_model"}


def answer_key_figures(answer_key: dict, figures_dir: str | Path = "figures") -> list[Path]:
    """Notebook 05's organism figures, saved: the selected features against the answer key (``05_ground_truth``)
    and every planted mechanism's set on the scoreboard with its seed stability (``05_scoreboard``)."""
    truth = ground_truth_figure(answer_key["ground_truth"])
    board = scoreboard_figure(answer_key["benchmark"], stability=stability_entries(answer_key["stability"]))
    return [save_figure(truth, "05_ground_truth", figures_dir), save_figure(board, "05_scoreboard", figures_dir)]


def scoreboard_figure(benchmark: dict, study: dict | None = None, stability: dict | None = None):
    """One table-figure: the planted mechanisms by rows, the method's scores and the baselines by columns. AUROC
    columns (the probes' too) are coloured from 0.5 (chance, white) to 1; the others carry their numbers uncoloured."""
    rows = scoreboard_rows(benchmark, study, stability)
    columns = list(dict.fromkeys(c for r in rows.values() for c in r))
    names = list(rows)
    values = np.array([[np.nan if rows[n].get(c) is None else float(rows[n][c]) for c in columns] for n in names])
    colour = np.full_like(values, np.nan)
    for j, column in enumerate(columns):
        if "AUROC" in column or column.startswith("probe"):
            colour[:, j] = np.clip((values[:, j] - 0.5) / 0.5, 0, 1)
    fig, axis = plt.subplots(figsize=(1.25 * len(columns) + 2.5, 0.6 * len(names) + 2.2))
    axis.imshow(np.nan_to_num(colour, nan=0.0), cmap="Greens", vmin=0, vmax=1.4, aspect="auto")
    for i in range(len(names)):
        for j, column in enumerate(columns):
            value = values[i, j]
            text = "–" if np.isnan(value) else (f"{value:.0f}" if column == "features" else
                                                 f"{value:.1f}" if "per 1k" in column else f"{value:.2f}")
            axis.text(j, i, text, ha="center", va="center", fontsize=9)
    axis.set_xticks(range(len(columns)), [c.replace(": ", ":\n").replace(" / ", " /\n") for c in columns],
                    fontsize=8, rotation=0)
    axis.set_yticks(range(len(names)), [SCOREBOARD_ROW_LABELS[n] for n in names])
    axis.xaxis.tick_top()
    axis.set_xticks(np.arange(-0.5, len(columns)), minor=True)
    axis.set_yticks(np.arange(-0.5, len(names)), minor=True)
    axis.grid(which="minor", color="white", linewidth=2)
    axis.tick_params(which="minor", length=0)
    fig.suptitle(f"The organism as a benchmark: each planted mechanism's feature set against its answer key "
                 f"({benchmark['n_test_problems']} held-out problems scored; AUROC 0.5 = chance; ablation and "
                 "random: behaviour per 1k tokens as a share of the adapter model's)", fontsize=9, y=0.02,
                 va="bottom")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def benchmark_figure(models: dict[str, dict], benchmark: str, n_problems: int, train_results: dict | None = None,
                     decoding: str = "greedy decoding"):
    """Fig. 4 style: accuracy (Wilson 95% interval) and mean response length per model, side by side, with the
    base and target levels drawn across both panels; ``decoding`` (how the responses were generated) is in the
    title."""
    fig, (accuracy_axis, length_axis) = plt.subplots(1, 2, figsize=(max(10, 1.3 * len(models)), 4.5))
    _benchmark_panels(accuracy_axis, length_axis, models, train_results)
    fig.suptitle(f"{benchmark}: {n_problems} held-out problems, {decoding}")
    fig.tight_layout()
    return fig


def benchmarks_figure(summaries: list[dict], train_results: dict | None = None, decoding: str = "greedy decoding"):
    """The paper's figure 4 over several benchmarks: one row of ``benchmark_figure``'s two panels per benchmark
    (``summaries``: ``tdlib.evaluation.benchmark_summary`` results); one benchmark gives ``benchmark_figure``."""
    if len(summaries) == 1:
        (only,) = summaries
        return benchmark_figure(only["models"], only["benchmark"], only["n_problems"], train_results, decoding)
    width = max(10, 1.3 * max(len(s["models"]) for s in summaries))
    fig, axes = plt.subplots(len(summaries), 2, figsize=(width, 4.2 * len(summaries)), squeeze=False)
    for (accuracy_axis, length_axis), summary in zip(axes, summaries):
        _benchmark_panels(accuracy_axis, length_axis, summary["models"], train_results)
        accuracy_axis.set_title(f"{summary['benchmark']} ({summary['n_problems']} problems): "
                                f"{accuracy_axis.get_title()}", fontsize=9)
        length_axis.set_title(f"{summary['benchmark']}: {length_axis.get_title()}", fontsize=9)
    fig.suptitle(f"{len(summaries)} benchmarks, {decoding}")
    fig.tight_layout()
    return fig


def _benchmark_panels(accuracy_axis, length_axis, models: dict[str, dict], train_results: dict | None) -> None:
    names = list(models)
    colors = [MODEL_COLORS.get(model_kind(n, train_results), "grey") for n in names]
    labels = [n.replace("adapter_l1_", "adapter\nl1=") for n in names]
    accuracy = [100 * models[n]["accuracy"] for n in names]
    errors = [[max(0.0, 100 * (models[n]["accuracy"] - models[n]["accuracy_ci"][0])) for n in names],
              [max(0.0, 100 * (models[n]["accuracy_ci"][1] - models[n]["accuracy"])) for n in names]]
    accuracy_axis.bar(labels, accuracy, yerr=errors, capsize=3, color=colors)
    length_axis.bar(labels, [models[n]["mean_response_tokens"] for n in names], color=colors)
    for reference, style in (("target", "--"), ("base", ":")):
        if reference in models:
            accuracy_axis.axhline(100 * models[reference]["accuracy"], color=MODEL_COLORS[reference],
                                  linestyle=style, label=f"{reference} accuracy")
            length_axis.axhline(models[reference]["mean_response_tokens"], color=MODEL_COLORS[reference],
                                linestyle=style, label=f"{reference} length")
    for x, n in enumerate(names):
        gain = models[n].get("recovered_gain")
        if gain is not None and n not in ("base", "target"):
            accuracy_axis.annotate(f"{100 * gain:.0f}%", (x, accuracy[x]), textcoords="offset points",
                                   xytext=(0, 12), ha="center", fontsize=7)
    accuracy_axis.set(ylabel="accuracy (%)", ylim=(0, 105),
                      title="Accuracy (95% Wilson interval; label: recovered gain)")
    length_axis.set(ylabel="mean response length (tokens)", title="Response length")
    for axis in (accuracy_axis, length_axis):
        axis.tick_params(axis="x", labelsize=7, rotation=30)
        axis.legend(fontsize=7, loc="upper left")
