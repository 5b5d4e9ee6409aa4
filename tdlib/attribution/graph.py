"""The attribution graph: nodes, edges, and what it says about itself (influence, scores, pruning, total
effects; circuit-tracer's definitions, on |edges| row-normalised)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .replay import FrozenPrompt


@dataclass
class AttributionGraph:
    """Direct-effect graph of one prompt. ``adjacency[t, s]`` = edge s -> t (rows: targets, columns: sources);
    nodes in the order features | errors (layer-major, L*P) | tokens (P) | logit (1)."""

    state: FrozenPrompt
    adjacency: torch.Tensor
    bias: torch.Tensor
    """[N] constant (non-node) contribution to each row: attention value biases, plus b_enc for features."""
    target_token: int
    demean: bool
    logit_value: float
    """The target logit (demeaned if chosen) in the real model on the prompt."""
    probability: float
    """Softmax probability of the target token in the real model."""
    n_active_features: int = -1
    """Features active on the prompt (more than ``n_features`` when max_feature_nodes folded some into errors)."""
    active_features: torch.Tensor | None = None
    """[n_active, 3] every active feature (layer, position, id), nodes or not; ``active_activations`` their values."""
    active_activations: torch.Tensor | None = None

    @property
    def n_features(self) -> int:
        return self.state.features.shape[0]

    @property
    def n_layers(self) -> int:
        return self.state.n_layers

    @property
    def n_pos(self) -> int:
        return self.state.n_pos

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_index(self) -> int:
        return self.token_start + self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.logit_index + 1

    def error_index(self, layer: int, pos: int) -> int:
        return self.error_start + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.token_start + pos

    def influence(self) -> torch.Tensor:
        """[N] each node's share of the logit's attribution, all path lengths (``node_influence``)."""
        return node_influence(self)

    def scores(self, influence: torch.Tensor | None = None) -> dict:
        """Replacement and completeness scores and the signed logit decomposition (``graph_scores``)."""
        return graph_scores(self, influence)

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> "PrunedGraph":
        """The nodes and edges carrying most of the influence on the logit (``prune``)."""
        return prune(self, node_threshold, edge_threshold)

    def total_effects(self, with_bias: bool = False):
        """Each node's total effect on the logit (``total_effects``)."""
        return total_effects(self, with_bias)

    def node_values(self) -> torch.Tensor:
        """Each node's value: activation for features, the logit for the logit, NaN for vector nodes."""
        values = torch.full((self.n_nodes,), float("nan"), dtype=self.adjacency.dtype)
        values[: self.n_features] = self.state.activations.cpu().to(values.dtype)
        values[self.logit_index] = self.logit_value
        return values


def total_effects(graph: AttributionGraph, with_bias: bool = False):
    """[N] each node's total (direct + through downstream features) effect on the logit, in the replay whose
    active features follow their pre-activations linearly. Removing node s changes the logit by -total[s].
    ``with_bias``: also return the constants' (attention value biases, b_enc) total effect on the logit."""
    a = graph.adjacency.double()
    n = graph.n_features
    activations = graph.state.activations.double().cpu()
    per_unit = a[:n, :n] / activations[None, :]  # d pre_t / d act_s
    direct = a[graph.logit_index, :n] / activations
    # g = direct + g @ per_unit  (per-unit total effect of each feature on the logit)
    # features are sorted by layer and read only earlier layers: I - per_unit is unit lower-triangular
    system = (torch.eye(n, dtype=a.dtype) - per_unit).T
    g = torch.linalg.solve_triangular(system, direct[:, None], upper=True, unitriangular=True)[:, 0]
    totals = a[graph.logit_index] + g @ a[:n]
    if not with_bias:
        return totals
    bias = graph.bias.double()
    return totals, float(bias[graph.logit_index] + g @ bias[:n])


def normalize_rows(matrix: torch.Tensor) -> torch.Tensor:
    """|matrix| with each row scaled to sum to 1 (zero rows stay zero)."""
    absolute = matrix.abs()
    return absolute / absolute.sum(1, keepdim=True).clamp(min=1e-10)


def propagate(normalized: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """weights @ (A + A^2 + ...): the graph is a DAG, so the series ends after at most N terms."""
    current = weights @ normalized
    influence = current.clone()
    for _ in range(normalized.shape[0]):
        if not current.any():
            return influence
        current = current @ normalized
        influence += current
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle")


def logit_weights(graph: AttributionGraph) -> torch.Tensor:
    weights = torch.zeros(graph.n_nodes, dtype=graph.adjacency.dtype)
    weights[graph.logit_index] = 1.0
    return weights


def node_influence(graph: AttributionGraph) -> torch.Tensor:
    """[N] share of the logit's (abs, row-normalised) attribution flowing through each node, all path lengths."""
    return propagate(normalize_rows(graph.adjacency), logit_weights(graph))


def graph_scores(graph: AttributionGraph, influence: torch.Tensor | None = None) -> dict:
    """Replacement and completeness scores (circuit-tracer) plus an exact signed decomposition of the logit.

    * replacement_score: token influence / (token + error influence): share of the end-to-end path mass from
      the logit that ends in input tokens rather than error nodes.
    * completeness: mean over nodes of the share of their incoming |edges| from non-error nodes, weighted by
      (influence + logit weight).
    * signed: logit = tokens + errors + bias (total effects, the replay with linear active features);
      ``error_share_signed`` = errors / logit; ``direct`` shares: the logit's direct inputs by node type."""
    normalized = normalize_rows(graph.adjacency)
    weights = logit_weights(graph)
    influence = propagate(normalized, weights) if influence is None else influence
    errors = slice(graph.error_start, graph.token_start)
    tokens = slice(graph.token_start, graph.logit_index)
    token_influence, error_influence = float(influence[tokens].sum()), float(influence[errors].sum())
    non_error = 1 - normalized[:, errors].sum(1)
    has_inputs = normalized.sum(1) > 0
    output = (influence + weights) * has_inputs
    completeness = float((non_error * output).sum() / output.sum())
    total, bias_total = total_effects(graph, with_bias=True)
    direct = graph.adjacency[graph.logit_index].double()
    return {
        "replacement_score": token_influence / max(token_influence + error_influence, 1e-12),
        "completeness": completeness,
        "logit": graph.logit_value,
        "signed_total": {"tokens": float(total[tokens].sum()), "errors": float(total[errors].sum()),
                         "bias": bias_total},
        "signed_direct": {"features": float(direct[:graph.n_features].sum()), "errors": float(direct[errors].sum()),
                          "tokens": float(direct[tokens].sum()), "bias": float(graph.bias[graph.logit_index])},
        "error_share_signed": float(total[errors].sum()) / graph.logit_value if graph.logit_value else float("nan"),
        "error_share_abs_direct": float(normalized[graph.logit_index, errors].sum()),
        "feature_share_abs_direct": float(normalized[graph.logit_index, :graph.n_features].sum()),
    }


def _threshold(scores: torch.Tensor, keep_mass: float) -> float:
    """Smallest score among the top scores that together carry ``keep_mass`` of the total."""
    ordered = scores.flatten().sort(descending=True).values
    if ordered.numel() == 0 or float(ordered.sum()) <= 0:
        return float("inf")
    cumulative = ordered.cumsum(0) / ordered.sum()
    index = min(int(torch.searchsorted(cumulative, torch.tensor(keep_mass, dtype=cumulative.dtype))),
                ordered.numel() - 1)
    return float(ordered[index])


@dataclass
class PrunedGraph:
    node_mask: torch.Tensor
    edge_mask: torch.Tensor
    influence: torch.Tensor
    """[N] node influence in the full graph."""


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PrunedGraph:
    """Keep the nodes carrying ``node_threshold`` of the influence on the logit (tokens and the logit always),
    then the edges carrying ``edge_threshold`` of the edge influence; drop nodes left without edges."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    weights = logit_weights(graph)
    influence = node_influence(graph)
    node_mask = influence >= _threshold(influence, node_threshold)
    node_mask[graph.token_start:] = True
    pruned = graph.adjacency.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    normalized = normalize_rows(pruned)
    edge_scores = normalized * (propagate(normalized, weights) + weights)[:, None]
    edge_mask = (edge_scores >= _threshold(edge_scores, edge_threshold)) & (edge_scores > 0)
    inner = graph.token_start  # features and errors need an outgoing edge; features an incoming one too
    while True:
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:inner] &= edge_mask[:, :inner].any(0)
        node_mask[:graph.n_features] &= edge_mask[:graph.n_features].any(1)
        if torch.equal(before, node_mask):
            return PrunedGraph(node_mask, edge_mask, influence)
