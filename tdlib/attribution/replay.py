"""The frozen replay: the spliced model made linear on one prompt (see ``tdlib.attribution``).

Built from what ``capture`` records of the model's own modules, so it holds for any pre-norm decoder whose
norms scale each position (Qwen2, Llama, Gemma, Gemma 2, Gemma 3, ...): per layer

    h += attn_out_norm( attend_frozen( attn_norm(h) ) ) + attn_bias      attn_out_norm: Gemma 2/3, else identity
    h += base_frame( base_lin(mlp_norm(h)) ) + error + mlp_bias + sum_f act_f * decoder_f(position)

where every norm is frozen at its prompt scale and a feature's decoder is its residual write (``W_dec[:, f]``,
through the frozen post-MLP norm for adapters placed before it). What ``base_lin``, ``error`` and ``mlp_bias`` are
depends on the base-MLP ``mode`` (``MODES``):

* ``"frozen"``: no ``base_lin``; the base MLP's output (and ``b_dec``) is a constant error node, so no path of
  influence runs through a base MLP;
* ``"relp"`` (the paper's rules, on the adapter model): ``base_lin`` is the base MLP with its activation's factor
  frozen (``silu(g) = g * sigmoid(g)``, the sigmoid detached; GELU alike) and the half rule on ``act(gate) * up``
  (``0.5 a u0 + 0.5 a0 u``): linear, and equal to the MLP at the prompt, so the error nodes are zero and
  ``mlp_bias`` holds ``b_dec`` (and any MLP biases);
* ``"target"``: the local replacement model of the *target*: patterns and norms frozen on the target's own forward,
  each target MLP written as ``base_lin`` + the adapter's features (read on the target's MLP inputs) + ``b_dec`` +
  an error node = what the adapter misses there, ``target_mlp(x) - base_mlp(x) - adapter(x)`` at the adapter's
  placement;
* ``"jacobian"`` (the adapter model): ``base_lin`` is the base MLP's true derivative at the prompt,
  ``J(x0) = W_down (diag(act'(g0) u0) W_gate + diag(act(g0)) W_up)``: no half rule, no frozen sigmoid, so an edge
  is a first-order estimate of what removing its source does. A gated MLP is not linear, so ``J(x0) x0`` is not its
  output: the remainder, ``mlp(x0) - J(x0) x0`` (MLP biases included), is the error node, and the graph's error share
  reports how much of the logit the first-order decomposition leaves unexplained.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..models import anatomy
from ..splice import PostMLPNorm, mlp_choice
from .capture import FrozenNorm, NotReplayable, capture, check_replayable, fit_norm, gated_weights, tolerance

MODES = ("frozen", "relp", "target", "jacobian")
"""How the replay treats each base MLP (module docstring): a constant error node, passed through linearly by the
paper's rules, passed through inside a graph of the target itself, or passed through by its true derivative."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown attribution mode {mode!r}; use one of {MODES} (docs/method.md, attribution)")
    return mode


@dataclass
class FrozenPrompt:
    """The adapter model's frozen state on one prompt (all tensors for a single sequence, no batch)."""

    input_ids: torch.Tensor
    """[P] token ids."""
    embeddings: torch.Tensor
    """[P, d] the residual stream entering layer 0 (the token nodes' values; scaled embeddings for Gemma)."""
    attn_scale: torch.Tensor
    """[L, P] each layer's attention-input norm scale (``attn_weight`` is its fixed factor, [L, d])."""
    attn_weight: torch.Tensor
    attn_out_scale: torch.Tensor
    """[L, P] the norm on the attention's output (ones where the block has none; ``attn_out_weight`` [L, d])."""
    attn_out_weight: torch.Tensor
    mlp_scale: torch.Tensor
    """[L, P] the MLP-input norm scale (the MLP and adapter input; ``mlp_weight`` [L, d])."""
    mlp_weight: torch.Tensor
    decoder_scale: torch.Tensor
    """[L, P] what the residual receives per unit of adapter output: the frozen post-MLP norm for adapters placed
    before it, ones otherwise (``decoder_weight`` [L, d])."""
    decoder_weight: torch.Tensor
    final_scale: torch.Tensor
    """[P] the final norm's scale (``final_weight`` [d])."""
    final_weight: torch.Tensor
    patterns: torch.Tensor
    """[L, H, P, P] attention patterns (rows sum to 1)."""
    errors: torch.Tensor
    """[L, P, d] error nodes' values: what the MLP branch adds that neither a feature, ``base_lin`` nor ``mlp_bias``
    accounts for (``frozen``: the base MLP and ``b_dec``; ``relp``: zero; ``target``: what the adapter misses)."""
    attn_bias: torch.Tensor
    """[L, P, d] what attention adds at each position whatever its input (value and output biases)."""
    features: torch.Tensor
    """[n, 3] active features as (layer, position, feature id), sorted."""
    activations: torch.Tensor
    """[n] their activations (> 0)."""
    logits: torch.Tensor
    """[V] the unembedding's output at the last position, before any final soft-capping (the replay's logits)."""
    softcap: float | None = None
    """The model's final logit soft-capping (Gemma 2): probabilities use ``softcap * tanh(logits / softcap)``."""
    mode: str = "frozen"
    """The base-MLP mode (``MODES``) the prompt was frozen in."""
    mlp_bias: torch.Tensor | None = None
    """[L, P, d] constants the MLP branch adds (``b_dec``, MLP biases; zero in ``frozen`` mode, where the error
    node holds them): reported in each row's ``bias``, like ``attn_bias``."""
    gate_coef: torch.Tensor | None = None
    """[L, P, d_ff] ``relp``/``target``: the linearised base MLP's factor on ``gate_proj(x)`` (0.5 * up * act/gate at
    the prompt); None in ``frozen`` mode."""
    up_coef: torch.Tensor | None = None
    """[L, P, d_ff] its factor on ``up_proj(x)`` (0.5 * act(gate) at the prompt)."""
    base_scale: torch.Tensor | None = None
    """[L, P] the frozen post-MLP norm the base MLP's output passes through (ones where there is none;
    ``base_weight`` [L, d])."""
    base_weight: torch.Tensor | None = None

    @property
    def n_layers(self) -> int:
        return self.errors.shape[0]

    @property
    def passes_base_mlp(self) -> bool:
        """Whether influence runs through the base MLPs (``relp``, ``target``)."""
        return self.gate_coef is not None

    @property
    def n_pos(self) -> int:
        return self.input_ids.shape[0]

    def model_logits(self) -> torch.Tensor:
        """The model's own logits (soft-capped where the model caps them)."""
        return self.logits if not self.softcap else self.softcap * torch.tanh(self.logits / self.softcap)

    def replace(self, **changes) -> "FrozenPrompt":
        return dataclasses.replace(self, **changes)


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm() / b.norm().clamp(min=1e-30)).detach())


@torch.no_grad()
def freeze(model, input_ids, mode: str = "frozen") -> FrozenPrompt:
    """Run the spliced model on one prompt (a list or 1-D tensor of ids) and keep what the replay freezes: the
    adapter model for ``mode`` "frozen" and "relp", the target (every layer's own MLP) for "target" (``MODES``).
    Refuses (``NotReplayable``, naming the feature) a model the replay cannot reproduce, before running it, and
    checks that the replay reproduces every block's output and the logits."""
    check_mode(mode)
    parts = anatomy(model)
    check_replayable(parts, mode)
    inner = parts.model
    ids = torch.as_tensor(input_ids, device=next(inner.parameters()).device).reshape(-1)
    with mlp_choice(parts, "target" if mode == "target" else "adapter"):
        captured = capture(parts, ids)
    tol = tolerance(captured.logits.dtype)
    h = captured.blocks[0].h_in.clone()
    embeddings = h.clone()
    rows: dict[str, list] = {key: [] for key in ("attn", "attn_out", "mlp", "decoder", "base", "errors", "bias",
                                                 "mlp_bias", "gate", "up", "features", "activations", "patterns")}
    for index, frozen in enumerate(captured.blocks):
        h = _freeze_layer(index, parts, frozen, h, rows, tol, mode)
    final = captured.final
    logits = parts.head(final.apply(h))[-1]
    softcap = getattr(inner.config, "final_logit_softcapping", None)
    linear = mode != "frozen"
    state = FrozenPrompt(
        ids, embeddings, *_stack(rows["attn"]), *_stack(rows["attn_out"]), *_stack(rows["mlp"]),
        *_stack(rows["decoder"]), final.scale, final.weight, torch.stack(rows["patterns"]),
        torch.stack(rows["errors"]), torch.stack(rows["bias"]), torch.cat(rows["features"]),
        torch.cat(rows["activations"]), logits, softcap, mode, torch.stack(rows["mlp_bias"]),
        torch.stack(rows["gate"]) if linear else None, torch.stack(rows["up"]) if linear else None,
        *_stack(rows["base"]))
    gap = _relative_gap(state.model_logits(), captured.logits)
    if gap > tol:
        raise NotReplayable(f"the replay's logits differ from the model's by {gap:.2g} (relative): the model "
                            "computes its logits from the final norm's output in a way the replay does not know")
    return state


def _stack(norms: list[FrozenNorm]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([n.scale for n in norms]), torch.stack([n.weight for n in norms])


LINEAR_RULES = ("relp", "jacobian")
"""How ``LinearisedMLP`` makes a gated MLP linear: the paper's rules, or its true derivative."""


class LinearisedMLP:
    """A gated MLP ``down(act(gate(x)) * up(x))`` made linear at ``x0``.

    ``rule="relp"`` (the paper's rules): the activation as ``g * f(g)`` with ``f = act(g) / g`` frozen (SiLU: the
    sigmoid; GELU: Phi), and the half rule on the product, ``0.5 * act * up0 + 0.5 * act0 * up``. Exact at ``x0``
    for a bias-free MLP, but not its derivative: it halves the response and keeps a positive gain where
    ``act'`` is negative.

    ``rule="jacobian"``: the MLP's derivative at ``x0``, ``act'(g0) * up0 * gate + act(g0) * up``. Not exact at
    ``x0``: ``constant`` holds the remainder.

    Either way ``apply(x0) + constant`` is the MLP's output at ``x0`` (biases are in ``constant``)."""

    def __init__(self, mlp, x0: torch.Tensor, name: str, tol: float, rule: str = "relp"):
        if rule not in LINEAR_RULES:
            raise ValueError(f"unknown linearisation rule {rule!r}; use one of {LINEAR_RULES}")
        self.weights = gated_weights(mlp, name)
        gate0, up0 = mlp.gate_proj(x0), mlp.up_proj(x0)
        act0 = mlp.act_fn(gate0)
        if rule == "jacobian":
            self.gate_coef, self.up_coef = up0 * _activation_slope(mlp.act_fn, gate0), act0
        else:
            tiny = torch.finfo(x0.dtype).tiny ** 0.5
            factor = torch.where(gate0.abs() > tiny, act0 / torch.where(gate0.abs() > tiny, gate0, 1.0),
                                 torch.full_like(gate0, 0.5))
            self.gate_coef, self.up_coef = 0.5 * up0 * factor, 0.5 * act0
        output = mlp(x0)
        if _relative_gap(mlp.down_proj(act0 * up0), output) > tol:
            raise NotReplayable(f"{name} does not compute down_proj(act_fn(gate_proj(x)) * up_proj(x)): the paper's "
                                "rules for passing through a base MLP need a gated MLP; use mode='frozen'")
        self.constant = output - self.apply(x0)  # MLP biases; zero for a bias-free MLP

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return linearised_mlp(x, self.weights, self.gate_coef, self.up_coef)


def _activation_slope(act_fn, gate: torch.Tensor) -> torch.Tensor:
    """``act'(gate)`` elementwise, by autograd through the module's own activation (SiLU, GELU, its tanh form)."""
    with torch.enable_grad():
        leaf = gate.detach().clone().requires_grad_(True)
        (slope,) = torch.autograd.grad(act_fn(leaf).sum(), leaf)
    return slope


def linearised_mlp(x, weights, gate_coef, up_coef):
    """The linearised gated MLP on ``x`` [..., P, d] with per-position factors [P, d_ff] (no constant)."""
    w_gate, w_up, w_down = weights
    n_pos = x.shape[-2]
    return ((x @ w_gate.T) * gate_coef[:n_pos] + (x @ w_up.T) * up_coef[:n_pos]) @ w_down.T


def _post_norm_module(parts, layer: int):
    """Layer ``layer``'s post-MLP norm module itself (unwrapped from ``PostMLPNorm``)."""
    norm = parts.post_mlp_norm(layer)
    return norm.norm if isinstance(norm, PostMLPNorm) else norm


def _freeze_layer(index, parts, frozen, h, rows, tol, mode):
    n_pos, d = h.shape
    identity = FrozenNorm.identity(n_pos, d, h)
    mlp = parts.mlp(index)
    attention = parts.attention(index)
    attn_out = frozen.attn_out or identity
    bias = attn_out.apply(_value_bias(attention, frozen.pattern.shape[0]).expand(n_pos, -1))
    h = h + attn_out.apply(_attend(attention, frozen.pattern, frozen.attn_in.apply(h)[None])[0]) + bias
    x = frozen.mlp_norm.apply(h)
    if _relative_gap(x, frozen.mlp_in) > tol:
        raise NotReplayable(f"layer {index}: the MLP input is not the norm of the residual after attention "
                            "(a block wiring the replay does not know, e.g. parallel attention and MLP)")
    adapter = mlp.adapter
    acts = adapter.encode(x)
    writes = acts @ adapter.W_dec.T
    post = frozen.mlp_out or identity  # fitted on what the post-MLP norm received in this forward
    residual = mlp.placement == "residual"
    decoder = identity if residual else post
    zero = torch.zeros_like(h)
    if mode == "frozen":
        base_frame, base_out, mlp_bias = identity, zero, zero
        error = post.apply(mlp.base_mlp(x)) + adapter.b_dec if residual else post.apply(mlp.base_mlp(x) + adapter.b_dec)
        linear = None
    else:
        linear = LinearisedMLP(mlp.base_mlp, x, f"layer {index}'s base MLP", tol,
                               rule="jacobian" if mode == "jacobian" else "relp")
        base_frame = post
        if mode == "target" and residual:  # the norm's scale on the base MLP's own output, not the target MLP's
            norm = _post_norm_module(parts, index)
            base_output = mlp.base_mlp(x)
            base_frame = fit_norm(f"layer {index}'s post-MLP norm", norm, base_output, norm(base_output), tol)
        base_out = base_frame.apply(linear.apply(x))
        constant = base_frame.apply(linear.constant)
        decoder_bias = adapter.b_dec if residual else post.apply(adapter.b_dec.expand(n_pos, -1))
        mlp_bias = decoder_bias + (zero if mode == "jacobian" else constant)
        if mode == "relp":
            error = zero
        elif mode == "jacobian":  # what the first-order pass-through leaves of the base MLP's output
            error = constant
        else:  # the target's MLP branch minus everything the replacement accounts for
            target_branch = frozen.h_out - h
            error = target_branch - base_out - mlp_bias - decoder.apply(writes)
    h = h + base_out + error + mlp_bias + decoder.apply(writes)
    if _relative_gap(h, frozen.h_out) > tol:
        raise NotReplayable(f"layer {index}: the replay does not reproduce the block's output (relative gap "
                            f"{_relative_gap(h, frozen.h_out):.2g}); the block computes something it does not know")
    positions, ids_active = (acts > 0).nonzero(as_tuple=True)
    for key, value in (("attn", frozen.attn_in), ("attn_out", attn_out), ("mlp", frozen.mlp_norm),
                       ("decoder", decoder), ("base", base_frame), ("errors", error), ("bias", bias),
                       ("mlp_bias", mlp_bias),
                       ("features", torch.stack([torch.full_like(positions, index), positions, ids_active], 1)),
                       ("activations", acts[positions, ids_active]), ("patterns", frozen.pattern)):
        rows[key].append(value)
    if linear is not None:
        rows["gate"].append(linear.gate_coef)
        rows["up"].append(linear.up_coef)
    return h


def _value_bias(attention, n_heads: int) -> torch.Tensor:
    """o_proj(b_v): what the value (and output) biases add at every position (pattern rows sum to 1)."""
    head_dim = attention.o_proj.in_features // n_heads
    weight, bias = attention.v_proj.weight, attention.v_proj.bias
    if bias is None:
        bias = torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype)
    bias = bias.view(-1, head_dim).repeat_interleave(n_heads // (bias.shape[0] // head_dim), dim=0)
    return attention.o_proj(bias.reshape(-1))


def _attend(attention, pattern: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Frozen-pattern attention without the value bias: x [B, P, d] (already normed) -> [B, P, d]."""
    n_heads = pattern.shape[0]
    head_dim = attention.o_proj.in_features // n_heads
    batch, n_pos, _ = x.shape
    values = (x @ attention.v_proj.weight.T).view(batch, n_pos, -1, head_dim)
    values = values.repeat_interleave(n_heads // values.shape[2], dim=2)
    mixed = torch.einsum("hpq,bqhd->bphd", pattern[:, :n_pos, :n_pos], values)
    return mixed.reshape(batch, n_pos, n_heads * head_dim) @ attention.o_proj.weight.T


class Replay:
    """The frozen (linear) replacement model of one prompt: run it from any node values."""

    def __init__(self, model, state: FrozenPrompt, target_token: int, demean: bool = True):
        parts = anatomy(model)
        mlps = parts.mlps()
        self.state = state
        self.attentions = [parts.attention(i) for i in range(parts.n_layers)]
        self.adapters = [mlp.adapter for mlp in mlps]
        unembed = parts.head.weight
        direction = unembed[target_token] - (unembed.mean(0) if demean else 0)
        self.logit_direction = (direction * state.final_weight).detach()
        self.target_token = int(target_token)
        self.demean = demean
        self.encoders = torch.stack([a.W_enc * weight for a, weight in zip(self.adapters, state.mlp_weight)])
        self.base_weights = ([gated_weights(mlp.base_mlp, f"layer {i}'s base MLP") for i, mlp in enumerate(mlps)]
                             if state.passes_base_mlp else None)

    def run(self, embeddings, errors, activations, biases, mlp_biases, n_layers=None, n_pos=None,
            recompute=False):
        """Residual stream of the replay. Shapes carry a batch dimension B: embeddings [B, P, d];
        errors[l] [B, P, d]; activations[l] [B, n_l] (values of layer l's active features, in the order of
        ``state.features``); biases[l] and mlp_biases[l] [B, P, d] (the attention's and the MLP branch's constants).
        ``recompute``: active features take their pre-activation (linear on the active set) instead of the given
        values. Returns (mids, final): mids[l] [B, P, d] is the residual before layer l's MLP."""
        state = self.state
        n_layers = state.n_layers if n_layers is None else n_layers
        n_pos = state.n_pos if n_pos is None else n_pos
        h = embeddings
        mids, values = [], []
        for index in range(n_layers):
            x = h * (state.attn_scale[index, :n_pos, None] * state.attn_weight[index])
            out = _attend(self.attentions[index], state.patterns[index], x)
            h = h + out * (state.attn_out_scale[index, :n_pos, None] * state.attn_out_weight[index]) + biases[index]
            mids.append(h)
            if index == len(errors):
                break
            positions, ids = self.layer_features(index, n_pos)
            acts = activations[index]
            if recompute:
                acts = self.preactivations(index, h, positions, ids, with_bias=True)
            values.append(acts)
            writes = torch.zeros_like(h)
            writes = writes.index_add(1, positions, acts[..., None] * self.decoder(index, positions, ids))
            h = h + errors[index] + writes + mlp_biases[index] + self.base_mlp(index, h)
        return mids, h

    def base_mlp(self, layer: int, mid: torch.Tensor):
        """The base MLP's linearised residual contribution from the residual ``mid`` [B, P, d] (0 when frozen)."""
        state = self.state
        if not state.passes_base_mlp:
            return 0.0
        n_pos = mid.shape[-2]
        x = mid * (state.mlp_scale[layer, :n_pos, None] * state.mlp_weight[layer])
        out = linearised_mlp(x, self.base_weights[layer], state.gate_coef[layer], state.up_coef[layer])
        return out * (state.base_scale[layer, :n_pos, None] * state.base_weight[layer])

    def base_mlp_transposed(self, layer: int, grad: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
        """Transpose of ``base_mlp``: the gradient at the MLP branch's output [B, P, d] -> at the residual ``mid``.
        ``live`` [B, P] (optional) marks the (row, position) pairs whose gradient can be nonzero; the MLP is
        position-wise, so only those are computed (a pass's rows reach different layers and positions)."""
        state = self.state
        n_pos = grad.shape[1]
        w_gate, w_up, w_down = self.base_weights[layer]
        base_frame = state.base_scale[layer, :n_pos, None] * state.base_weight[layer]
        mlp_frame = state.mlp_scale[layer, :n_pos, None] * state.mlp_weight[layer]
        gate_coef, up_coef = state.gate_coef[layer, :n_pos], state.up_coef[layer, :n_pos]
        if live is not None and not bool(live.all()):
            rows, positions = live.nonzero(as_tuple=True)
            hidden = (grad[rows, positions] * base_frame[positions]) @ w_down
            back = (hidden * gate_coef[positions]) @ w_gate + (hidden * up_coef[positions]) @ w_up
            out = torch.zeros_like(grad)
            out[rows, positions] = back * mlp_frame[positions]
            return out
        hidden = (grad * base_frame) @ w_down
        # two matmuls, not one on [gate | up] concatenated: the copy costs more than it saves (12 vs 19 ms a layer
        # for 8 targets x 100 positions on the 135M shape)
        return ((hidden * gate_coef) @ w_gate + (hidden * up_coef) @ w_up) * mlp_frame

    def layer_features(self, layer: int, n_pos: int | None = None):
        features = self.state.features
        keep = features[:, 0] == layer
        if n_pos is not None:
            keep &= features[:, 1] < n_pos
        return features[keep, 1], features[keep, 2]

    def decoder(self, layer: int, positions: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[n, d] the residual write per unit activation of features ``ids`` at ``positions`` of ``layer``."""
        state = self.state
        frame = state.decoder_scale[layer, positions, None] * state.decoder_weight[layer]
        return self.adapters[layer].W_dec.T[ids] * frame

    def preactivations(self, layer, mid, positions, ids, with_bias=False):
        """Pre-activations of the given features from the residual ``mid`` [B, P, d] -> [B, n]."""
        encoder = self.encoders[layer, ids]  # [n, d]
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
        """Per-batch copies of the node values (requiring grad) for layers < n_layers (bias up to n_layers):
        (embeddings, errors, activations, attention biases, MLP biases), ``run``'s arguments."""
        state = self.state

        def copy(t):
            return t.expand(batch, *t.shape).clone().requires_grad_(True)

        embeddings = copy(state.embeddings[:n_pos])
        errors = [copy(state.errors[i, :n_pos]) for i in range(n_layers)]
        activations = [copy(self.layer_activations(i, n_pos)) for i in range(n_layers)]
        biases = [copy(state.attn_bias[i, :n_pos]) for i in range(min(n_layers + 1, state.n_layers))]
        mlp_biases = [copy(state.mlp_bias[i, :n_pos]) for i in range(n_layers)]
        return embeddings, errors, activations, biases, mlp_biases

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
    n_heads = pattern.shape[0]
    head_dim = attention.o_proj.in_features // n_heads
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
