"""A graph checked against the real model: remove a feature in the unfrozen model, compare the logit's change with
what the graph predicts.

The frozen replay's own checks (``checks``) only say that the graph describes its linear replay exactly; they cannot
say whether the replay describes the model. Here each chosen feature node is removed from the real forward pass,
with attention, norms, MLPs and every other feature free to respond:

* modes "frozen" and "relp" (graphs of the adapter model): the feature's activation is set to zero at its position
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

from ..models import get_mlp, unwrap
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
def removal_effects(model, graph: AttributionGraph, nodes: list[int], batch_size: int = 16) -> list[float]:
    """For each feature node: the real model's change of the graph's target logit (demeaned as in the graph) when
    that feature alone is removed (module docstring), the prompt run once per node, ``batch_size`` at a time."""
    if any(not 0 <= node < graph.n_features for node in nodes):
        raise ValueError("removal_effects takes feature nodes (indices below graph.n_features)")
    inner = unwrap(model)
    ids = graph.state.input_ids.to(next(inner.parameters()).device)
    choice = "target" if graph.state.mode == "target" else "adapter"
    with mlp_choice(inner, choice):
        baseline = _target_logit(inner, ids[None], graph)[0]
        changes = []
        for start in range(0, len(nodes), batch_size):
            chunk = nodes[start:start + batch_size]
            with _removed(inner, graph, chunk):
                logits = _target_logit(inner, ids[None].expand(len(chunk), -1), graph)
            changes.extend((logits - baseline).tolist())
    return changes


def _target_logit(model, ids, graph: AttributionGraph) -> torch.Tensor:
    logits = model(ids, use_cache=False).logits[:, -1].double()
    value = logits[:, graph.target_token]
    return value - logits.mean(-1) if graph.demean else value


@contextmanager
def _removed(model, graph: AttributionGraph, nodes: list[int]):
    """Batch row b of the next forward has feature node ``nodes[b]`` removed."""
    state = graph.state
    features = state.features[nodes].cpu()
    by_layer: dict[int, list[tuple[int, int, int, float]]] = {}
    for row, (node, (layer, pos, feature)) in enumerate(zip(nodes, features.tolist())):
        by_layer.setdefault(layer, []).append((row, pos, feature, float(state.activations[node])))
    handles = []
    try:
        for layer, entries in by_layer.items():
            mlp = get_mlp(model, layer)
            rows, positions, ids, values = (list(column) for column in zip(*entries))
            if state.mode != "target":
                handles.append(mlp.adapter.features.register_forward_hook(_zeroing(rows, positions, ids)))
                continue
            writes = mlp.adapter.W_dec.T[ids] * torch.tensor(values, dtype=mlp.adapter.W_dec.dtype,
                                                              device=mlp.adapter.W_dec.device)[:, None]
            handles.append(write_site(model, layer, mlp.placement).register_forward_hook(
                _subtracting(rows, positions, writes)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _zeroing(rows, positions, ids):
    def hook(module, args, output):
        output = output.clone()
        output[rows, positions, ids] = 0.0
        return output
    return hook


def _subtracting(rows, positions, writes):
    def hook(module, args, output):
        output = output.clone()
        output[rows, positions] -= writes.to(output.dtype)
        return output
    return hook


def intervention_records(model, graph: AttributionGraph, n_features: int = 20, min_position: int = 0,
                         influence: torch.Tensor | None = None, batch_size: int = 16) -> list[dict]:
    """The graph's top ``n_features`` feature nodes by influence, each removed in the real model: one record per
    node with the graph's predicted logit change (minus its total effect; minus its direct edge) and the actual one."""
    nodes = top_feature_nodes(graph, n_features, influence, min_position)
    if not nodes:
        return []
    actual = removal_effects(model, graph, nodes, batch_size)
    totals = graph.total_effects()
    direct = graph.adjacency[graph.logit_index]
    records = []
    for node, change in zip(nodes, actual):
        layer, pos, feature = graph.state.features[node].tolist()
        records.append({"layer": layer, "position": pos, "feature": feature,
                        "predicted_total": -float(totals[node]), "predicted_direct": -float(direct[node]),
                        "actual": change})
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
