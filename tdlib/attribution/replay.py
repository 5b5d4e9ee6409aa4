"""The frozen replay: the adapter model made linear on one prompt (see ``tdlib.attribution``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import find_layers, unwrap
from ..splice import SplicedMLP


@dataclass
class FrozenPrompt:
    """The adapter model's frozen state on one prompt (all tensors for a single sequence, no batch)."""

    input_ids: torch.Tensor
    """[P] token ids."""
    embeddings: torch.Tensor
    """[P, d] token embeddings (the token nodes' values)."""
    attn_scale: torch.Tensor
    """[L, P] 1/rms at each layer's input norm."""
    mlp_scale: torch.Tensor
    """[L, P] 1/rms at each layer's post-attention norm (the MLP and adapter input)."""
    final_scale: torch.Tensor
    """[P] 1/rms at the final norm."""
    patterns: torch.Tensor
    """[L, H, P, P] attention patterns (rows sum to 1)."""
    errors: torch.Tensor
    """[L, P, d] error nodes' values: base_mlp(x) + b_dec."""
    attn_bias: torch.Tensor
    """[L, d] attention output bias o_proj(b_v) (added at every position)."""
    features: torch.Tensor
    """[n, 3] active features as (layer, position, feature id), sorted."""
    activations: torch.Tensor
    """[n] their activations (> 0)."""
    logits: torch.Tensor
    """[V] the model's logits at the last position (reference for checks)."""

    @property
    def n_layers(self) -> int:
        return self.errors.shape[0]

    @property
    def n_pos(self) -> int:
        return self.input_ids.shape[0]


def _check_supported(model) -> None:
    inner = unwrap(model)
    layers = find_layers(inner)
    for i, layer in enumerate(layers):
        if not isinstance(layer.mlp, SplicedMLP) or layer.mlp.choice != "adapter" or layer.mlp.adapter is None:
            raise ValueError(f"layer {i} does not run base MLP + adapter; attribution needs the adapter model "
                             "(load_named(pair, 'adapter_l1_...') or set_mlp_choice(model, 'adapter'))")
        attention = layer.self_attn
        if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise ValueError("attribution supports Qwen2/Llama-style attention (q/k/v/o projections) only")
        if getattr(attention, "sliding_window", None):
            raise ValueError("sliding-window attention is not supported by the attribution replay")
    if getattr(inner.lm_head, "bias", None) is not None:
        raise ValueError("an unembedding with a bias is not supported")


def _rms_scale(norm, h: torch.Tensor) -> torch.Tensor:
    return torch.rsqrt(h.pow(2).mean(-1) + norm.variance_epsilon)


@torch.no_grad()
def freeze(model, input_ids) -> FrozenPrompt:
    """Run the adapter model on one prompt (a list or 1-D tensor of ids) and keep what the replay freezes."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    _check_supported(model)
    inner = unwrap(model)
    body = inner.model
    ids = torch.as_tensor(input_ids, device=next(inner.parameters()).device).reshape(-1)
    n_pos = ids.shape[0]
    h = body.embed_tokens(ids)
    embeddings = h.clone()
    cos, sin = body.rotary_emb(h[None], torch.arange(n_pos, device=ids.device)[None])
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool, device=ids.device).tril()
    attn_scales, mlp_scales, patterns, errors, biases, features, activations = [], [], [], [], [], [], []
    for index, layer in enumerate(body.layers):
        attention = layer.self_attn
        n_heads, head_dim = attention.config.num_attention_heads, attention.head_dim
        attn_scales.append(_rms_scale(layer.input_layernorm, h))
        x = h * attn_scales[-1][:, None] * layer.input_layernorm.weight  # the norm, in the replay's precision
        q = attention.q_proj(x).view(n_pos, -1, head_dim).transpose(0, 1)[None]
        k = attention.k_proj(x).view(n_pos, -1, head_dim).transpose(0, 1)[None]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(n_heads // k.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2))[0] * attention.scaling
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        patterns.append(pattern)
        h = h + _attend(attention, pattern, x[None])[0] + _value_bias(attention)
        biases.append(_value_bias(attention))
        mlp_scales.append(_rms_scale(layer.post_attention_layernorm, h))
        x = h * mlp_scales[-1][:, None] * layer.post_attention_layernorm.weight
        adapter = layer.mlp.adapter
        acts = adapter.encode(x)
        error = layer.mlp.base_mlp(x) + adapter.b_dec
        errors.append(error)
        h = h + error + acts @ adapter.W_dec.T
        positions, ids_active = (acts > 0).nonzero(as_tuple=True)
        features.append(torch.stack([torch.full_like(positions, index), positions, ids_active], dim=1))
        activations.append(acts[positions, ids_active])
    final_scale = _rms_scale(body.norm, h)
    logits = inner.lm_head(h * final_scale[:, None] * body.norm.weight)[-1]
    return FrozenPrompt(ids, embeddings, torch.stack(attn_scales), torch.stack(mlp_scales), final_scale,
                        torch.stack(patterns), torch.stack(errors), torch.stack(biases), torch.cat(features),
                        torch.cat(activations), logits)


def _value_bias(attention) -> torch.Tensor:
    """o_proj(b_v): what the value biases add at every position (pattern rows sum to 1)."""
    n_heads, head_dim = attention.config.num_attention_heads, attention.head_dim
    bias = attention.v_proj.bias
    if bias is None:
        return torch.zeros(attention.o_proj.out_features, device=attention.o_proj.weight.device,
                           dtype=attention.o_proj.weight.dtype)
    bias = bias.view(-1, head_dim).repeat_interleave(n_heads // (bias.shape[0] // head_dim), dim=0)
    return attention.o_proj(bias.reshape(-1))


def _attend(attention, pattern: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Frozen-pattern attention without the value bias: x [B, P, d] (already normed) -> [B, P, d]."""
    n_heads, head_dim = attention.config.num_attention_heads, attention.head_dim
    batch, n_pos, _ = x.shape
    values = (x @ attention.v_proj.weight.T).view(batch, n_pos, -1, head_dim)
    values = values.repeat_interleave(n_heads // values.shape[2], dim=2)
    mixed = torch.einsum("hpq,bqhd->bphd", pattern[:, :n_pos, :n_pos], values)
    return mixed.reshape(batch, n_pos, n_heads * head_dim) @ attention.o_proj.weight.T


class Replay:
    """The frozen (linear) replacement model of one prompt: run it from any node values."""

    def __init__(self, model, state: FrozenPrompt, target_token: int, demean: bool = True):
        inner = unwrap(model)
        self.body = inner.model
        self.state = state
        self.adapters = [layer.mlp.adapter for layer in self.body.layers]
        unembed = inner.lm_head.weight
        direction = unembed[target_token] - (unembed.mean(0) if demean else 0)
        self.logit_direction = (direction * self.body.norm.weight).detach()
        self.target_token = int(target_token)
        self.demean = demean
        self.encoders = torch.stack([a.W_enc * layer.post_attention_layernorm.weight
                                     for a, layer in zip(self.adapters, self.body.layers)])

    def run(self, embeddings, errors, activations, biases, n_layers=None, n_pos=None, recompute=False):
        """Residual stream of the replay. Shapes carry a batch dimension B: embeddings [B, P, d];
        errors[l] [B, P, d]; activations[l] [B, n_l] (values of layer l's active features, in the order of
        ``state.features``); biases[l] [B, P, d]. ``recompute``: active features take their pre-activation
        (linear on the active set) instead of the given values. Returns (mids, final): mids[l] [B, P, d] is the
        residual before layer l's MLP."""
        state = self.state
        n_layers = state.n_layers if n_layers is None else n_layers
        n_pos = state.n_pos if n_pos is None else n_pos
        h = embeddings
        mids, values = [], []
        for index in range(n_layers):
            layer = self.body.layers[index]
            x = h * (state.attn_scale[index, :n_pos, None] * layer.input_layernorm.weight)
            h = h + _attend(layer.self_attn, state.patterns[index], x) + biases[index]
            mids.append(h)
            if index == len(errors):
                break
            positions, ids = self.layer_features(index, n_pos)
            adapter = self.adapters[index]
            acts = activations[index]
            if recompute:
                acts = self.preactivations(index, h, positions, ids, with_bias=True)
            values.append(acts)
            writes = torch.zeros_like(h)
            writes = writes.index_add(1, positions, acts[..., None] * adapter.W_dec.T[ids])
            h = h + errors[index] + writes
        return mids, h

    def layer_features(self, layer: int, n_pos: int | None = None):
        features = self.state.features
        keep = features[:, 0] == layer
        if n_pos is not None:
            keep &= features[:, 1] < n_pos
        return features[keep, 1], features[keep, 2]

    def preactivations(self, layer, mid, positions, ids, with_bias=False):
        """Pre-activations of the given features from the residual ``mid`` [B, P, d] -> [B, n]."""
        norm = self.body.layers[layer].post_attention_layernorm
        encoder = self.adapters[layer].W_enc[ids] * norm.weight  # [n, d]
        x = mid[:, positions] * self.state.mlp_scale[layer, positions, None]
        pre = (x * encoder).sum(-1)
        return pre + self.adapters[layer].b_enc[ids] if with_bias else pre

    def target_preactivations(self, mids, targets: torch.Tensor) -> torch.Tensor:
        """Pre-activation (without b_enc) of feature ``targets[b]`` = (layer, pos, id) read from batch copy b."""
        layers, positions, ids = targets.to(mids[0].device).unbind(1)
        stacked = torch.stack(mids)  # [L', B, P, d]
        batch = torch.arange(targets.shape[0], device=stacked.device)
        x = stacked[layers, batch, positions] * self.state.mlp_scale[layers, positions, None]
        return (x * self.encoders[layers, ids]).sum(-1)

    def logit(self, final: torch.Tensor) -> torch.Tensor:
        """The target logit (demeaned if chosen) at the last position from the final residual [B, P, d]."""
        return final[:, -1] @ self.logit_direction * self.state.final_scale[-1]

    def leaves(self, batch: int, n_layers: int, n_pos: int):
        """Per-batch copies of the node values (requiring grad) for layers < n_layers (bias up to n_layers)."""
        state = self.state

        def copy(t):
            return t.expand(batch, *t.shape).clone().requires_grad_(True)

        embeddings = copy(state.embeddings[:n_pos])
        errors = [copy(state.errors[i, :n_pos]) for i in range(n_layers)]
        activations = [copy(self.layer_activations(i, n_pos)) for i in range(n_layers)]
        biases = [copy(state.attn_bias[i].expand(n_pos, -1)) for i in range(min(n_layers + 1, state.n_layers))]
        return embeddings, errors, activations, biases

    def layer_activations(self, layer: int, n_pos: int | None = None) -> torch.Tensor:
        features = self.state.features
        keep = features[:, 0] == layer
        if n_pos is not None:
            keep &= features[:, 1] < n_pos
        return self.state.activations[keep]

    def node_values(self, n_pos):
        return self.state.embeddings[:n_pos], self.state.errors[:, :n_pos]


def _attend_transposed(attention, pattern: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Transpose of ``_attend``: gradient at the attention output [B, P, d] -> at its normed input [B, P, d]."""
    n_heads, head_dim = attention.config.num_attention_heads, attention.head_dim
    batch, n_pos, _ = grad.shape
    mixed = (grad @ attention.o_proj.weight).view(batch, n_pos, n_heads, head_dim)
    values = torch.einsum("hpq,bphd->bqhd", pattern[:, :n_pos, :n_pos], mixed)
    n_kv = attention.v_proj.weight.shape[0] // head_dim
    values = values.reshape(batch, n_pos, n_kv, n_heads // n_kv, head_dim).sum(3)  # heads sharing a kv head
    return values.reshape(batch, n_pos, n_kv * head_dim) @ attention.v_proj.weight


def _feature_offsets(state: FrozenPrompt) -> list[int]:
    """Index of each layer's first feature node (features are sorted by layer)."""
    counts = torch.bincount(state.features[:, 0], minlength=state.n_layers).tolist()
    return [sum(counts[:i]) for i in range(state.n_layers)]
