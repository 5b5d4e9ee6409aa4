"""Checks of a graph against its replay: node removals, row identities, the linearity check, and the derivative
check (the graph's logit row against autograd through the real base MLPs, patterns and norms frozen)."""
from __future__ import annotations

import torch

from ..models import anatomy, unwrap
from .graph import AttributionGraph, total_effects
from .interventions import rank_correlation
from .replay import Replay, _feature_offsets


@torch.no_grad()
def replay_logit(model, graph: AttributionGraph, zero: list[int] = (), recompute: bool = False) -> float:
    """The target logit of the frozen replacement model with the nodes ``zero`` (graph indices) set to 0.

    ``recompute=False``: features keep their prompt values (the graph's direct-effect model);
    ``recompute=True``: active features follow their pre-activations linearly (the ReLU's local linearisation),
    so removing a node also moves every feature downstream of it."""
    state = graph.state
    replay = Replay(model, state, graph.target_token, graph.demean)
    embeddings, errors, activations, biases, mlp_biases = replay.leaves(1, state.n_layers, state.n_pos)
    embeddings = embeddings.detach()
    errors, activations, biases, mlp_biases = ([t.detach() for t in group]
                                               for group in (errors, activations, biases, mlp_biases))
    offsets = _feature_offsets(state)
    clamp: dict[int, set[int]] = {}
    for node in zero:
        node = int(node)
        if node < graph.n_features:
            layer = int(state.features[node, 0])
            activations[layer][0, node - offsets[layer]] = 0.0
            clamp.setdefault(layer, set()).add(node - offsets[layer])
        elif node < graph.token_start:
            layer, pos = divmod(node - graph.error_start, graph.n_pos)
            errors[layer][0, pos] = 0.0
        elif node < graph.logit_index:
            embeddings[0, node - graph.token_start] = 0.0
        else:
            raise ValueError("the logit node cannot be removed")
    if recompute and clamp:
        replay = _ClampedReplay(replay, clamp)
    _, final = replay.run(embeddings, errors, activations, biases, mlp_biases, recompute=recompute)
    return float(replay.logit(final)[0])


class _ClampedReplay:
    """A replay whose recomputed features keep some given ones at zero."""

    def __init__(self, replay: Replay, clamp: dict[int, set[int]]):
        self.replay, self.clamp = replay, clamp

    def __getattr__(self, name):
        return getattr(self.replay, name)

    def run(self, *args, **kwargs):
        original = self.replay.preactivations

        def clamped(layer, mid, positions, ids, with_bias=False):
            pre = original(layer, mid, positions, ids, with_bias)
            for column in self.clamp.get(layer, ()):
                pre[..., column] = 0.0
            return pre

        self.replay.preactivations = clamped
        try:
            return Replay.run(self.replay, *args, **kwargs)
        finally:
            del self.replay.preactivations


def max_identity_error(graph: AttributionGraph) -> dict:
    """Row identities: incoming edges + bias = value, for the logit and every feature (should be ~0)."""
    sums = graph.adjacency.sum(1) + graph.bias
    values = graph.node_values()
    rows = torch.cat([torch.arange(graph.n_features), torch.tensor([graph.logit_index])])
    gaps = (sums[rows] - values[rows]).abs()
    return {"max_row_identity_error": float(gaps.max()), "logit": graph.logit_value}


def linearity_check(model, graph: AttributionGraph, n_nodes: int = 20, seed: int = 0) -> dict:
    """Remove ``n_nodes`` random nodes one at a time in the frozen replay: logit change vs the graph's direct
    effect (features fixed) and total effect (features linear). Returns the largest discrepancies."""
    generator = torch.Generator().manual_seed(seed)
    candidates = torch.randperm(graph.logit_index, generator=generator)[:n_nodes].tolist()
    base_fixed = replay_logit(model, graph)
    base_linear = replay_logit(model, graph, recompute=True)
    totals = total_effects(graph)
    direct_gap = total_gap = 0.0
    for node in candidates:
        change = replay_logit(model, graph, [node]) - base_fixed
        direct_gap = max(direct_gap, abs(change + float(graph.adjacency[graph.logit_index, node])))
        change = replay_logit(model, graph, [node], recompute=True) - base_linear
        total_gap = max(total_gap, abs(change + float(totals[node])))
    return {"nodes_checked": len(candidates), "max_direct_effect_error": direct_gap,
            "max_total_effect_error": total_gap, "replay_vs_model_logit_error": abs(base_fixed - graph.logit_value),
            "logit_scale": abs(graph.logit_value), **max_identity_error(graph)}


def require_exact(check: dict, graph: AttributionGraph, rel: float = 1e-3) -> None:
    """Raise unless ``linearity_check``'s ``check`` shows the graph exact on its prompt: the row identity, the
    direct and total effects of removed nodes and the replay's logit, each within ``rel`` x max(1, |logit|)."""
    tolerance = rel * max(1.0, abs(graph.logit_value))
    keys = ("max_row_identity_error", "max_direct_effect_error", "max_total_effect_error",
            "replay_vs_model_logit_error")
    off = {key: check[key] for key in keys if not check[key] < tolerance}
    if off:
        raise AssertionError(f"the graph is not exact within {tolerance:.3g}: {off} (full check: {check})")


class _RealMLPReplay(Replay):
    """The frozen replay with each base MLP computed by the model's own module (not linearised): attention patterns
    and norm scales stay frozen, so its derivative at the prompt is what mode "jacobian" claims to compute."""

    def __init__(self, model, state, target_token: int, demean: bool):
        super().__init__(model, state, target_token, demean)
        inner = unwrap(model)
        self.mlps = [anatomy(inner).mlp(i).base_mlp for i in range(state.n_layers)]
        # shift each real MLP so that the replay passes through the prompt's own residuals (where the linear replay
        # is, and where the derivative is taken): the linear map's remainder is already in the graph's nodes
        linear = Replay(model, state, target_token, demean)
        with torch.no_grad():
            mids, _ = linear.run(*linear.leaves(1, state.n_layers, state.n_pos))
            self.offsets = [self._real(l, mid) - linear.base_mlp(l, mid) for l, mid in enumerate(mids)]

    def _real(self, layer: int, mid: torch.Tensor) -> torch.Tensor:
        state = self.state
        n_pos = mid.shape[-2]
        x = mid * (state.mlp_scale[layer, :n_pos, None] * state.mlp_weight[layer])
        return self.mlps[layer](x) * (state.base_scale[layer, :n_pos, None] * state.base_weight[layer])

    def base_mlp(self, layer: int, mid: torch.Tensor):
        return self._real(layer, mid) - self.offsets[layer]


def derivative_check(model, graph: AttributionGraph) -> dict:
    """How far the graph's edges into the logit are from the model's own derivative with attention patterns and norms
    frozen: autograd through the real base-MLP modules (``_RealMLPReplay``), times each node's value. Zero (to
    rounding) for mode "jacobian"; for "relp" it measures how far the paper's rules are from a derivative. Returns
    the largest absolute gap, the logit row's scale and the rank correlation of the two rows over feature nodes."""
    state = graph.state
    if not state.passes_base_mlp:
        raise ValueError(f"mode {state.mode!r} passes no influence through the base MLPs: nothing to check")
    replay = _RealMLPReplay(model, state, graph.target_token, graph.demean)
    leaves = replay.leaves(1, state.n_layers, state.n_pos)
    embeddings, errors, activations, biases, mlp_biases = leaves
    with torch.enable_grad():
        _, final = replay.run(*leaves)
        flat = [embeddings, *errors, *activations]
        grads = torch.autograd.grad(replay.logit(final).sum(), flat, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, flat)]
    g_emb, g_err, g_act = grads[0], grads[1:1 + len(errors)], grads[1 + len(errors):]
    with torch.no_grad():
        features = torch.cat([(g * a)[0] for g, a in zip(g_act, activations)])
        error_edges = torch.cat([(g * e)[0].sum(-1) for g, e in zip(g_err, errors)])
        token_edges = (g_emb * embeddings)[0].sum(-1)
        reference = torch.cat([features, error_edges, token_edges]).cpu().double()
    row = graph.adjacency[graph.logit_index, :graph.logit_index].double()
    n = graph.n_features
    return {"max_abs_gap": float((row - reference).abs().max()), "row_scale": float(reference.abs().max()),
            "feature_rank_correlation": rank_correlation(row[:n].tolist(), reference[:n].tolist())}
