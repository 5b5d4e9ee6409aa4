"""A static, self-contained HTML feature browser (no server): one card per scored unit with its explanation,
detection scores, category, frequency, direct logit effects and contexts with highlighted tokens.

Token highlighting: background opacity = activation / the unit's largest kept activation; the selected token
of each context is underlined; hovering shows the activation. A small inline script adds a filter box and sets
``data-ready`` on <body> (the headless-browser check, scripts/check_feature_page.py, looks for it).
"""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
import torch

from ..models import anatomy, unwrap
from ..results import atomic_write_text, resolve
from .cache import ActivationCache, Example

CATEGORY_COLORS = {"reasoning": "#C44E52", "domain": "#4C72B0", "language": "#55A868",
                   "uninterpretable": "#999999", None: "#999999"}


@torch.no_grad()
def logit_effects(model, table: pd.DataFrame, vocab: list[str], k: int = 3) -> dict[str, dict]:
    """Direct effect of each unit's output direction on the logits (through the final norm's scale and the
    unembedding): the ``k`` most promoted and most suppressed tokens, {name: {"up": [[tok, v]], "down": ...}};
    tokens that decode to nothing readable (partial bytes) are skipped. Adapter features use their decoder
    column, neurons the target's down_proj column."""
    inner = unwrap(model)
    unembed = inner.get_output_embeddings().weight.float()
    norm = getattr(getattr(inner, "model", inner), "norm", None)
    scale = norm.weight.float() if norm is not None and getattr(norm, "weight", None) is not None else 1.0
    unreadable = torch.tensor(["\ufffd" in t or not t for t in vocab[:unembed.shape[0]]]
                              + [True] * max(0, unembed.shape[0] - len(vocab)))
    effects = {}
    for row in table.itertuples():
        mlp = anatomy(model).mlp(row.layer)
        if row.kind == "adapter":
            direction = mlp.adapter.W_dec[:, row.unit]
        else:
            direction = getattr(mlp, "target_mlp", mlp).down_proj.weight[:, row.unit]
        logits = unembed @ (scale * direction.float())
        top = logits.masked_fill(unreadable, -torch.inf).topk(k)
        bottom = (-logits).masked_fill(unreadable, -torch.inf).topk(k)
        effects[row.name] = {
            "up": [[vocab[i], round(float(v), 3)] for v, i in zip(top.values, top.indices.tolist())],
            "down": [[vocab[i], round(-float(v), 3)] for v, i in zip(bottom.values, bottom.indices.tolist())]}
    return effects


def _tokens_html(cache: ActivationCache, example: Example, peak: float) -> str:
    parts = []
    for i, (token, act) in enumerate(zip(cache.strings(example.tokens), example.acts)):
        text = html.escape(token).replace(" ", "&nbsp;") or "∅"
        alpha = max(0.0, min(1.0, act / peak)) if peak > 0 else 0.0
        if i == example.center:
            parts.append(f'<b style="--a:{alpha:.2f}" title="{act:.3f}">{text}</b>')
        elif alpha > 0:
            parts.append(f'<i style="--a:{alpha:.2f}" title="{act:.3f}">{text}</i>')
        else:
            parts.append(text)
    return "".join(parts)


def _score(value: float) -> str:
    return "–" if value != value else f"{value:.2f}"


def _card(row, cache: ActivationCache, effects: dict | None, n_top: int, n_uniform: int) -> str:
    top = cache.examples(row.kind, row.layer, row.unit, "top")
    uniform = cache.examples(row.kind, row.layer, row.unit, "uniform")
    peak = max((e.max_act for e in top), default=0.0)
    contexts = "".join(f'<div class="ctx top">{_tokens_html(cache, e, peak)}</div>' for e in top[:n_top])
    contexts += "".join(f'<div class="ctx uni">{_tokens_html(cache, e, peak)}</div>' for e in uniform[:n_uniform])
    category = getattr(row, "category", None)
    color = CATEGORY_COLORS.get(category, "#999999")
    effect_html = ""
    if effects and row.name in effects:
        fmt = lambda pairs: " ".join(f"<code>{html.escape(t)}</code>&nbsp;{v:+.2f}" for t, v in pairs)  # noqa: E731
        effect_html = (f'<div class="logits">promotes {fmt(effects[row.name]["up"])} · suppresses '
                       f'{fmt(effects[row.name]["down"])}</div>')
    explanation = html.escape(str(row.explanation).split(" | patterns:")[0]) if row.explanation else "(none)"
    return (f'<div class="feature" data-kind="{row.kind}" data-category="{category or ""}">'
            f'<div class="head"><span class="name">{html.escape(row.name)}</span>'
            f'<span class="badge" style="background:{color}">{category or "unclassified"}</span>'
            f'<span>detection top {_score(row.detection_top)} · uniform {_score(row.detection_uniform)}</span>'
            f'<span>fires on {100 * row.frequency:.1f}% of tokens</span></div>'
            f'<div class="expl">{explanation}</div>{effect_html}{contexts}</div>')


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1100px}
h1{font-size:1.3em} .summary{color:#555;margin-bottom:1em}
.feature{border:1px solid #ddd;border-radius:6px;padding:.5em .8em;margin:.5em 0}
.head{display:flex;gap:1em;align-items:center;font-size:.9em;color:#444}
.name{font-weight:bold;font-family:monospace;color:#000}
.badge{color:#fff;border-radius:4px;padding:0 .5em}
.expl{margin:.3em 0;font-style:italic} .logits{font-size:.8em;color:#555;margin-bottom:.3em}
.ctx{font-family:monospace;font-size:.85em;white-space:nowrap;overflow:hidden;padding:1px 0}
.ctx.uni{border-left:3px solid #bbb;padding-left:4px}
.ctx.top{border-left:3px solid #e08000;padding-left:4px}
.ctx i,.ctx b{font-style:normal;background:rgba(255,140,0,var(--a))}
.ctx b{font-weight:normal;text-decoration:underline 2px}
#filter{width:30em;padding:.3em}
"""
SCRIPT = """
const box=document.getElementById('filter');
box.addEventListener('input',()=>{const q=box.value.toLowerCase();
 for(const f of document.querySelectorAll('.feature')){
  f.style.display=f.textContent.toLowerCase().includes(q)?'':'none';}});
document.body.dataset.ready=document.querySelectorAll('.feature').length;
"""


def write_feature_page(table: pd.DataFrame, cache: ActivationCache, path: str | Path, title: str,
                       effects: dict | None = None, summary: str = "", n_top: int = 3, n_uniform: int = 1,
                       max_per_layer: int | None = 50) -> Path:
    """Write the page: one card per unit of ``table`` (the scored, classified units), best detection first per
    kind. ``max_per_layer`` keeps the page small (< 2 MB): at most that many units per (kind, layer), the first
    ones of the table (the scorer's random sample order, so the page is not biased to good units)."""
    path = resolve(path)
    shown = table if max_per_layer is None else table.groupby(["kind", "layer"], sort=False).head(max_per_layer)
    if len(shown) < len(table):
        summary = summary.rstrip(". ") + "." if summary else ""
        summary += (f" Showing {len(shown)} of the {len(table)} scored units (at most {max_per_layer} per layer "
                    "and kind).")
    ordered = shown.sort_values(["kind", "detection"], ascending=[True, False], na_position="last")
    cards = "\n".join(_card(row, cache, effects, n_top, n_uniform) for row in ordered.itertuples())
    document = (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
                f'<style>{STYLE}</style></head><body data-features="{len(ordered)}">'
                f'<h1>{html.escape(title)}</h1><div class="summary">{summary}</div>'
                '<div class="summary">Orange: the unit\'s activation (opacity = share of its largest kept '
                'activation; hover for the value); underlined: the selected token. Orange bar: max-activating '
                'context; grey bar: uniformly sampled activating context.</div>'
                '<input id="filter" placeholder="filter: layer, category, token, explanation...">'
                f'\n{cards}\n<script>{SCRIPT}</script></body></html>')
    atomic_write_text(path, document)
    path.chmod(0o644)
    return path
