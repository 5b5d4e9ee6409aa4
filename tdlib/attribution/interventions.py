"""A graph checked against the real model: remove a feature in the unfrozen model, compare the logit's change with
what the graph predicts.

The frozen replay's own checks (``checks``) only say that the graph describes its linear replay exactly; they cannot
say whether the replay describes the model. Here each chosen feature node is removed from the real forward pass,
with attention, norms, MLPs and every other feature free to respond:

* modes "frozen", "relp" and "jacobian" (graphs of the adapter model): the feature's activation is set to zero at its position
  (a hook on that layer's ``adapter.features``);
* mode "target" (a graph of the target): the feature's decoder write at its position, as the adapter computes it on
  the target's own activations, is subtracted from the target's MLP branch (after the post-MLP norm for adapters
  placed on the residual stream).

The graph's prediction of that change is minus the node's total effect (``graph.total_effects``: downstream
features follow their pre-activations linearly) and, for reference, minus its direct edge to the logit.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..models import anatomy, unwrap
from ..splice import mlp_choice, write_site
from .graph import AttributionGraph


def top_feature_nodes(graph: AttributionGraph, n: int, influence: torch.Tensor | None = None,
                      min_position: int = 0) -> list[int]:
    """The ``n`` feature nodes with the largest influence on the logit, at positions >= ``min_position``."""
    influence = graph.influence() if influence is None else influence
    scores = influence[:graph.n_features].clone()
    scores[graph.state.features[:, 1].cpu() < min_position] = -1.0
    order = scores.argsort(descending=True)[:n]
    return [int(i) for i in order if scores[i] > 0]


@torch.no_grad()
def removal_effects(model, graph: AttributionGraph, nodes: list[int], batch_size: int = 16,
                    fraction: float = 1.0) -> list[float]:
    """For each feature node: the real model's change of the graph's target logit (demeaned as in the graph) when
    ``fraction`` of that feature alone is removed (1: all of it, module docstring; 0.05: its activation scaled by
    0.95), the prompt run once per node, ``batch_size`` at a time."""
    if any(not 0 <= node < graph.n_features for node in nodes):
        raise ValueError("removal_effects takes feature nodes (indices below graph.n_features)")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    inner = unwrap(model)
    ids = graph.state.input_ids.to(next(inner.parameters()).device)
    choice = "target" if graph.state.mode == "target" else "adapter"
    with mlp_choice(inner, choice):
        baseline = _target_logit(inner, ids[None], graph)[0]
        changes = []
        for start in range(0, len(nodes), batch_size):
            chunk = nodes[start:start + batch_size]
            with _removed(inner, graph, chunk, fraction):
                logits = _target_logit(inner, ids[None].expand(len(chunk), -1), graph)
            changes.extend((logits - baseline).tolist())
    return changes


def _target_logit(model, ids, graph: AttributionGraph) -> torch.Tensor:
    logits = model(ids, use_cache=False).logits[:, -1].double()
    value = logits[:, graph.target_token]
    return value - logits.mean(-1) if graph.demean else value


@contextmanager
def _removed(model, graph: AttributionGraph, nodes: list[int], fraction: float = 1.0):
    """Batch row b of the next forward has ``fraction`` of feature node ``nodes[b]`` removed."""
    state = graph.state
    features = state.features[nodes].cpu()
    by_layer: dict[int, list[tuple[int, int, int, float]]] = {}
    for row, (node, (layer, pos, feature)) in enumerate(zip(nodes, features.tolist())):
        by_layer.setdefault(layer, []).append((row, pos, feature, float(state.activations[node])))
    handles = []
    try:
        for layer, entries in by_layer.items():
            mlp = anatomy(model).mlp(layer)
            rows, positions, ids, values = (list(column) for column in zip(*entries))
            if state.mode != "target":
                handles.append(mlp.adapter.features.register_forward_hook(_scaling(rows, positions, ids,
                                                                                   1.0 - fraction)))
                continue
            writes = fraction * mlp.adapter.W_dec.T[ids] * torch.tensor(
                values, dtype=mlp.adapter.W_dec.dtype, device=mlp.adapter.W_dec.device)[:, None]
            handles.append(write_site(model, layer, mlp.placement).register_forward_hook(
                _subtracting(rows, positions, writes)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _scaling(rows, positions, ids, keep: float):
    def hook(module, args, output):
        output = output.clone()
        output[rows, positions, ids] = output[rows, positions, ids] * keep
        return output
    return hook


def _subtracting(rows, positions, writes):
    def hook(module, args, output):
        output = output.clone()
        output[rows, positions] -= writes.to(output.dtype)
        return output
    return hook


def intervention_records(model, graph: AttributionGraph, n_features: int = 20, min_position: int = 0,
                         influence: torch.Tensor | None = None, batch_size: int = 16,
                         small_fraction: float | None = 0.05) -> list[dict]:
    """The graph's top ``n_features`` feature nodes by influence, each removed in the real model: one record per
    node with the graph's predicted logit change (minus its total effect; minus its direct edge), the actual change
    of a full removal (``actual``) and, with ``small_fraction``, of removing that fraction of it divided by the
    fraction (``actual_small``: the model's own first-order response, what a derivative predicts), and how many base
    MLPs lie between the feature and the logit (``downstream_mlps``)."""
    nodes = top_feature_nodes(graph, n_features, influence, min_position)
    if not nodes:
        return []
    actual = removal_effects(model, graph, nodes, batch_size)
    small = (removal_effects(model, graph, nodes, batch_size, small_fraction) if small_fraction
             else [float("nan")] * len(nodes))
    totals = graph.total_effects()
    direct = graph.adjacency[graph.logit_index]
    records = []
    for node, change, small_change in zip(nodes, actual, small):
        layer, pos, feature = graph.state.features[node].tolist()
        records.append({"layer": layer, "position": pos, "feature": feature,
                        "downstream_mlps": graph.n_layers - 1 - layer,
                        "predicted_total": -float(totals[node]), "predicted_direct": -float(direct[node]),
                        "actual": change,
                        "actual_small": small_change / small_fraction if small_fraction else small_change})
    return records


def rank_correlation(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN with fewer than 3 points or a constant side."""
    if len(x) < 3:
        return float("nan")
    rx, ry = _ranks(torch.tensor(x, dtype=torch.float64)), _ranks(torch.tensor(y, dtype=torch.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denominator if denominator > 0 else float("nan")


def _ranks(values: torch.Tensor) -> torch.Tensor:
    order = values.argsort()
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(len(values), dtype=values.dtype)
    for value in values.unique():  # ties share their mean rank
        tied = values == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def agreement(records: list[dict], key: str = "predicted_total") -> dict:
    """How well the graph's predictions match the real removals: Spearman's rank correlation, the median relative
    error |predicted - actual| / |actual| (over removals whose actual change is not negligible: above 1e-3 of the
    largest), the sign agreement and the number of removals."""
    if not records:
        return {"n": 0, "rank_correlation": float("nan"), "median_relative_error": float("nan"),
                "sign_agreement": float("nan")}
    predicted = torch.tensor([r[key] for r in records], dtype=torch.float64)
    actual = torch.tensor([r["actual"] for r in records], dtype=torch.float64)
    floor = 1e-3 * float(actual.abs().max()) if len(actual) else 0.0
    scored = actual.abs() > floor
    relative = ((predicted - actual).abs() / actual.abs())[scored]
    return {"n": len(records), "rank_correlation": rank_correlation(predicted.tolist(), actual.tolist()),
            "median_relative_error": float(relative.quantile(0.5)) if relative.numel() else float("nan"),
            "sign_agreement": float((torch.sign(predicted) == torch.sign(actual)).double().mean()),
            "n_relative": int(scored.sum())}


DEPTH_BINS = (("none", 0, 0), ("1-3", 1, 3), (">3", 4, None))
"""Removals split by how many base MLPs lie between the feature's layer and the logit."""


def calibration_slope(predicted: list[float], actual: list[float]) -> float:
    """Least-squares slope of actual on predicted through the origin (1: calibrated; 0.5: predictions twice too big;
    no removal, no change, so no intercept)."""
    p = torch.tensor(predicted, dtype=torch.float64)
    a = torch.tensor(actual, dtype=torch.float64)
    denominator = float((p * p).sum())
    return float((p * a).sum()) / denominator if denominator > 0 else float("nan")


def within_prompt_rank_correlation(records: list[dict], key: str, actual: str) -> float:
    """Spearman's rank correlation computed within each prompt's removals, averaged over prompts (a prompt with
    fewer than 3 removals or a constant side is left out): what ranking features for one prompt needs."""
    by_prompt: dict = {}
    for record in records:
        by_prompt.setdefault(record.get("prompt", 0), []).append(record)
    values = [rank_correlation([r[key] for r in group], [r[actual] for r in group]) for group in by_prompt.values()]
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


def scale_agreement(records: list[dict], actual: str, key: str = "predicted_total") -> dict:
    """One removal scale's agreement: pooled and within-prompt rank correlations, calibration slope, sign
    agreement, the number of removals; the same split by ``DEPTH_BINS``."""
    def summary(group):
        predicted, observed = [r[key] for r in group], [r[actual] for r in group]
        return {"n": len(group), "rank_correlation": rank_correlation(predicted, observed),
                "within_prompt_rank_correlation": within_prompt_rank_correlation(group, key, actual),
                "slope": calibration_slope(predicted, observed),
                "sign_agreement": (sum((p > 0) == (o > 0) for p, o in zip(predicted, observed)) / len(group)
                                   if group else float("nan"))}

    records = [r for r in records if r.get(actual) == r.get(actual)]  # NaN: not measured at this scale
    by_depth = {}
    for name, low, high in DEPTH_BINS:
        group = [r for r in records if r["downstream_mlps"] >= low and (high is None or r["downstream_mlps"] <= high)]
        by_depth[name] = summary(group)
    return {**summary(records), "by_downstream_mlps": by_depth}


def two_scale_agreement(records: list[dict], small_fraction: float, key: str = "predicted_total") -> dict:
    """The predictions ``key`` (the graph's, by default) against removals at two scales: ``small`` (``small_fraction``
    of the activation removed, divided by it: tests the linearisation) and ``full`` (the whole feature removed: what
    ablation does)."""
    return {"small": {"fraction": small_fraction, **scale_agreement(records, "actual_small", key)},
            "full": {"fraction": 1.0, **scale_agreement(records, "actual", key)}}
