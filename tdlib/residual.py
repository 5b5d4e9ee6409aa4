"""Residual-stream plumbing shared by training and evaluation, for any transformers decoder.

* ``capture_residuals``: the embedding output and every layer's output (L + 1 tensors), via hooks.
* ``capture_features``: each adapter's feature activations during a forward pass.
* ``run_from_layer``: run the model from layer k on a given residual, reusing the model's own forward (masks,
  rotary embeddings, final norm and head) by temporarily replacing layers < k with pass-through modules, so a
  bridge costs only the layers above the cut.
* ``final_hidden``: the final-normed hidden state (the head's input) without running the head.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .models import find_layers, get_mlp, unwrap


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def capture_residuals(model):
    """Yields a list that fills with [embedding output, layer 0 output, ..., layer L-1 output]."""
    layers = find_layers(model)
    residuals: list[torch.Tensor] = []

    def before_first(module, args, kwargs):
        residuals.append(args[0] if args else kwargs["hidden_states"])

    def after(module, args, output):
        residuals.append(_hidden(output))

    handles = [layers[0].register_forward_pre_hook(before_first, with_kwargs=True)]
    handles += [layer.register_forward_hook(after) for layer in layers]
    try:
        yield residuals
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_features(model):
    """Yields a dict {layer: feature activations} filled by every spliced layer that runs its adapter."""
    features: dict[int, torch.Tensor] = {}
    handles = []
    for layer in range(len(find_layers(model))):
        adapter = getattr(get_mlp(model, layer), "adapter", None)
        if adapter is not None:
            handles.append(adapter.features.register_forward_hook(
                lambda module, args, output, layer=layer: features.__setitem__(layer, output)))
    try:
        yield features
    finally:
        for handle in handles:
            handle.remove()


class _PassThrough(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Inject(nn.Module):
    def __init__(self, residual: torch.Tensor):
        super().__init__()
        self.residual = residual

    def forward(self, hidden_states, *args, **kwargs):
        return self.residual


def final_hidden(model, input_ids, attention_mask=None) -> torch.Tensor:
    """The final-normed hidden state of a transformers CausalLM: its decoder's output, the head's input."""
    inner = unwrap(model)
    decoder = inner.get_decoder()
    if decoder is inner:
        raise ValueError(f"{type(inner).__name__}.get_decoder() returns the model itself; the final hidden state "
                         "needs a CausalLM whose decoder is a submodule")
    return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def run_from_layer(model, residual: torch.Tensor, k: int, input_ids, attention_mask=None, hidden: bool = False):
    """Logits of ``model`` when layer ``k`` receives ``residual`` as its input (``residual`` = the output of
    layer k-1, or the embedding output for k = 0, which the model recomputes itself); with ``hidden`` the final
    hidden state instead (``final_hidden``: the head is not run)."""
    layers = find_layers(model)
    if not 0 <= k <= len(layers):
        raise ValueError(f"cut k must be in 0..{len(layers)}, got {k}")
    originals = [layers[i] for i in range(k)]
    for i in range(k):
        layers[i] = _Inject(residual) if i == k - 1 else _PassThrough()
    try:
        if hidden:
            return final_hidden(model, input_ids, attention_mask)
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
