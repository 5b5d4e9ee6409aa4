"""A pair's reasoning traces: training and validation batches (``data_for``), held-out reference responses, and the
local JSONL a hub dataset is exported to once (``artifacts/data/<key>/``)."""
from __future__ import annotations

import json
from pathlib import Path

from .pair_config import HubPairConfig
from . import pairs
from .data import ReasoningTraces, read_conversations, render_trace
from .pairs import Pair
from .results import atomic_write_text


def data_for(pair: Pair, tokenizer, split: str = "train", batch_size: int | None = None, seed: int = 0):
    """Training or validation batches for ``pair``: the organism's traces (its kind's ``training_traces``), or the hub pair's reasoning traces
    (``tdlib.data.ReasoningTraces``; a hub dataset id is exported once to ``artifacts/data/<key>/<split>.jsonl``)."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    batch_size = batch_size or pair.training.run.batch_size
    if pair.kind.has_ground_truth:
        return pair.kind.hooks().training_traces(pair, tokenizer, split, batch_size, seed)
    path = trace_file(pair.hub, split)
    return ReasoningTraces(path, tokenizer, batch_size=batch_size, max_tokens=pair.training.max_tokens, seed=seed,
                           prompt_format=pair.hub.prompt_format)


def reference_responses(pair: Pair, tokenizer, limit: int | None = None) -> list[tuple[str, str]]:
    """Held-out (prompt, response) texts of the reasoning the target imitates: the organism's reference traces
    for its evaluation problems, or a hub pair's validation traces (the chat-templated conversation up to the
    last assistant turn, and that turn's text)."""
    if pair.kind.has_ground_truth:
        return pair.kind.hooks().reference_responses(pair, limit)

    references = []
    for messages in read_conversations(trace_file(pair.hub, "validation")):
        if messages[-1]["role"] != "assistant":
            continue
        references.append(render_trace(tokenizer, messages, pair.hub.prompt_format))
        if limit and len(references) >= limit:
            break
    return references


def trace_file(hub: HubPairConfig, split: str) -> Path:
    """The local JSONL of a hub pair's traces for ``split`` (exporting a hub dataset on first use)."""
    separate = bool(hub.validation_data)
    source = hub.validation_data if split == "validation" and separate else hub.train_data
    if Path(source).exists():
        return Path(source) if separate else _split_local(Path(source), hub, split)
    if source.endswith(".jsonl"):
        raise FileNotFoundError(f"{hub.name}: no reasoning-trace file at {source}; point train_data at an "
                                "OpenThoughts3-style JSONL or a hub dataset id")
    return _export_hub_dataset(source, hub, split, own_split=separate)


def _split_local(path: Path, hub: HubPairConfig, split: str) -> Path:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if len(lines) <= hub.n_validation:
        raise ValueError(f"{path} has {len(lines)} traces, not more than n_validation={hub.n_validation}; set "
                         "validation_data or a smaller n_validation")

    out = pairs.ARTIFACTS / "data" / hub.key / f"{split}.jsonl"
    kept = lines[-hub.n_validation:] if split == "validation" else lines[:-hub.n_validation]
    atomic_write_text(out, "\n".join(kept) + "\n")
    return out


def _export_hub_dataset(dataset_id: str, hub: HubPairConfig, split: str, own_split: bool) -> Path:
    """Write the dataset's ``conversations`` to JSONL (the first rows for training, the last n_validation held
    out when the config has no validation set). Needs network the first time."""
    out = pairs.ARTIFACTS / "data" / hub.key / f"{split}.jsonl"
    if out.exists():
        return out
    from datasets import load_dataset

    rows = load_dataset(dataset_id, split="train")
    if not own_split:
        n = len(rows)
        if n <= hub.n_validation:
            raise ValueError(f"{dataset_id} has {n} rows, not more than n_validation={hub.n_validation}")
        rows = rows.select(range(n - hub.n_validation, n) if split == "validation" else range(n - hub.n_validation))
    lines = [json.dumps({"conversations": row["conversations"]}) for row in rows]
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out
