"""One attribution graph as a self-contained HTML page a person can explore offline.

``write_graph_page`` writes a single file: the graph's data as JSON and a small script of our own (no library, no
CDN, nothing fetched), drawn as SVG. Nodes sit by prompt position (x) and layer (y: tokens at the bottom, the
logit on top); a slider keeps the features and error nodes that carry a chosen cumulative share of their influence on
the logit (the pruning threshold), hovering a node shows what it is (a feature's strongest contexts and the tokens its decoder
promotes; an error node's meaning in the graph's mode), clicking it lists and highlights its edges. Error nodes,
tokens, the logit and each feature group have their own shape and colour.

The page stays small by keeping at most ``max_nodes`` nodes (by influence) and, among them, the strongest
``max_edges`` edges by edge influence.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from ..results import atomic_write_text, resolve
from .graph import AttributionGraph, normalize_rows, propagate, logit_weights

ERROR_MEANING = {
    "frozen": "the base MLP's output and b_dec, frozen: no influence passes through it",
    "relp": "no part of the MLP (the base MLP is passed through linearly): only the writes of active features not "
            "kept as nodes (max_feature_nodes), zero otherwise",
    "jacobian": "what the first-order pass-through leaves of the base MLP's output here (mlp(x0) - J(x0) x0), "
                "plus the writes of active features not kept as nodes",
    "target": "what the adapter misses of the target's MLP here (target_mlp - base_mlp - adapter), plus the writes "
              "of active features not kept as nodes",
}


def graph_page_data(graph: AttributionGraph, tokenizer, features: dict | None = None, max_nodes: int = 300,
                    max_edges: int = 3000, decoder_tokens=None) -> dict:
    """The page's JSON: nodes (kind, layer, position, influence rank, label, details) and edges among them.

    ``features``: {"layer/feature": {"group", "mechanism", "contexts", "decoder_top_tokens"}} for features the
    study characterised (others are labelled "feature"); ``decoder_tokens(layer, feature)`` gives the promoted
    tokens of any other feature (optional)."""
    features = features or {}
    normalized = normalize_rows(graph.adjacency)
    weights = logit_weights(graph)
    influence = propagate(normalized, weights)
    # the slider's rank: cumulative share among features and error nodes (tokens and the logit are always shown, and
    # in a graph without error nodes tokens carry most of the influence, which would hide every feature)
    inner_influence = influence[:graph.token_start]
    ordered, order = inner_influence.sort(descending=True)
    cumulative = torch.ones_like(influence)
    cumulative[order] = ordered.cumsum(0) / ordered.sum().clamp(min=1e-12)
    inner = torch.arange(graph.token_start)
    inner = inner[influence[inner] > 0]
    inner = inner[influence[inner].argsort(descending=True)][:max_nodes]
    keep = sorted(inner.tolist()) + list(range(graph.token_start, graph.n_nodes))
    ids = graph.state.input_ids.tolist()
    nodes, index_of = [], {}
    for index in keep:
        record = _node(graph, index, ids, tokenizer, features, decoder_tokens)
        record.update(id=len(nodes), influence=float(influence[index]), rank=float(cumulative[index]))
        index_of[index] = len(nodes)
        nodes.append(record)
    kept = torch.tensor(keep)
    block = graph.adjacency[kept][:, kept]
    scores = normalize_rows(block) * (influence[kept] + weights[kept])[:, None]
    targets, sources = scores.nonzero(as_tuple=True)
    strongest = scores[targets, sources].argsort(descending=True)[:max_edges]
    edges = [{"source": int(sources[i]), "target": int(targets[i]), "weight": float(block[targets[i], sources[i]])}
             for i in strongest.tolist()]
    return {"nodes": nodes, "edges": edges, "n_layers": graph.n_layers,
            "tokens": [tokenizer.decode([t]) for t in ids], "mode": graph.state.mode,
            "target": tokenizer.decode([graph.target_token]), "probability": graph.probability,
            "logit": graph.logit_value, "n_active_features": graph.n_active_features,
            "error_meaning": ERROR_MEANING[graph.state.mode]}


def _node(graph: AttributionGraph, index: int, ids, tokenizer, features: dict, decoder_tokens) -> dict:
    if index < graph.n_features:
        layer, pos, feature = graph.state.features[index].tolist()
        known = features.get(f"{layer}/{feature}", {})
        promoted = known.get("decoder_top_tokens")
        if promoted is None and decoder_tokens is not None:
            promoted = decoder_tokens(layer, feature)
        return {"kind": known.get("group", "feature"), "layer": layer, "pos": pos,
                "label": f"L{layer} #{feature}", "activation": float(graph.state.activations[index]),
                "mechanism": known.get("mechanism"), "contexts": known.get("contexts", []),
                "promotes": promoted or []}
    if index < graph.token_start:
        layer, pos = divmod(index - graph.error_start, graph.n_pos)
        return {"kind": "error", "layer": layer, "pos": pos, "label": f"error L{layer} @{pos}",
                "norm": float(graph.state.errors[layer, pos].norm())}
    if index < graph.logit_index:
        pos = index - graph.token_start
        return {"kind": "token", "layer": -1, "pos": pos, "label": tokenizer.decode([ids[pos]])}
    return {"kind": "logit", "layer": graph.n_layers, "pos": graph.n_pos - 1,
            "label": f"logit {tokenizer.decode([graph.target_token])!r}"}


def write_graph_page(data: dict, path: str | Path, title: str) -> Path:
    """Write the page (atomically; relative paths from the repository root)."""
    path = resolve(path)
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    page = (PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)
            .replace("__NODES__", str(len(data["nodes"]))).replace("__EDGES__", str(len(data["edges"]))))
    atomic_write_text(path, page)
    return path


PAGE = r"""<!DOCTYPE html>
<!-- Written by tdlib (tdlib/attribution/graph_page.py); self-contained: no external script, style or font. -->
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:13px system-ui,sans-serif;margin:0;color:#222}
header{padding:8px 14px;border-bottom:1px solid #ddd;display:flex;gap:18px;align-items:center;flex-wrap:wrap}
header h1{font-size:15px;margin:0}
#wrap{display:flex;height:calc(100vh - 58px)}
#canvas{flex:1;overflow:auto}
#side{width:340px;border-left:1px solid #ddd;padding:8px 12px;overflow:auto}
#tip{position:fixed;pointer-events:none;background:#fff;border:1px solid #999;padding:6px 8px;max-width:380px;
display:none;box-shadow:0 2px 6px #0003;font-size:12px;z-index:5}
.legend span{margin-right:10px;white-space:nowrap}
.ctx{font-family:monospace;font-size:11px;background:#f6f6f6;margin:2px 0;padding:2px 4px;white-space:pre-wrap}
.ctx b{background:#fd8}
table{border-collapse:collapse}td{padding:1px 6px;border-bottom:1px solid #eee}
</style></head>
<body data-nodes="__NODES__" data-edges="__EDGES__">
<header><h1>__TITLE__</h1>
<label>node threshold <input id="threshold" type="range" min="0.05" max="1" step="0.01" value="0.8">
<span id="tval">0.80</span></label>
<span id="counts"></span>
<span class="legend" id="legend"></span></header>
<div id="wrap"><div id="canvas"><svg id="svg" xmlns="http://www.w3.org/2000/svg"></svg></div>
<div id="side"><p>Hover a node for what it is; click it for its edges. The slider keeps the features and error nodes
that carry that cumulative share of their influence on the logit (the logit and the tokens feeding what is shown
always stay);
columns are the prompt positions that hold a shown node.</p><div id="detail"></div></div></div>
<div id="tip"></div>
<script id="graph-data" type="application/json">__DATA__</script>
<script>
"use strict";
const G = JSON.parse(document.getElementById("graph-data").textContent);
const STYLE = {output:["#C44E52","circle","output feature (promotes the word)"],
  template:["#4C72B0","circle","template feature (acts through features)"],
  suppressor:["#8172B2","circle","suppressor feature"], feature:["#55A868","circle","other feature"],
  error:["#8C8C8C","square","error node"], token:["#333333","diamond","token"], logit:["#DD8452","star","logit"]};
const NS = "http://www.w3.org/2000/svg";
const svg = document.getElementById("svg"), tip = document.getElementById("tip");
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));
document.getElementById("legend").innerHTML = Object.entries(STYLE).map(([k,[c,,t]]) =>
  `<span><svg width="10" height="10"><rect width="10" height="10" fill="${c}"/></svg> ${t}</span>`).join("");
let selected = null;
function visibleNodes(threshold) {
  // features and error nodes within the threshold, the logit, and the tokens that feed any of them
  const inner = G.nodes.filter(n => n.kind === "logit" || (n.kind !== "token" && n.rank <= threshold));
  const ids = new Set(inner.map(n => n.id));
  const fed = new Set(G.edges.filter(e => ids.has(e.target)).map(e => e.source));
  return G.nodes.filter(n => ids.has(n.id) || (n.kind === "token" && fed.has(n.id)));
}
function layout(nodes) {
  // a column per prompt position that holds a shown node, wide enough for its most crowded (layer, kind) cell
  const used = [...new Set(nodes.map(n => n.pos))].sort((a, b) => a - b);
  const rows = G.n_layers + 2, top = 30;
  const rowHeight = Math.max(22, Math.min(40, 640 / rows)), perColumn = Math.max(1, Math.floor((rowHeight - 8) / 6));
  const cellOf = n => n.pos + ":" + n.layer + ":" + (n.kind === "error" ? 1 : 0);
  const crowd = new Map();
  for (const n of nodes) crowd.set(cellOf(n), (crowd.get(cellOf(n)) || 0) + 1);
  const slots = new Map(used.map(p => [p, 1]));
  for (const [key, count] of crowd) { const p = +key.split(":")[0]; slots.set(p, Math.max(slots.get(p), Math.ceil(count / perColumn))); }
  const room = (document.getElementById("canvas").clientWidth || 1000) - 90;
  const totalSlots = used.reduce((a, p) => a + slots.get(p), 0) + used.length;
  const unit = Math.max(6, Math.min(16, room / Math.max(1, totalSlots)));
  const start = new Map(); let x0 = 40;
  for (const p of used) { start.set(p, x0); x0 += (slots.get(p) + 1) * unit + 6; }
  const placed = new Map(), pos = new Map();
  for (const n of nodes) {
    const key = cellOf(n), k = placed.get(key) || 0; placed.set(key, k + 1);
    const row = rows - 1 - (n.layer + 1);
    const x = start.get(n.pos) + (n.kind === "error" ? slots.get(n.pos) * unit : Math.floor(k / perColumn) * unit) + 4;
    const y = top + row * rowHeight + 6 + 6 * (k % perColumn);
    pos.set(n.id, [x, y]);
  }
  return {pos, used, start, width: x0 + 40, height: top + rows * rowHeight + 90, rowHeight, top, rows};
}
function shape(n, x, y) {
  const [color, kind] = STYLE[n.kind] || STYLE.feature;
  let el;
  if (kind === "square") { el = document.createElementNS(NS, "rect"); el.setAttribute("x", x - 4); el.setAttribute("y", y - 4);
    el.setAttribute("width", 8); el.setAttribute("height", 8); }
  else if (kind === "diamond") { el = document.createElementNS(NS, "polygon");
    el.setAttribute("points", `${x},${y-5} ${x+5},${y} ${x},${y+5} ${x-5},${y}`); }
  else if (kind === "star") { el = document.createElementNS(NS, "polygon");
    el.setAttribute("points", [0,1,2,3,4,5,6,7,8,9].map(i => { const r = i % 2 ? 3 : 8, a = Math.PI * i / 5 - Math.PI / 2;
      return `${x + r * Math.cos(a)},${y + r * Math.sin(a)}`; }).join(" ")); }
  else { el = document.createElementNS(NS, "circle"); el.setAttribute("cx", x); el.setAttribute("cy", y); el.setAttribute("r", 3); }
  el.setAttribute("fill", color); el.setAttribute("class", "node"); el.dataset.id = n.id;
  return el;
}
function describe(n) {
  let s = `<b>${esc(n.label)}</b> (${esc(n.kind)}${n.mechanism ? ", " + esc(n.mechanism) : ""})<br>position ${n.pos} ` +
    `"${esc(G.tokens[n.pos])}", influence ${n.influence.toFixed(4)}`;
  if (n.activation !== undefined) s += `, activation ${n.activation.toFixed(3)}`;
  if (n.kind === "error") s += `<br>holds ${esc(G.error_meaning)} (norm ${n.norm.toFixed(3)})`;
  if (n.promotes && n.promotes.length) s += `<br>decoder promotes: ${n.promotes.map(t => "<code>" + esc(JSON.stringify(t)) + "</code>").join(" ")}`;
  if (n.contexts && n.contexts.length) s += "<br>strongest contexts:" + n.contexts.map(c =>
    `<div class="ctx">${esc(c.before)}<b>${esc(c.token)}</b>${esc(c.after)} (${c.activation.toFixed(2)})</div>`).join("");
  return s;
}
function draw() {
  const threshold = +document.getElementById("threshold").value;
  document.getElementById("tval").textContent = threshold.toFixed(2);
  const nodes = visibleNodes(threshold), shown = new Set(nodes.map(n => n.id));
  const edges = G.edges.filter(e => shown.has(e.source) && shown.has(e.target));
  const L = layout(nodes);
  svg.innerHTML = ""; svg.setAttribute("width", L.width); svg.setAttribute("height", L.height);
  for (let r = 0; r < L.rows; r++) {
    const t = document.createElementNS(NS, "text"); t.setAttribute("x", 2); t.setAttribute("y", L.top + r * L.rowHeight + 12);
    const layer = L.rows - 2 - r; t.textContent = layer === -1 ? "tok" : layer === G.n_layers ? "logit" : "L" + layer;
    t.setAttribute("font-size", "10"); t.setAttribute("fill", "#888"); svg.appendChild(t);
  }
  for (const p of L.used) {
    const t = document.createElementNS(NS, "text"), x = L.start.get(p) + 4, y = L.top + L.rows * L.rowHeight + 6;
    t.setAttribute("transform", `translate(${x},${y}) rotate(60)`); t.setAttribute("font-size", "10");
    t.textContent = G.tokens[p].replace(/\n/g, "\\n").slice(0, 14); svg.appendChild(t);
  }
  const maxW = Math.max(1e-12, ...edges.map(e => Math.abs(e.weight)));
  const lines = document.createElementNS(NS, "g"); svg.appendChild(lines);
  let drawnEdges = 0;
  for (const e of edges) {
    const [x1, y1] = L.pos.get(e.source), [x2, y2] = L.pos.get(e.target);
    const line = document.createElementNS(NS, "line");
    line.setAttribute("x1", x1); line.setAttribute("y1", y1); line.setAttribute("x2", x2); line.setAttribute("y2", y2);
    const on = selected === null || e.source === selected || e.target === selected;
    line.setAttribute("stroke", e.weight > 0 ? "#4C72B0" : "#C44E52");
    line.setAttribute("stroke-width", 0.3 + 3 * Math.abs(e.weight) / maxW);
    line.setAttribute("stroke-opacity", on ? (selected === null ? 0.35 : 0.9) : 0.04);
    line.setAttribute("class", "edge"); lines.appendChild(line); drawnEdges++;
  }
  for (const n of nodes) {
    const [x, y] = L.pos.get(n.id), el = shape(n, x, y);
    if (selected !== null && n.id === selected) { el.setAttribute("stroke", "#000"); el.setAttribute("stroke-width", 2); }
    el.addEventListener("mousemove", ev => { tip.innerHTML = describe(n); tip.style.display = "block";
      tip.style.left = Math.min(ev.clientX + 14, innerWidth - 400) + "px"; tip.style.top = (ev.clientY + 10) + "px"; });
    el.addEventListener("mouseleave", () => { tip.style.display = "none"; });
    el.addEventListener("click", () => { selected = selected === n.id ? null : n.id; draw(); detail(n, edges); });
    svg.appendChild(el);
  }
  document.getElementById("counts").textContent = `${nodes.length} nodes, ${drawnEdges} edges shown ` +
    `(mode ${G.mode}; "${G.target}" p=${G.probability.toFixed(3)}; ${G.n_active_features} active features)`;
  document.body.dataset.drawnNodes = nodes.length; document.body.dataset.drawnEdges = drawnEdges;
}
function detail(n, edges) {
  const byId = new Map(G.nodes.map(m => [m.id, m]));
  const rows = (list, other) => list.sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 15).map(e =>
    `<tr><td>${esc(byId.get(e[other]).label)}</td><td>${e.weight.toFixed(4)}</td></tr>`).join("");
  document.getElementById("detail").innerHTML = selected === null ? "" : describe(n) +
    `<h4>incoming edges</h4><table>${rows(edges.filter(e => e.target === n.id), "source")}</table>` +
    `<h4>outgoing edges</h4><table>${rows(edges.filter(e => e.source === n.id), "target")}</table>`;
}
document.getElementById("threshold").addEventListener("input", draw);
draw();
const canvas = document.getElementById("canvas");
canvas.scrollLeft = canvas.scrollWidth;  // the logit sits at the last position
document.body.dataset.ready = "1";
</script></body></html>
"""


def write_study_page(graph: AttributionGraph, tokenizer, study: dict, path: str | Path, title: str) -> Path:
    """``write_graph_page`` for a hesitation study's example graph: its selected features labelled with their
    study entries and top contexts."""
    keys = [f"{f['layer']}/{f['feature']}" for f in study["features"]]
    features = {key: {**f, "contexts": study["contexts"].get(key, [])} for key, f in zip(keys, study["features"])}
    return write_graph_page(graph_page_data(graph, tokenizer, features), path, title)
