"""Residual-stream plumbing shared by training and evaluation, for any transformers decoder.

* ``capture_residuals``: the embedding output and every layer's output (L + 1 tensors), via hooks.
* ``capture_features``: each adapter's feature activations during a forward pass.
* ``run_from_layer``: run the model from layer k on a given residual, reusing the model's own forward (masks,
  rotary embeddings, final norm and head) by temporarily replacing layers < k with pass-through modules, so a
  bridge costs only the layers above the cut.
* ``final_hidden``: the final-normed hidden state (the head's input) without running the head.
* ``record_attention`` / ``reuse_attention``: keep a block's attention output from one pass and hand it to a
  later pass whose block receives the same input, instead of computing it again (training's bridges).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .models import anatomy, unwrap


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def capture_residuals(model):
    """Yields a list that fills with [embedding output, layer 0 output, ..., layer L-1 output]."""
    layers = anatomy(model).layers
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
def capture_mlp_inputs(model):
    """Yields a dict {layer: the input [batch, seq, d_model] of that layer's MLP module}, filled as the model runs."""
    inputs: dict[int, torch.Tensor] = {}
    handles = [anatomy(model).mlp(layer).register_forward_pre_hook(
        lambda module, args, layer=layer: inputs.__setitem__(layer, args[0]))
        for layer in range(anatomy(model).n_layers)]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_features(model):
    """Yields a dict {layer: feature activations} filled by every spliced layer that runs its adapter."""
    features: dict[int, torch.Tensor] = {}
    handles = []
    for layer in range(anatomy(model).n_layers):
        adapter = getattr(anatomy(model).mlp(layer), "adapter", None)
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
    # use_cache=False: a KV cache is for generation; building one here only copies every layer's keys and values
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def run_from_layer(model, residual: torch.Tensor, k: int, input_ids, attention_mask=None, hidden: bool = False):
    """Logits of ``model`` when layer ``k`` receives ``residual`` as its input (``residual`` = the output of
    layer k-1, or the embedding output for k = 0, which the model recomputes itself); with ``hidden`` the final
    hidden state instead (``final_hidden``: the head is not run)."""
    layers = anatomy(model).layers
    if not 0 <= k <= len(layers):
        raise ValueError(f"cut k must be in 0..{len(layers)}, got {k}")
    originals = [layers[i] for i in range(k)]
    for i in range(k):
        layers[i] = _Inject(residual) if i == k - 1 else _PassThrough()
    try:
        if hidden:
            return final_hidden(model, input_ids, attention_mask)
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def attention_reusable(model) -> bool:
    """Whether a block's attention output depends only on the block's input, so one pass's output can stand in for
    another's on the same input, with the same gradients: every block has an attention module, no parameter of a
    block outside its MLP trains (so a recording made without grad loses no gradient), a block recomputed in the
    backward pass is recomputed with the attention module it ran with (activation checkpointing off, or on through
    ``tdlib.splice.enable_gradient_checkpointing``, which pins it), and no attention dropout is active."""
    inner = unwrap(model)
    parts = anatomy(model)
    blocks = parts.layers
    if parts.attention_name is None:
        return False
    names = [parts.attention_name] * len(blocks)
    if any(getattr(block, "gradient_checkpointing", False) for block in blocks) and \
            not getattr(inner, "_tdlib_pinned_checkpointing", False):
        return False
    mlp = {id(p) for block in blocks for p in getattr(block, anatomy(model).mlp_name).parameters()}
    if any(p.requires_grad and id(p) not in mlp for block in blocks for p in block.parameters()):
        return False
    if inner.training:
        rates = [value for key, value in vars(inner.config).items()
                 if ("dropout" in key or "pdrop" in key) and isinstance(value, (int, float))]
        attention = [m for block, name in zip(blocks, names) for m in getattr(block, name).modules()]
        if any(rate > 0 for rate in rates) or any(isinstance(m, nn.Dropout) and m.p > 0 for m in attention):
            return False
    return True


@contextmanager
def record_attention(model, layers):
    """Yields a dict that fills with {layer: its attention module's output} for the given ``layers``."""
    parts = anatomy(model)
    outputs: dict = {}
    handles = [parts.attention(i).register_forward_hook(
        lambda module, args, output, i=i: outputs.__setitem__(i, output)) for i in layers]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


class _Recorded(nn.Module):
    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


@contextmanager
def reuse_attention(model, outputs: dict):
    """Within the block, each layer in ``outputs`` returns its recorded attention output instead of computing it.
    Exact only when that layer receives the same input as in the recording pass (``attention_reusable``)."""
    parts = anatomy(model)
    blocks, name = parts.layers, parts.attention_name
    originals = {i: getattr(blocks[i], name) for i in outputs}
    for i, output in outputs.items():
        setattr(blocks[i], name, _Recorded(output))
    try:
        yield
    finally:
        for i, module in originals.items():
            setattr(blocks[i], name, module)
