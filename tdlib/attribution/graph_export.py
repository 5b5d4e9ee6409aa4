"""Attribution graphs out of tdlib: the JSON the circuit-tracer frontend reads, and static matplotlib figures.

The JSON follows circuit-tracer's ``frontend/graph_models.py`` (``metadata``, ``qParams``, ``nodes``, ``links``;
node ids ``{layer}_{feature}_{pos}`` for features, ``{layer}_-1_{pos}`` for error nodes, ``E_{token}_{pos}`` for
tokens, ``{n_layers + 1}_{token}_{pos}`` for the logit). circuit-tracer itself is not a dependency.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple

import matplotlib.pyplot as plt

from . import (AttributionGraph, PrunedGraph, StudyConfig, attribute, graph_scores, linearity_check, prune,
               require_exact)
from .graph_page import ERROR_MEANING
from ..paper import hesitation_share
from ..results import atomic_write_text, resolve


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token]).replace("\n", "\\n")


def node_records(graph: AttributionGraph, pruned: PrunedGraph, tokenizer) -> dict[int, dict]:
    """Frontend node records for every kept node, keyed by graph index."""
    records = {}
    ids = graph.state.input_ids.tolist()
    cumulative = _cumulative_rank(pruned.influence)
    for index in pruned.node_mask.nonzero().flatten().tolist():
        influence = float(cumulative[index])
        if index < graph.n_features:
            layer, pos, feature = graph.state.features[index].tolist()
            node_id = f"{layer}_{feature}_{pos}"
            records[index] = dict(
                node_id=node_id, feature=_cantor(layer, feature), layer=str(layer), ctx_idx=pos,
                feature_type="cross layer transcoder", jsNodeId=f"{layer}_{feature}-0", influence=influence,
                activation=float(graph.state.activations[index]), clerp=f"adapter L{layer} #{feature}")
        elif index < graph.token_start:
            layer, pos = divmod(index - graph.error_start, graph.n_pos)
            records[index] = dict(
                node_id=f"{layer}_-1_{pos}", feature=-1, layer=str(layer), ctx_idx=pos,
                feature_type="mlp reconstruction error", jsNodeId=f"{layer}_-1-{pos}", influence=influence,
                clerp=f"error L{layer}: {ERROR_MEANING[graph.state.mode]}")
        elif index < graph.logit_index:
            pos = index - graph.token_start
            records[index] = dict(
                node_id=f"E_{ids[pos]}_{pos}", feature=pos, layer="E", ctx_idx=pos, feature_type="embedding",
                jsNodeId=f"E_{ids[pos]}-{pos}", influence=influence)
        else:
            token = graph.target_token
            records[index] = dict(
                node_id=f"{graph.n_layers + 1}_{token}_{graph.n_pos - 1}", feature=token,
                layer=str(graph.n_layers + 1), ctx_idx=graph.n_pos - 1, feature_type="logit",
                token_prob=graph.probability, is_target_logit=True, jsNodeId=f"L_{token}-{graph.n_pos - 1}",
                clerp=f'Output "{_token_text(tokenizer, token)}" (p={graph.probability:.3f})')
    for record in records.values():
        record.setdefault("token_prob", 0.0)
        record.setdefault("is_target_logit", False)
        record.setdefault("run_idx", 0)
        record.setdefault("reverse_ctx_idx", 0)
        record.setdefault("clerp", "")
        record.setdefault("influence", None)
        record.setdefault("activation", None)
    return records


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _cumulative_rank(influence):
    """Each node's cumulative influence share when nodes are sorted by influence (what the frontend shows)."""
    ordered, order = influence.sort(descending=True)
    cumulative = ordered.cumsum(0) / ordered.sum().clamp(min=1e-12)
    out = influence.clone()
    out[order] = cumulative
    return out


def frontend_graph(graph: AttributionGraph, pruned: PrunedGraph, tokenizer, slug: str, scan: str,
                   node_threshold: float) -> dict:
    """The graph as the circuit-tracer frontend's JSON document."""
    records = node_records(graph, pruned, tokenizer)
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    links = [{"source": records[s]["node_id"], "target": records[t]["node_id"],
              "weight": float(graph.adjacency[t, s])}
             for t, s in zip(targets.tolist(), sources.tolist()) if s in records and t in records]
    connected = {link["source"] for link in links} | {link["target"] for link in links}
    nodes = [r for r in records.values() if r["node_id"] in connected or r["feature_type"] in ("embedding", "logit")]
    ids = graph.state.input_ids.tolist()
    metadata = {
        "slug": slug, "scan": scan, "transcoder_list": [],
        "prompt_tokens": [_token_text(tokenizer, t) for t in ids], "prompt": tokenizer.decode(ids),
        "node_threshold": node_threshold, "schema_version": 1,
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links}


def write_frontend_graph(document: dict, path: str | Path) -> Path:
    """Write the document atomically (relative paths from the repository root)."""
    path = resolve(path)
    atomic_write_text(path, json.dumps(document, indent=1))
    return path


class ExampleGraph(NamedTuple):
    """One prompt's attribution graph, checked exact, pruned and written for the frontend (``example_graph``)."""

    graph: AttributionGraph
    pruned: PrunedGraph
    check: dict
    """``linearity_check``'s discrepancies (each within tolerance: ``require_exact`` passed)."""
    scores: dict
    """``graph_scores``: replacement score, completeness and the signed decomposition of the logit."""
    seconds: float
    """Time to attribute the graph."""
    path: Path
    """The frontend JSON."""

    def describe(self) -> str:
        graph = self.graph
        return (f"mode {graph.state.mode}: {graph.n_pos} tokens, {graph.n_active_features} active features "
                f"({graph.n_features} as nodes), {graph.n_nodes} nodes, {self.seconds:.1f} s; kept "
                f"{int(self.pruned.node_mask.sum())} nodes, {int(self.pruned.edge_mask.sum())} edges -> {self.path}")

    def table(self) -> dict:
        """The check and the scalar scores, one row each."""
        return {**self.check, **{k: v for k, v in self.scores.items() if not isinstance(v, dict)}}

    def signed_effects(self) -> dict:
        """Per source (tokens, error nodes, bias): its signed total and direct effect on the logit."""
        return {"signed total effect (tokens/errors/bias)": self.scores["signed_total"],
                "signed direct effect on the logit": self.scores["signed_direct"]}


def example_graph(model, tokenizer, input_ids, token: int, mode: str, settings: StudyConfig, *,
                  n_linearity_nodes: int, node_threshold: float, edge_threshold: float, slug: str, scan: str,
                  path: str | Path) -> ExampleGraph:
    """Attribute one prompt in ``mode`` (with the study ``settings``' batch size and feature-node cap), check that
    the graph is exact on the prompt (``linearity_check`` with ``n_linearity_nodes`` removals, then
    ``require_exact``: raises otherwise), prune it and write it as the frontend's JSON to ``path``."""
    started = time.time()
    graph = attribute(model, input_ids, token, batch_size=settings.batch_size, progress=True,
                      max_feature_nodes=settings.max_feature_nodes, mode=mode)
    seconds = time.time() - started
    check = linearity_check(model, graph, n_nodes=n_linearity_nodes)
    scores = graph_scores(graph)
    require_exact(check, graph)
    pruned = prune(graph, node_threshold, edge_threshold)
    document = frontend_graph(graph, pruned, tokenizer, slug=slug, scan=scan, node_threshold=node_threshold)
    return ExampleGraph(graph, pruned, check, scores, seconds, write_frontend_graph(document, path))


def plot_hesitation(study: dict, word: str):
    """Left: cumulative share of the hesitation word's influence vs the number of features (the selection cut and
    the paper's share marked, ``tdlib.paper.hesitation_share``). Right: selected features by group and layer
    (stacked)."""
    paper_share = hesitation_share()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    cumulative = study["cumulative_influence"]
    left.plot(range(1, len(cumulative) + 1), [100 * c for c in cumulative], color="#55A868")
    left.axhline(100 * study["influence_mass"], color="grey", linestyle="--",
                 label=f"selection: {100 * study['influence_mass']:.0f}% of influence")
    left.axvline(study["hesitation_features"], color="#55A868", linestyle=":",
                 label=f"{study['hesitation_features']} features = {100 * study['hesitation_share']:.2f}% of all")
    left.axvline(paper_share * study["n_features_total"], color="#C44E52", linestyle="-.",
                 label=f"paper's share ({100 * paper_share:.2f}%) of this model's features")
    left.set(xscale="log", xlabel="features, by influence (count, log scale)",
             ylabel=f'cumulative share of "{word.strip()}" influence (%)', title=f"{study['n_prompts']} hesitation prompts")
    left.legend(fontsize=8)
    groups = study["groups"]
    layers = sorted({int(l) for g in groups.values() for l in g["layers"]})
    colors = {"output": "#C44E52", "template": "#4C72B0", "suppressor": "#8C8C8C"}
    stacked = [0] * len(layers)  # stacked, so 30 layers stay readable
    for name in groups:
        counts = [groups[name]["layers"].get(str(l), 0) for l in layers]
        right.bar(layers, counts, width=0.8, bottom=stacked, color=colors.get(name),
                  label=f"{name} ({groups[name]['count']}, {100 * groups[name]['influence_share']:.0f}% of influence)")
        stacked = [a + b for a, b in zip(stacked, counts)]
    right.set(xlabel="layer", ylabel="selected features (count)", title="Hesitation features by group")
    right.set_xticks(layers[::max(1, -(-len(layers) // 16))])
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig
