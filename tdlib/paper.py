"""Build the reproduction write-up (``paper/README.md``) from ``results/*.json``, ``figures/`` and the original
paper's reported values (``paper/paper_values.json``), so no number is typed by hand.

Template syntax (``paper/template.md``):

* ``{{01_train/analysis_model}}`` -- a value by path: results file stem (or ``paper`` for the paper's values),
  then keys separated by ``/`` (keys may contain dots, e.g. ``adapter_l1_0.001``). A format spec may follow a
  colon: ``{{00_pair/target/accuracy:.1%}}``. A key in brackets is looked up first:
  ``{{02_faithfulness/models/[01_train/analysis_model]/kl:.3f}}``.
* ``{{#rows 01_train/models kind=adapter}} ... {{/rows}}`` -- the block once per entry of a mapping (optionally
  only entries whose field equals a value); inside, ``{{.name}}`` is the entry's key and ``{{./l0:.2f}}`` a
  field of the entry (``{{.value:.2f}}`` the entry itself, for a mapping of numbers). An empty or missing mapping renders one line saying it was not run yet.
* ``{{figure:02_subset_kl|caption}}`` -- the figure ``figures/02_subset_kl.png`` if it exists.

A value whose file or key is missing renders as ``*not run yet*``; strings render as code spans (so names such
as ``adapter_l1_0.001`` are never read as numbers); numbers without a spec use ``DEFAULT_FLOAT_FORMAT``.
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .results import COMMITTED_OUTPUTS, REPO_ROOT, atomic_write_text

NOT_RUN = "*not run yet*"
NOT_APPLICABLE = "–"  # the results file has the key, with no value (e.g. the L0 of a model without features)
PAPER_STEM = "paper"
DEFAULT_FLOAT_FORMAT = ".3g"
PLACEHOLDER = re.compile(r"\{\{(?!#rows|/rows)(.+?)\}\}")
ROWS = re.compile(r"\{\{#rows ([^\s}]+)(?: (\w+)=([^\s}]+))?\}\}(.*?)\{\{/rows\}\}", re.S)
NUMBER = re.compile(r"(?<![\w.\-])-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?%?(?!\.?\w)")
"""A number standing alone in the text (not part of a name such as Qwen2.5 or L0)."""


PAPER_VALUES = REPO_ROOT / "paper" / "paper_values.json"
"""The paper's reported values: the one place the package reads them from (figures, results files, defaults)."""


@functools.lru_cache(maxsize=1)
def reported() -> dict:
    """``paper/paper_values.json`` (setup, L0 sweep, attribution, ablation, ...), as written there."""
    return json.loads(PAPER_VALUES.read_text())


def hesitation_reference() -> dict:
    """The paper's hesitation numbers as notebook 06's results file records them beside ours: "wait" per 1,000
    response tokens and mean response length in tokens."""
    ablation = reported()["ablation"]
    wait, length = ablation["wait_per_1k_tokens"], ablation["mean_response_tokens"]
    sufficiency = ablation["sufficiency_wait_per_1k_tokens"]
    return {"adapter_wait_per_1k": wait["adapter"], "ablated_output_wait_per_1k": wait["output_features_removed"],
            "ablated_both_wait_per_1k": wait["both_groups_removed"], "adapter_response_tokens": length["adapter"],
            "ablated_response_tokens": length["ablated"], "hybrid_plus_template_wait_per_1k": sufficiency["template_only"],
            "hybrid_plus_output_wait_per_1k": sufficiency["output_only"], "hybrid_plus_both_wait_per_1k": sufficiency["both"]}


def hesitation_share() -> float:
    """The share of all adapter features the paper's hesitation study selects (5,623 of 229,376: 2.45%)."""
    return reported()["attribution"]["hesitation_share"]


class Missing(Exception):
    """A placeholder's results file or key does not exist (yet)."""


@dataclass
class Sources:
    """Everything a template may read: results files by stem, the paper's values, the figures folder."""

    results: dict[str, dict]
    figures_dir: Path
    figures_link: str
    """How the built markdown links the figures folder (relative to the output file)."""


def read_results_folder(folder: Path) -> dict[str, dict]:
    """``{stem: contents}`` of a folder's ``NN_name.json`` files (empty when the folder does not exist)."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(Path(folder).glob("*.json"))}


def load_sources(results_dir: str | Path, paper_values: str | Path, figures_dir: str | Path,
                 out: str | Path, comparisons: dict[str, str | Path] | None = None) -> Sources:
    """``comparisons``: other configurations' results folders by name; ``{{name/01_train/...}}`` reads them (a
    missing folder renders as *not run yet*, like a missing file)."""
    results_dir, figures_dir, out = Path(results_dir), Path(figures_dir), Path(out)
    results = read_results_folder(results_dir)
    for name in [PAPER_STEM, *(comparisons or {})]:
        if name in results:
            raise ValueError(f"{results_dir}/{name}.json would shadow the {name!r} values; rename it")
    for name, folder in (comparisons or {}).items():
        if name in (PAPER_STEM, ".") or "/" in name:
            raise ValueError(f"comparison name {name!r} is reserved or has a '/'; choose a plain name such as "
                             "'smollm2'")
        found = read_results_folder(folder)
        if found:
            results[name] = found
    results[PAPER_STEM] = json.loads(Path(paper_values).read_text())
    link = os.path.relpath(figures_dir.resolve(), out.resolve().parent)
    return Sources(results, figures_dir, link)


def _lookup(root, keys: list[str], sources: Sources):
    value = root
    for key in keys:
        if key.startswith("[") and key.endswith("]"):
            key = str(resolve_path(key[1:-1], sources))
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            raise Missing(key)
    return value


def _split_path(path: str) -> list[str]:
    """Split on ``/`` outside brackets."""
    parts, depth, current = [], 0, ""
    for char in path:
        depth += char == "["
        depth -= char == "]"
        if char == "/" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def resolve_path(path: str, sources: Sources, item: tuple[str, object] | None = None):
    """The value at ``stem/key/...`` (or ``./key`` relative to the current rows item)."""
    parts = _split_path(path)
    if parts[0] == ".":
        if item is None:
            raise ValueError(f"{{{{{path}}}}} is relative but not inside a {{{{#rows}}}} block")
        return _lookup(item[1], parts[1:], sources)
    if parts[0] not in sources.results:
        raise Missing(parts[0])
    return _lookup(sources.results[parts[0]], parts[1:], sources)


def format_value(value, spec: str | None) -> str:
    """Numbers with ``spec`` (or the default), strings as code spans, null as a dash (missing keys never get
    here: they render as *not run yet*)."""
    if value is None:
        return NOT_APPLICABLE
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if spec:
            return format(value, spec)
        return str(value) if isinstance(value, int) else format(value, DEFAULT_FLOAT_FORMAT)
    if isinstance(value, str):
        return f"`{value}`"
    raise ValueError(f"cannot render a {type(value).__name__} inline; point the placeholder at a number or string")


def _render_placeholder(body: str, sources: Sources, item=None) -> str:
    if body.startswith("figure:"):
        name, _, caption = body[len("figure:"):].partition("|")
        if not (sources.figures_dir / f"{name}.png").exists():
            return f"*figure {name} not made yet*"
        return f"![{caption or name}]({sources.figures_link}/{name}.png)"
    if body == ".name" or body.startswith(".value"):
        if item is None:
            raise ValueError(f"{{{{{body}}}}} is only meaningful inside a {{{{#rows}}}} block")
        if body == ".name":
            return f"`{item[0]}`"
        return format_value(item[1], body.partition(":")[2] or None)
    path, _, spec = body.partition(":")
    try:
        return format_value(resolve_path(path.strip(), sources, item), spec or None)
    except Missing:
        return NOT_RUN


def _has_number(value) -> bool:
    """Rows are entries holding numbers or verdicts (booleans, e.g. a checks mapping); text entries (e.g. a
    ``notes`` mapping) are not rows."""
    if isinstance(value, dict):
        return any(_has_number(v) for v in value.values())
    return isinstance(value, (int, float))


def _render_rows(match: re.Match, sources: Sources) -> str:
    path, field, wanted, block = match.groups()
    try:
        mapping = resolve_path(path, sources)
    except Missing:
        mapping = None
    items = [(k, v) for k, v in mapping.items() if _has_number(v)] if isinstance(mapping, dict) else []
    if field:
        items = [(k, v) for k, v in items if isinstance(v, dict) and str(v.get(field)) == wanted]
    if not items:
        columns = block.strip().count("|") - 1
        cells = " | ".join([NOT_RUN] + [""] * max(columns - 1, 0))
        return f"| {cells} |\n" if block.strip().startswith("|") else NOT_RUN + "\n"
    out = []
    for item in items:
        out.append(PLACEHOLDER.sub(lambda m: _render_placeholder(m.group(1), sources, item), block.strip("\n")))
    return "\n".join(out) + "\n"


GENERATED = "<!-- Generated by `make paper` (tdlib/paper.py) from paper/template.md and the results files; do not edit. -->\n"


def render(template: str, sources: Sources) -> str:
    """The template with every block and placeholder filled from ``sources`` (template comments dropped)."""
    template = GENERATED + re.sub(r"<!--.*?-->\n?", "", template, flags=re.S)
    text = ROWS.sub(lambda m: _render_rows(m, sources), template)
    return PLACEHOLDER.sub(lambda m: _render_placeholder(m.group(1), sources), text)


COMPARISONS = {"smollm2": COMMITTED_OUTPUTS["smollm2"][0], "paper_l0": "results/paper_l0/results",
               "smollm2_paper_l0": "results/smollm2/paper_l0/results", "diagnostics": "results/diagnostics"}
"""The configurations the write-up sets beside the organism: SmolLM2-135M, a real pretrained model
(``make figures CONFIG=smollm2``; its results and figures are committed under ``results/smollm2``, ``figures/smollm2``),
and, for both pairs, notebooks 05 and 06 rerun on the adapter nearest the paper's L0 (``make paper-l0``); plus the
diagnostics scripts write (``results/diagnostics``: ``scripts/diagnose_frozen_parts.py``)."""


def _from_root(path: str | Path) -> Path:
    return Path(path) if Path(path).is_absolute() else REPO_ROOT / path


def build(results_dir: str | Path = "results", out: str | Path = "paper/README.md",
          template: str | Path = "paper/template.md", paper_values: str | Path = "paper/paper_values.json",
          figures_dir: str | Path = "figures", comparisons: dict[str, str | Path] | None = None) -> Path:
    """Render ``template`` to ``out`` (atomically); relative paths are taken from the repository root.
    ``comparisons``: ``{name: results folder}`` read as ``{{name/...}}`` (None: ``COMPARISONS``; ``{}``: none)."""
    results_dir, out, template, paper_values, figures_dir = map(
        _from_root, (results_dir, out, template, paper_values, figures_dir))
    if not template.exists():
        raise FileNotFoundError(f"no template at {template}")
    comparisons = COMPARISONS if comparisons is None else comparisons
    sources = load_sources(results_dir, paper_values, figures_dir, out,
                           {name: _from_root(folder) for name, folder in comparisons.items()})
    atomic_write_text(out, render(template.read_text(), sources))
    return out


# ------------------------------------------------------------------------------------------ provenance

def format_specs(template: str) -> set[str]:
    """Every format spec the template uses (plus the defaults)."""
    specs = {spec for body in PLACEHOLDER.findall(template) for spec in [body.partition(":")[2]] if spec}
    return specs | {DEFAULT_FLOAT_FORMAT, "d"}


def numeric_values(tree) -> list[float | int]:
    """Every number anywhere in a JSON tree."""
    if isinstance(tree, bool):
        return []
    if isinstance(tree, (int, float)):
        return [tree]
    if isinstance(tree, dict):
        return [v for value in tree.values() for v in numeric_values(value)]
    if isinstance(tree, list):
        return [v for value in tree for v in numeric_values(value)]
    return []


def prose_numbers(markdown: str) -> list[str]:
    """Numbers in the markdown's text: code spans, link targets and HTML comments left out."""
    text = re.sub(r"<!--.*?-->", "", markdown, flags=re.S)
    text = re.sub(r"`[^`]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return NUMBER.findall(text)


def untraced_numbers(markdown: str, sources_values: list, specs: set[str]) -> list[str]:
    """Numbers in ``markdown`` that no value of ``sources_values`` formats to under any of ``specs``."""
    rendered = set()
    for value in sources_values:
        rendered.add(str(value))
        for spec in specs:
            try:
                rendered.add(format(value, spec))
            except (ValueError, TypeError):
                pass
    return [number for number in prose_numbers(markdown) if number not in rendered]
