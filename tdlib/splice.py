"""The splice: the target model with a per-layer choice of MLP.

Every model in the paper is "the target with some layers' MLPs swapped" (docs/method.md, section 1):

    target            all layers "target"
    hybrid            all layers "base"
    adapter model     all layers "adapter"  (base MLP + transcoder adapter)
    bridges           "adapter" below/above a cut k, "target" elsewhere

``splice`` replaces each MLP of the target, in place, by a ``SplicedMLP`` holding the target's MLP, a copy of
the base's, and optionally an adapter; ``set_mlp_choice`` picks per layer. The result is still a plain
transformers model (``generate`` runs at full speed) and works inside nnsight traces.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from typing import Iterable, Mapping

from torch import nn

from .adapter import AdapterSet, TranscoderAdapter
from .models import PLACEMENTS, anatomy, check_compatible, unwrap

CHOICES = ("target", "base", "adapter")


class SplicedMLP(nn.Module):
    def __init__(self, target_mlp: nn.Module, base_mlp: nn.Module, adapter: TranscoderAdapter | None = None):
        super().__init__()
        self.target_mlp = target_mlp
        self.base_mlp = base_mlp
        self.adapter = adapter
        self.choice = "target"
        self.placement = "mlp_output"
        """"mlp_output": the adapter adds to this module's output; "residual": the block's post-MLP norm
        (wrapped in ``PostMLPNorm``) adds it after normalising (``tdlib.models.PLACEMENTS``)."""
        self._pending = None
        self._post_norm: list[nn.Module] = []  # the block's post-MLP norm under "residual" (a plain reference)

    def forward(self, x):
        # a forward cut short after this module (checkpoint recomputation stops at the last saved tensor, before
        # the post-MLP norm takes the adapter's output) must not leave that output for the next forward's norm
        self._pending = None
        if self.choice == "target":
            return self.target_mlp(x)
        if self.choice == "base":
            return self.base_mlp(x)
        if self.adapter is None:
            raise RuntimeError("this layer's MLP choice is 'adapter' but it has no adapter; attach_adapters first")
        if self.placement == "residual":
            self._pending = self.adapter(x).out
            return self.base_mlp(x)
        return self.base_mlp(x) + self.adapter(x).out

    def difference(self, x):
        """What this layer's adapter stands in for, at its placement: target_mlp(x) - base_mlp(x) under
        "mlp_output"; under "residual" the difference of the block's residual contributions,
        norm(target_mlp(x)) - norm(base_mlp(x)), with the block's post-MLP norm (the target's: a spliced model keeps
        the target's norms whatever the MLP choice, so this is exactly what the adapter must add to the hybrid)."""
        target, base = self.target_mlp(x), self.base_mlp(x)
        if self.placement == "residual":
            norm = self._post_norm[0]
            return norm(target) - norm(base)
        return target - base

    def take_pending(self):
        """The adapter output of the last forward (placement "residual"), handed over once."""
        pending, self._pending = self._pending, None
        return pending

    def extra_repr(self) -> str:
        return f"choice={self.choice!r}, placement={self.placement!r}"


class PostMLPNorm(nn.Module):
    """A block's post-MLP norm followed by the adapter's output: the adapter writes to the residual stream
    directly (placement "residual"), so its decoder columns are its features' residual writes."""

    def __init__(self, norm: nn.Module, mlp: SplicedMLP):
        super().__init__()
        self.norm = norm
        self._mlp = [mlp]  # a plain reference: the MLP stays registered once, in its block

    def forward(self, x):
        out = self.norm(x)
        pending = self._mlp[0].take_pending()
        return out if pending is None else out + pending


def spliced_mlps(model) -> list[SplicedMLP]:
    parts = anatomy(model)  # the block list and the MLP's name looked up once, not per layer (it runs per pass)
    mlps = [getattr(block, parts.mlp_name) for block in parts.layers]
    if not all(isinstance(m, SplicedMLP) for m in mlps):
        raise ValueError("this model is not spliced; call tdlib.splice.splice(target, base) first")
    return mlps


def mlp_difference(mlp: SplicedMLP, x):
    """The MLP difference at the adapter's placement (``SplicedMLP.difference``): what FVU and the local-MSE
    transcoder compare an adapter's output with."""
    return mlp.difference(x)


def is_spliced(model) -> bool:
    return isinstance(anatomy(model).mlp(0), SplicedMLP)


def splice(target, base, adapters: AdapterSet | None = None):
    """Give every layer of ``target`` (in place) the choice between its MLP, the base's MLP and base + adapter.

    ``target`` and ``base`` may be transformers models or nnsight wrappers; the base's MLPs are copied to the
    target's dtype and device, so the base model can be freed afterwards. All layers start as "target".
    """
    if is_spliced(target):
        raise ValueError("the target is already spliced; splice a fresh copy instead")
    check_compatible(base, target)
    for layer in range(anatomy(target).n_layers):
        target_mlp = anatomy(target).mlp(layer)
        reference = next(target_mlp.parameters())
        base_mlp = copy.deepcopy(anatomy(base).mlp(layer)).to(device=reference.device, dtype=reference.dtype)
        anatomy(target).set_mlp(layer, SplicedMLP(target_mlp, base_mlp))
    if adapters is not None:
        attach_adapters(target, adapters)
    return target


def attach_adapters(model, adapters: AdapterSet):
    """Put ``adapters`` into a spliced model (replacing any there); layers without an adapter get none."""
    mlps = spliced_mlps(model)
    d_model = unwrap(model).config.hidden_size
    if adapters.config.d_model != d_model:
        raise ValueError(f"adapters are {adapters.config.d_model} wide but the model's hidden size is {d_model}")
    if adapters.layers and max(adapters.layers) >= len(mlps):
        raise ValueError(f"adapters name layer {max(adapters.layers)} but the model has {len(mlps)} layers")
    reference = next(mlps[0].parameters())
    for layer, mlp in enumerate(mlps):
        adapter = adapters[layer]
        mlp.adapter = None if adapter is None else adapter.to(device=reference.device, dtype=reference.dtype)
    # adapters saved before placements were recorded were trained on the MLP output
    set_placement(model, adapters.meta.get("placement", "mlp_output"))
    return model


def set_placement(model, placement: str) -> None:
    """Where every layer's adapter adds its output (``tdlib.models.PLACEMENTS``). "residual" wraps each block's
    post-MLP norm in ``PostMLPNorm``; in a family without one the two placements are the same computation."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown adapter placement {placement!r}; use one of {PLACEMENTS}")
    mlps = spliced_mlps(model)
    norm_name = anatomy(model).post_mlp_norm_name
    for block, mlp in zip(anatomy(model).layers, mlps):
        if norm_name is not None:
            norm = getattr(block, norm_name)
            if placement == "residual" and not isinstance(norm, PostMLPNorm):
                setattr(block, norm_name, PostMLPNorm(norm, mlp))
            elif placement == "mlp_output" and isinstance(norm, PostMLPNorm):
                setattr(block, norm_name, norm.norm)
        mlp.placement = placement if norm_name is not None else "mlp_output"
        mlp._post_norm = [getattr(block, norm_name).norm] if mlp.placement == "residual" else []
        mlp._pending = None


def get_placement(model) -> str:
    """The placement the spliced model's adapters use ("mlp_output" in families without a post-MLP norm)."""
    return spliced_mlps(model)[0].placement


def write_site(model, layer: int, placement: str | None = None) -> nn.Module:
    """The module whose output a layer's adapter write is part of, at ``placement`` (default: the splice's): the
    layer's MLP module under "mlp_output", the block's post-MLP norm under "residual" (in a family with one).
    Everything that adds or removes a feature's write outside the adapter itself (steering, the attribution's
    interventions) hooks this module, so the coupling between an adapter and its block's norm lives here and in
    ``SplicedMLP``/``PostMLPNorm`` only (docs/method.md, "Where the adapter adds")."""
    placement = get_placement(model) if placement is None else placement
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown adapter placement {placement!r}; use one of {PLACEMENTS}")
    norm_name = anatomy(model).post_mlp_norm_name
    if placement == "residual" and norm_name is not None:
        return getattr(anatomy(model).layers[layer], norm_name)
    return anatomy(model).mlp(layer)


def _per_layer(choice, n_layers: int) -> list[str]:
    if isinstance(choice, str):
        choices = [choice] * n_layers
    elif isinstance(choice, Mapping):
        unknown = [k for k in choice if not 0 <= k < n_layers]
        if unknown:
            raise ValueError(f"MLP choice names layers {unknown} outside 0..{n_layers - 1}")
        choices = [choice.get(i, "target") for i in range(n_layers)]
    else:
        choices = list(choice)
        if len(choices) != n_layers:
            raise ValueError(f"MLP choice has {len(choices)} entries but the model has {n_layers} layers")
    bad = sorted({c for c in choices if c not in CHOICES})
    if bad:
        raise ValueError(f"unknown MLP choice {bad}; each layer takes one of {CHOICES}")
    return choices


def get_mlp_choice(model) -> list[str]:
    return [mlp.choice for mlp in spliced_mlps(model)]


def set_mlp_choice(model, choice: str | Iterable[str] | Mapping[int, str]) -> None:
    """``choice``: one of "target"/"base"/"adapter" for every layer, a list with one per layer, or a dict
    {layer: choice} (unnamed layers use the target's MLP)."""
    mlps = spliced_mlps(model)
    choices = _per_layer(choice, len(mlps))
    for layer, (mlp, chosen) in enumerate(zip(mlps, choices)):
        if chosen == "adapter" and mlp.adapter is None:
            raise ValueError(f"layer {layer} has no adapter; attach_adapters before choosing 'adapter'")
        mlp.choice = chosen


@contextmanager
def mlp_choice(model, choice):
    """Temporarily set the MLP choice; the previous choice is restored on exit, even after an error."""
    previous = get_mlp_choice(model)
    set_mlp_choice(model, choice)
    try:
        yield model
    finally:
        set_mlp_choice(model, previous)


def build_hybrid_copy(target, base) -> nn.Module:
    """An independent copy of ``target`` whose MLP weights are the base's (the reference hybrid for tests)."""
    check_compatible(base, target)
    hybrid = copy.deepcopy(unwrap(target))
    for layer in range(anatomy(hybrid).n_layers):
        anatomy(hybrid).mlp(layer).load_state_dict(anatomy(base).mlp(layer).state_dict())
    return hybrid


def enable_gradient_checkpointing(model) -> None:
    """Turn on transformers' (non-reentrant) gradient checkpointing for a spliced model.

    The backward pass recomputes each layer after ``mlp_choice`` has already restored the previous choice, so
    plain checkpointing would recompute with the wrong MLP. Each checkpoint here snapshots the per-layer choice
    when the layer first runs and pins it while the layer is recomputed; likewise each block's attention module,
    so a layer that ran with a reused attention output (``tdlib.residual.reuse_attention``) is recomputed with
    it too."""
    mlps = spliced_mlps(model)
    blocks = list(anatomy(model).layers)  # the blocks themselves (run_from_layer swaps stand-ins into the list)
    names = [anatomy(model).attention_name] * len(blocks)

    def attention_modules():
        return [getattr(block, name) if name else None for block, name in zip(blocks, names)]

    def install(choices, attentions):
        for mlp, chosen in zip(mlps, choices):
            mlp.choice = chosen
        for block, name, module in zip(blocks, names, attentions):
            if name and getattr(block, name) is not module:
                setattr(block, name, module)

    def context_fn():
        snapshot = [mlp.choice for mlp in mlps], attention_modules()

        @contextmanager
        def pinned():
            previous = [mlp.choice for mlp in mlps], attention_modules()
            install(*snapshot)
            try:
                yield
            finally:
                install(*previous)

        return nullcontext(), pinned()

    unwrap(model).activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn})
    unwrap(model)._tdlib_pinned_checkpointing = True  # tdlib.residual.attention_reusable reads it
