"""Activation cache: per unit (adapter feature or target MLP neuron), streaming selections of contexts.

For every unit we keep, while held-out text streams through the model:

* ``top``: the ``top_k`` highest-activating tokens (key = activation);
* ``uniform``: a uniform sample of ``n_uniform`` activating tokens (key = a random number, bottom-k sampling);
* ``negative``: a uniform sample of ``n_negative`` tokens where the unit is not active (same trick);

A unit is *active* on a token when its activation is > 0: adapter features are ReLUs (exact zeros when
silent); target neurons act(gate(x)) * up(x) are signed, so their silent side is <= 0 and their activation
mass counts only the positive part.
* counts: tokens seen, tokens where the unit fires, summed activation, and (on the organism) the activation
  mass and firing count per trace segment (``segments.SEGMENTS``).

Every selection is a running top-k merged batch by batch, so memory is O(units x k x window) whatever the
number of tokens; only a selected token's context window (``before`` tokens, the token, ``after`` tokens)
and the unit's activations over it are kept.

On disk (``ActivationCache.save(dir)``), a folder with:

* ``cache.safetensors``: for each ``{kind}.{layer}`` (kind "adapter" or "neuron") and selection
  ``{sel}`` in top/uniform/negative:
  ``{kind}.{layer}.{sel}.key`` float32 [U, k] (selection key, -inf = empty slot),
  ``{kind}.{layer}.{sel}.tokens`` int32 [U, k, W] (context token ids, -1 outside the sequence),
  ``{kind}.{layer}.{sel}.acts`` float32 [U, k, W] (the unit's activation on each context token),
  ``{kind}.{layer}.{sel}.segment`` int8 [U, k] (segment id of the selected token, -1 when unknown);
  and per unit ``{kind}.{layer}.fires`` int64 [U], ``.act_sum`` float64 [U], ``.seg_mass`` float64 [U, S],
  ``.seg_fires`` int64 [U, S]; plus ``seg_tokens`` int64 [S] (tokens per segment). W = before + 1 + after;
  the selected token sits at position ``before``.
* ``units.parquet``: one row per unit: kind, layer, unit, frequency, mean_active, max_act, n_top, n_uniform,
  n_negative, and ``mass_<segment>`` (share of the unit's activation mass in each segment; NaN off-organism).
* ``cache.json``: the config, n_tokens, kinds, layers, segment names, the vocabulary as decoded strings
  (``vocab[id]``), and ``model`` (which model and run produced it).
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..models import anatomy
from ..residual import capture_features
from ..results import atomic_directory
from ..splice import is_spliced, mlp_choice
from .segments import SEGMENTS

SELECTIONS = ("top", "uniform", "negative")
UNIT_KINDS = ("adapter", "neuron")


@dataclass
class CacheConfig:
    """What to stream and keep."""

    n_batches: int = 16
    """Batches of held-out text streamed through the model."""
    batch_size: int = 32
    """Sequences per batch."""
    seed: int = 0
    """Seeds the held-out data stream and the random selection keys."""
    top_k: int = 20
    """Max-activating contexts kept per unit (the paper: 20)."""
    n_uniform: int = 10
    """Uniformly sampled activating contexts kept per unit (the paper: 10)."""
    n_negative: int = 20
    """Non-activating contexts kept per unit (split between explainer and scorer)."""
    before: int = 12
    """Context tokens kept before the selected token (the paper: 50; an organism sequence is < 200 tokens)."""
    after: int = 4
    """Context tokens kept after the selected token (the paper: 20)."""
    kinds: tuple = UNIT_KINDS
    """Which units to cache: "adapter" (features of the spliced adapter model), "neuron" (the target's MLP
    neurons act(gate(x)) * up(x), the inputs of down_proj)."""

    def __post_init__(self):
        self.kinds = tuple(self.kinds)
        for name in ("n_batches", "batch_size", "top_k", "n_uniform", "n_negative"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CacheConfig.{name} must be a positive integer, got {value!r}")
        if self.before < 0 or self.after < 0:
            raise ValueError("CacheConfig.before and .after must be >= 0")
        unknown = set(self.kinds) - set(UNIT_KINDS)
        if not self.kinds or unknown:
            raise ValueError(f"CacheConfig.kinds must be a non-empty subset of {UNIT_KINDS}, got {self.kinds}")

    @property
    def window(self) -> int:
        return self.before + 1 + self.after

    def size(self, selection: str) -> int:
        return {"top": self.top_k, "uniform": self.n_uniform, "negative": self.n_negative}[selection]


@dataclass
class TopContexts:
    """A running top-k of contexts per unit (see the module docstring for the fields)."""

    key: torch.Tensor
    tokens: torch.Tensor
    acts: torch.Tensor
    segment: torch.Tensor

    @classmethod
    def empty(cls, n_units: int, k: int, window: int) -> "TopContexts":
        return cls(torch.full((n_units, k), -math.inf), torch.full((n_units, k, window), -1, dtype=torch.int32),
                   torch.zeros(n_units, k, window), torch.full((n_units, k), -1, dtype=torch.int8))

    def merge(self, other: "TopContexts") -> "TopContexts":
        k = self.key.shape[1]
        key = torch.cat([self.key, other.key], 1)
        best, order = key.topk(k, dim=1)
        take = lambda a, b: torch.cat([a, b], 1).gather(  # noqa: E731
            1, order.view(*order.shape, *([1] * (a.dim() - 2))).expand(-1, -1, *a.shape[2:]))
        return TopContexts(best, take(self.tokens, other.tokens), take(self.acts, other.acts),
                         take(self.segment, other.segment))

    @property
    def counts(self) -> torch.Tensor:
        return torch.isfinite(self.key).sum(1)


@dataclass
class BatchView:
    """A batch's valid tokens flattened: ids [N], segment ids [N] (-1 unknown), context windows [N, W] as
    indices into the N tokens (-1 outside the sequence)."""

    tokens: torch.Tensor
    segments: torch.Tensor
    windows: torch.Tensor

    @classmethod
    def from_batch(cls, input_ids, attention_mask, segments, before: int, after: int) -> "BatchView":
        mask = attention_mask.bool()
        flat_index = torch.full(mask.shape, -1, dtype=torch.long)
        flat_index[mask] = torch.arange(int(mask.sum()))
        rows, cols = mask.nonzero(as_tuple=True)
        offsets = torch.arange(-before, after + 1)
        columns = cols[:, None] + offsets[None, :]
        inside = (columns >= 0) & (columns < mask.shape[1])
        windows = flat_index[rows[:, None].expand_as(columns), columns.clamp(0, mask.shape[1] - 1)]
        windows = windows.masked_fill(~inside, -1)
        segs = segments[mask] if segments is not None else torch.full((len(rows),), -1, dtype=torch.long)
        return cls(input_ids[mask], segs, windows)


@contextmanager
def _single_thread():
    """Run the cache's many small tensor operations on one thread: on a shared 2-core machine, thread
    synchronisation made them ~7x slower than serial (measured: 1.45 s vs 0.21 s per layer and batch)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class UnitStats:
    """Streaming selections and counts for the units of one (kind, layer)."""

    def __init__(self, n_units: int, config: CacheConfig, generator: torch.Generator):
        self.config = config
        self.generator = generator
        self.selections = {s: TopContexts.empty(n_units, config.size(s), config.window) for s in SELECTIONS}
        self.fires = torch.zeros(n_units, dtype=torch.long)
        self.act_sum = torch.zeros(n_units, dtype=torch.float64)
        self.seg_mass = torch.zeros(n_units, len(SEGMENTS), dtype=torch.float64)
        self.seg_fires = torch.zeros(n_units, len(SEGMENTS), dtype=torch.long)

    def update(self, acts: torch.Tensor, view: BatchView) -> None:
        """``acts``: [N, U] activations of the batch's valid tokens."""
        with _single_thread():
            acts = acts.detach().float().cpu().T.contiguous()  # [U, N]: selections run along the last dim
            active = acts > 0
            positive = acts.clamp(min=0)  # neurons are signed; a unit's "activation mass" is its positive part
            self.fires += active.sum(1)
            self.act_sum += positive.sum(1, dtype=torch.float64)
            known = view.segments >= 0
            if known.any():
                onehot = torch.nn.functional.one_hot(view.segments[known], len(SEGMENTS)).float()
                self.seg_mass += (positive[:, known] @ onehot).double()
                self.seg_fires += (active[:, known].float() @ onehot).long()
            random_key = torch.rand(acts.shape, generator=self.generator)
            keys = {"top": acts.masked_fill(~active, -math.inf),
                    "uniform": random_key.masked_fill(~active, -math.inf),
                    "negative": random_key.masked_fill_(active, -math.inf)}
            for name, key in keys.items():
                self.selections[name] = self.selections[name].merge(self._candidates(acts, key, view, name))

    def _candidates(self, acts, key, view: BatchView, name: str) -> TopContexts:
        k = min(self.config.size(name), key.shape[1])
        best, position = key.topk(k, dim=1)  # [U, k]
        windows = view.windows[position]  # [U, k, W]
        outside = windows < 0
        safe = windows.clamp(min=0)
        tokens = view.tokens[safe].to(torch.int32).masked_fill_(outside, -1)
        n_units = acts.shape[0]
        window_acts = acts.gather(1, safe.reshape(n_units, -1)).reshape(safe.shape).masked_fill_(outside, 0.0)
        segment = view.segments[position].to(torch.int8)
        return TopContexts(best, tokens, window_acts, segment)


class ActivationCache:
    """Cached contexts and counts for every cached unit; ``records[(kind, layer)]`` holds a ``UnitStats``-like
    record (selections, fires, act_sum, seg_mass, seg_fires)."""

    def __init__(self, config: CacheConfig, records: dict, n_tokens: int, seg_tokens: torch.Tensor,
                 vocab: list[str], model: dict | None = None):
        self.config = config
        self.records = records
        self.n_tokens = n_tokens
        self.seg_tokens = seg_tokens
        self.vocab = vocab
        self.model = dict(model or {})

    @property
    def units(self) -> list[tuple[str, int]]:
        return sorted(self.records, key=lambda kl: (UNIT_KINDS.index(kl[0]), kl[1]))

    def frequency(self, kind: str, layer: int) -> torch.Tensor:
        return self.records[(kind, layer)].fires.double() / max(self.n_tokens, 1)

    def mass_shares(self, kind: str, layer: int) -> torch.Tensor:
        """[U, S] share of each unit's activation mass per segment (NaN where unknown or never active)."""
        mass = self.records[(kind, layer)].seg_mass
        total = mass.sum(1, keepdim=True)
        return torch.where(total > 0, mass / total.clamp(min=1e-30), torch.full_like(mass, math.nan))

    def examples(self, kind: str, layer: int, unit: int, selection: str) -> list["Example"]:
        """The unit's kept contexts of one selection, best key first, padding trimmed."""
        sel = self.records[(kind, layer)].selections[selection]
        out = []
        for slot in range(sel.key.shape[1]):
            if not math.isfinite(sel.key[unit, slot]):
                continue
            tokens, acts = sel.tokens[unit, slot], sel.acts[unit, slot]
            keep = tokens >= 0
            first = int(keep.int().argmax())
            out.append(Example(tokens[keep].tolist(), acts[keep].tolist(), self.config.before - first,
                               int(sel.segment[unit, slot])))
        return out

    def strings(self, token_ids: list[int]) -> list[str]:
        return [self.vocab[i] for i in token_ids]

    def unit_table(self):
        import pandas as pd

        rows = []
        for kind, layer in self.units:
            record = self.records[(kind, layer)]
            frequency = self.frequency(kind, layer)
            shares = self.mass_shares(kind, layer)
            top = record.selections["top"]
            max_act = top.key[:, 0].clamp(min=0).nan_to_num(0.0, neginf=0.0)
            counts = {s: record.selections[s].counts for s in SELECTIONS}
            for unit in range(len(frequency)):
                fires = int(record.fires[unit])
                row = {"kind": kind, "layer": layer, "unit": unit, "frequency": float(frequency[unit]),
                       "mean_active": float(record.act_sum[unit] / fires) if fires else 0.0,
                       "max_act": float(max_act[unit])}
                row.update({f"n_{s}": int(counts[s][unit]) for s in SELECTIONS})
                row.update({f"mass_{name}": float(shares[unit, i]) for i, name in enumerate(SEGMENTS)})
                rows.append(row)
        return pd.DataFrame(rows)

    def save(self, directory: str | Path) -> Path:
        """Write the folder described in the module docstring; it appears only when complete."""
        directory = Path(directory)
        with atomic_directory(directory) as staging:
            tensors = {"seg_tokens": self.seg_tokens}
            for (kind, layer), record in self.records.items():
                prefix = f"{kind}.{layer}"
                for name, sel in record.selections.items():
                    for part in ("key", "tokens", "acts", "segment"):
                        tensors[f"{prefix}.{name}.{part}"] = getattr(sel, part).contiguous()
                for part in ("fires", "act_sum", "seg_mass", "seg_fires"):
                    tensors[f"{prefix}.{part}"] = getattr(record, part).contiguous()
            save_file(tensors, staging / "cache.safetensors")
            self.unit_table().to_parquet(staging / "units.parquet", index=False)
            meta = {"schema": 1, "config": asdict(self.config), "n_tokens": self.n_tokens,
                    "units": [[k, layer] for k, layer in self.units], "segments": list(SEGMENTS),
                    "vocab": self.vocab, "model": self.model}
            (staging / "cache.json").write_text(json.dumps(meta))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "ActivationCache":
        directory = Path(directory)
        if not (directory / "cache.json").exists():
            raise FileNotFoundError(f"no activation cache in {directory}; build one with "
                                    "tdlib.autointerp.build_cache (notebooks/04_autointerp.ipynb)")
        meta = json.loads((directory / "cache.json").read_text())
        tensors = load_file(directory / "cache.safetensors")
        config = CacheConfig(**meta["config"])
        records = {}
        for kind, layer in meta["units"]:
            prefix = f"{kind}.{layer}"
            record = _Record()
            record.selections = {s: TopContexts(*(tensors[f"{prefix}.{s}.{p}"] for p in
                                                ("key", "tokens", "acts", "segment"))) for s in SELECTIONS}
            for part in ("fires", "act_sum", "seg_mass", "seg_fires"):
                setattr(record, part, tensors[f"{prefix}.{part}"])
            records[(kind, layer)] = record
        return cls(config, records, meta["n_tokens"], tensors["seg_tokens"], meta["vocab"], meta.get("model"))


class _Record:
    """A loaded UnitStats (data only)."""


@dataclass
class Example:
    """One kept context: token ids, the unit's activation on each, the index of the selected token."""

    tokens: list[int]
    acts: list[float]
    center: int
    segment: int = -1

    @property
    def max_act(self) -> float:
        return max(self.acts) if self.acts else 0.0


def decoded_vocab(tokenizer) -> list[str]:
    """Each token id decoded on its own (the strings shown to explainers and on the feature page)."""
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


@contextmanager
def _capture_neurons(model):
    """{layer: act(gate(x)) * up(x)} of the target's MLPs (the input of down_proj), via forward pre-hooks."""
    neurons: dict[int, torch.Tensor] = {}
    handles = []
    for layer in range(anatomy(model).n_layers):
        mlp = anatomy(model).mlp(layer)
        mlp = getattr(mlp, "target_mlp", mlp)
        handles.append(mlp.down_proj.register_forward_pre_hook(
            lambda module, args, layer=layer: neurons.__setitem__(layer, args[0])))
    try:
        yield neurons
    finally:
        for handle in handles:
            handle.remove()


def _forward_units(model, batch, kind: str) -> dict[int, torch.Tensor]:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if kind == "adapter":
        with mlp_choice(model, "adapter"), capture_features(model) as features:
            model(input_ids=ids, attention_mask=mask)
        if not features:
            raise ValueError("the model has no adapters to cache; load an adapter run (load_named(pair, name))")
        return features
    if is_spliced(model):
        with mlp_choice(model, "target"), _capture_neurons(model) as neurons:
            model(input_ids=ids, attention_mask=mask)
    else:
        with _capture_neurons(model) as neurons:
            model(input_ids=ids, attention_mask=mask)
    return neurons


@torch.no_grad()
def build_cache(model, tokenizer, batches, config: CacheConfig, model_info: dict | None = None,
                progress: bool = True) -> ActivationCache:
    """Stream ``batches`` (an iterable of (batch dict, segment ids or None), ``stream_batches``) through ``model``
    and keep the selections of every unit of ``config.kinds``; segment ids (organism traces) label the tokens."""
    generator = torch.Generator().manual_seed(config.seed)
    stats: dict[tuple[str, int], UnitStats] = {}
    n_tokens, seg_tokens = 0, torch.zeros(len(SEGMENTS), dtype=torch.long)
    for batch, segments in tqdm(batches, total=config.n_batches, desc="activation cache", disable=not progress):
        view = BatchView.from_batch(batch["input_ids"], batch["attention_mask"], segments, config.before,
                                    config.after)
        keep = batch["attention_mask"].bool()
        n_tokens += len(view.tokens)
        known = view.segments[view.segments >= 0]
        seg_tokens += torch.bincount(known, minlength=len(SEGMENTS))
        for kind in config.kinds:
            for layer, acts in _forward_units(model, batch, kind).items():
                if (kind, layer) not in stats:
                    stats[(kind, layer)] = UnitStats(acts.shape[-1], config, generator)
                stats[(kind, layer)].update(acts[keep], view)
    if not stats:
        raise ValueError("no batches were streamed; check CacheConfig.n_batches and the data")
    return ActivationCache(config, stats, n_tokens, seg_tokens, decoded_vocab(tokenizer), model_info)


def stream_batches(data, n_batches: int):
    """``(batch, segments)`` for steps 0..n_batches-1 of a data source with ``.batch(step)`` (e.g. a pair's
    held-out traces, ``tdlib.pair_data.data_for(pair, tokenizer, "validation")``); ``segments`` are the source's
    ``segments(step, width)`` when it labels its tokens (organism traces, ``tdlib.autointerp.segments``), else
    None."""
    for step in range(n_batches):
        batch = data.batch(step)
        labels = data.segments(step, batch["input_ids"].shape[1]) if hasattr(data, "segments") else None
        yield batch, labels
