"""Ablation and steering with adapter features inside plain ``model.generate`` (docs/method.md).

Every intervention is a PyTorch forward hook installed by a context manager (removed on exit, also after an
error), so generation runs at full speed with no per-step Python loop:

* ``ablate_features``: the adapter model with chosen features set to zero (necessity). Hook on each layer's
  ``adapter.features`` identity, so everything downstream (the decoder, later layers) sees the zeros.
* ``clamp_features``: the adapter model with chosen features set to a typical active value on every token
  where they are off (activation <= 0); where a feature fires on its own its value is kept (sufficiency).
* ``add_feature_directions``: adds ``scale * acts @ W_dec[:, features].T`` to a layer's MLP output, with the
  features' activations computed by the adapter's encoder on that MLP's own input (optionally clamped as
  above). Two uses: sufficiency in the hybrid (the spliced model with MLP choice "base": adapters present but
  unused; scale +1) and transfer steering in the target itself (choice "target" or a plain model; the paper's
  negated decoder scaled by 0.5, i.e. scale -0.5). The adapter's bias ``b_dec`` is never added: only the
  chosen features' contribution.

Feature sets are ``{layer: [feature, ...]}`` (``features_by_layer``, ``features_from_attribution``; random controls
``random_features``). Notebook 06's experiment built on these hooks is ``tdlib.ablation``; the organism's
per-mechanism study, ``tdlib.organism.ablation``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Mapping

import torch

from .models import anatomy
from .splice import SplicedMLP, write_site

FeatureSet = dict[int, list[int]]


# ----------------------------------------------------------------------------------------------- feature sets
def features_by_layer(entries: Iterable) -> FeatureSet:
    """``{layer: sorted features}`` from (layer, feature) pairs or dicts with "layer" and "feature"."""
    grouped: dict[int, set[int]] = {}
    for entry in entries:
        layer, feature = (entry["layer"], entry["feature"]) if isinstance(entry, Mapping) else entry
        grouped.setdefault(int(layer), set()).add(int(feature))
    return {layer: sorted(features) for layer, features in sorted(grouped.items())}


def n_chosen(features: FeatureSet) -> int:
    return sum(len(v) for v in features.values())


def as_entries(features: FeatureSet) -> list[dict]:
    return [{"layer": layer, "feature": f} for layer, fs in sorted(features.items()) for f in fs]


def features_from_attribution(attribution: dict) -> dict[str, FeatureSet]:
    """Notebook 05's ``features`` list as {"all": every feature, <group>: that group's features}."""
    entries = attribution.get("features")
    if not entries:
        raise ValueError("05_attribution.json has no 'features' list [{layer, feature, group, influence}]; "
                         "rerun notebooks/05_attribution.ipynb")
    sets = {"all": features_by_layer(entries)}
    for group in sorted({e.get("group") for e in entries if e.get("group")}):
        sets[group] = features_by_layer(e for e in entries if e.get("group") == group)
    return sets


def chosen_adapters(model, features: FeatureSet) -> dict[int, "torch.nn.Module"]:
    """The adapters of the layers ``features`` names; clear errors for missing adapters or bad indices."""
    n_layers = anatomy(model).n_layers
    adapters = {}
    for layer, chosen in features.items():
        if not 0 <= layer < n_layers:
            raise ValueError(f"feature set names layer {layer} but the model has {n_layers} layers")
        adapter = getattr(anatomy(model).mlp(layer), "adapter", None)
        if adapter is None:
            raise ValueError(f"layer {layer} has no adapter; load an adapter run (tdlib.runs.load_named)")
        _check_indices(layer, chosen, adapter.config.n_features)
        adapters[layer] = adapter
    return adapters


def _check_indices(layer: int, chosen: list[int], n_features: int) -> None:
    bad = [f for f in chosen if not 0 <= f < n_features]
    if bad:
        raise ValueError(f"layer {layer}: features {bad[:5]} outside 0..{n_features - 1}")


# ---------------------------------------------------------------------------------------------------- hooks
@contextmanager
def _hooks(handles_factory):
    handles = []
    try:
        handles_factory(handles)
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _edit_features(model, features: FeatureSet, make_edit):
    """Within the context, each layer's adapter feature activations pass through ``make_edit(layer, chosen,
    index, adapter)``, a function of the activations (``index``: the chosen features as a tensor on the adapter's
    device); layers with no chosen feature are left alone. The edit of ``ablate_features`` and
    ``clamp_features``."""
    adapters = chosen_adapters(model, features)

    def install(handles):
        for layer, chosen in features.items():
            if not chosen:
                continue
            adapter = adapters[layer]
            edit = make_edit(layer, chosen, torch.tensor(chosen, device=adapter.W_enc.device), adapter)
            handles.append(adapter.features.register_forward_hook(
                lambda module, args, output, edit=edit: edit(output)))

    with _hooks(install):
        yield model


def ablate_features(model, features: FeatureSet):
    """Within the context, the chosen adapter features read zero on every token (the adapter model only)."""
    return _edit_features(model, features,
                          lambda layer, chosen, index, adapter: lambda acts: acts.index_fill(-1, index, 0.0))


def _values_for(layer: int, chosen: list[int], values, reference: torch.Tensor) -> torch.Tensor:
    """Per-feature clamp values for one layer: a number for all, or {layer: [value per chosen feature]}."""
    if isinstance(values, (int, float)):
        row = [float(values)] * len(chosen)
    else:
        row = values[layer]
        row = row.tolist() if isinstance(row, torch.Tensor) else list(row)
        if len(row) != len(chosen):
            raise ValueError(f"layer {layer}: {len(row)} clamp values for {len(chosen)} features")
    return torch.tensor(row, dtype=reference.dtype, device=reference.device)


def _clamp_where_off(acts: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return torch.where(acts > 0, acts, value)


def clamp_features(model, features: FeatureSet, values):
    """Within the context, each chosen feature reads ``value`` on every token where it is off (activation <= 0)
    and keeps its own activation where it fires. ``values``: one number, or {layer: [value per feature]}."""

    def clamp(layer, chosen, index, adapter):
        value = _values_for(layer, chosen, values, adapter.W_enc)
        return lambda acts: acts.index_copy(-1, index, _clamp_where_off(acts.index_select(-1, index), value))

    return _edit_features(model, features, clamp)


def feature_contribution(adapter, x: torch.Tensor, chosen: torch.Tensor, values: torch.Tensor | None = None):
    """The chosen features' decoder contribution ``acts @ W_dec[:, chosen].T`` at MLP input ``x`` (no b_dec);
    with ``values``, features that are off are clamped to them."""
    acts = torch.relu(x @ adapter.W_enc[chosen].T + adapter.b_enc[chosen])
    if values is not None:
        acts = _clamp_where_off(acts, values)
    return acts @ adapter.W_dec[:, chosen].T


def _placement(model, adapters) -> str:
    """Where the adapters add their output: recorded with them (``AdapterSet.meta``) or set in the splice."""
    if adapters is not None:
        return adapters.meta.get("placement", "mlp_output")
    return getattr(anatomy(model).mlp(0), "placement", "mlp_output")


@contextmanager
def add_feature_directions(model, features: FeatureSet, scale: float = 1.0, values=None, adapters=None):
    """Within the context, each named layer's MLP output gains ``scale`` x the chosen features' decoder
    contribution, their activations computed by the adapter encoder on that MLP's input (adapters placed on the
    residual stream, ``tdlib.models.PLACEMENTS``, add it after the block's post-MLP norm instead).

    For the hybrid (spliced model, choice "base") with scale 1 this adds the features to the base MLPs; for the
    target (choice "target", or a plain model with ``adapters`` given) scale -0.5 is the paper's transfer
    steering. ``values`` clamps off features as in ``clamp_features``. Layers running their adapter (choice
    "adapter") are refused: the features are already there; use ``clamp_features``/``ablate_features``.
    """
    modules = {}
    for layer, chosen in features.items():
        mlp = anatomy(model).mlp(layer)
        adapter = adapters[layer] if adapters is not None else getattr(mlp, "adapter", None)
        if adapter is None:
            raise ValueError(f"layer {layer} has no adapter: pass adapters= (tdlib.runs.load_adapters) for a "
                             "plain model, or use a spliced adapter run")
        if isinstance(mlp, SplicedMLP) and mlp.choice == "adapter":
            raise ValueError(f"layer {layer} runs its adapter already; add_feature_directions is for the hybrid or "
                             "the target (mlp_choice 'base' or 'target'); use clamp_features for the adapter model")
        _check_indices(layer, chosen, adapter.config.n_features)
        modules[layer] = (mlp, adapter)

    def hook(module, args, output, adapter, index, value):
        return output + scale * feature_contribution(adapter, args[0], index, value)

    placement = _placement(model, adapters)

    def install(handles):
        if scale == 0:
            return
        for layer, chosen in features.items():
            if not chosen:
                continue
            mlp, adapter = modules[layer]
            index = torch.tensor(chosen, device=adapter.W_enc.device)
            value = None if values is None else _values_for(layer, chosen, values, adapter.W_enc)
            site = write_site(model, layer, placement)
            if site is mlp:
                handles.append(mlp.register_forward_hook(
                    lambda module, args, output, adapter=adapter, index=index, value=value:
                    hook(module, args, output, adapter, index, value)))
                continue
            # placement "residual": the features write after the block's post-MLP norm, read the MLP's input
            inputs = {}
            handles.append(mlp.register_forward_pre_hook(lambda module, args, inputs=inputs:
                                                         inputs.__setitem__("x", args[0])))
            handles.append(site.register_forward_hook(
                lambda module, args, output, adapter=adapter, index=index, value=value, inputs=inputs:
                output + scale * feature_contribution(adapter, inputs.pop("x"), index, value)))

    with _hooks(install):
        yield model


def random_features(chosen: FeatureSet, n_features: int, seed: int,
                    alive: Mapping[int, torch.Tensor] | None = None) -> FeatureSet:
    """A random control: per layer, as many features as ``chosen`` has there, none of them chosen, drawn with
    ``seed``. With ``alive`` ({layer: bool mask}), drawn only from features that fire on held-out text (dead
    features would make the control trivially harmless); if a layer has too few, the rest come from dead ones."""
    generator = torch.Generator().manual_seed(seed)
    drawn = {}
    for layer, features in sorted(chosen.items()):
        taken = set(features)
        order = torch.randperm(n_features, generator=generator).tolist()
        candidates = [f for f in order if f not in taken]
        if alive is not None:
            mask = alive[layer]
            candidates = [f for f in candidates if mask[f]] + [f for f in candidates if not mask[f]]
        if len(candidates) < len(features):
            raise ValueError(f"layer {layer}: cannot draw {len(features)} random features disjoint from the "
                             f"{len(taken)} chosen among {n_features}")
        drawn[layer] = sorted(candidates[:len(features)])
    return drawn


def union(*sets: FeatureSet) -> FeatureSet:
    """The features of every set, by layer."""
    return features_by_layer((layer, f) for features in sets for layer, fs in features.items() for f in fs)
