"""What the replay freezes, captured from the model's own modules as they run on one prompt.

Nothing here knows a family's formulas: each norm module is recorded as it runs and fitted as "one number per
position times a fixed vector" (RMSNorm with ``weight``, Gemma's ``1 + weight``, float32 internals: all the same
to the fit), attention patterns come from the attention module itself (run eagerly, so sliding windows, q/k
norms, soft-capping and rotary variants are already inside them), and the block's wiring (which norm feeds the
attention, which the MLP, which norms act on their outputs) is read from which tensor each module received.
What cannot be replayed is refused by ``check_replayable`` before any forward pass, naming the feature.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models import anatomy
from ..splice import SplicedMLP


class NotReplayable(ValueError):
    """The model has a feature the frozen replay cannot reproduce (the message names it)."""


@torch.no_grad()
def final_norm_weight(model) -> torch.Tensor:
    """[d] the final norm's fixed per-dimension factor (the module applied to a vector of ones: its ``weight``,
    Gemma's ``1 + weight``, ... up to 1/sqrt(1 + eps))."""
    parts = anatomy(model)
    if parts.final_norm is None:
        raise NotReplayable("the model has no norm module outside its decoder blocks (no final norm)")
    reference = parts.head.weight
    return parts.final_norm(torch.ones(reference.shape[1], dtype=reference.dtype, device=reference.device))


def gated_weights(mlp, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_gate, W_up, W_down) of a gated MLP; refuse any other MLP by name."""
    parts = [getattr(mlp, part, None) for part in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, torch.nn.Linear) for p in parts) or not callable(getattr(mlp, "act_fn", None)):
        raise NotReplayable(f"{name} ({type(mlp).__name__}) is not a gated MLP with gate_proj, up_proj, down_proj "
                            "and act_fn: modes 'relp' and 'target' pass influence through gated MLPs only; use "
                            "mode='frozen'")
    return parts[0].weight, parts[1].weight, parts[2].weight


def check_replayable(model, mode: str = "frozen") -> None:
    """Refuse, before any work, a model whose adapter model (or, in mode "target", whose target with its adapters)
    the frozen replay cannot reproduce."""
    parts = anatomy(model)
    inner = parts.model
    for i in range(parts.n_layers):
        mlp = parts.mlp(i)
        if not isinstance(mlp, SplicedMLP) or mlp.adapter is None:
            raise ValueError(f"layer {i} has no adapter; attribution needs a spliced adapter run "
                             "(load_named(pair, 'adapter_l1_...'))")
        if mode != "target" and mlp.choice != "adapter":
            raise ValueError(f"layer {i} does not run base MLP + adapter; attribution in mode {mode!r} needs the "
                             "adapter model (set_mlp_choice(model, 'adapter')); mode 'target' attributes the target")
        if mode != "frozen":
            gated_weights(mlp.base_mlp, f"layer {i}'s base MLP")
        attention = parts.attention(i)
        if not all(isinstance(getattr(attention, n, None), nn.Linear) for n in ("v_proj", "o_proj")):
            raise NotReplayable(
                f"layer {i}'s attention ({type(attention).__name__}) has no separate linear v_proj and o_proj "
                "(fused query/key/value projections, as in GPT-2 and GPT-NeoX): the replay's value path needs them")
        if any("v_norm" in name for name, _ in attention.named_modules()):
            raise NotReplayable(f"layer {i}'s attention normalises its values (v_norm): the value path would not "
                                "be linear once the pattern is frozen")
        for name, norm in {**parts.block_norms(i), **parts.outer_norms()}.items():
            if isinstance(norm, nn.LayerNorm) or getattr(norm, "bias", None) is not None:
                raise NotReplayable(f"norm {name!r} ({type(norm).__name__}) subtracts the mean or adds a bias: the "
                                    "replay freezes only norms that scale each position (RMSNorm-style)")
    if getattr(inner.config, "use_parallel_residual", False) or getattr(inner.config, "parallel_attn", False):
        raise NotReplayable("the blocks run attention and MLP in parallel (use_parallel_residual): the replay "
                            "knows sequential pre-norm blocks only")
    if getattr(parts.head, "bias", None) is not None:
        raise NotReplayable("an unembedding with a bias is not supported")


@dataclass
class FrozenNorm:
    """A norm frozen on the prompt: ``x -> x * scale[p] * weight`` (identity when the block has no such norm)."""

    scale: torch.Tensor
    """[P] one number per position (1/rms at the prompt, up to the weight's normalisation)."""
    weight: torch.Tensor
    """[d] the fixed per-dimension factor (``weight``, ``1 + weight``, ...: whatever the module multiplies by)."""

    @classmethod
    def identity(cls, n_pos: int, d: int, like: torch.Tensor) -> "FrozenNorm":
        return cls(torch.ones(n_pos, dtype=like.dtype, device=like.device),
                   torch.ones(d, dtype=like.dtype, device=like.device))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale[:x.shape[-2], None] * self.weight


@torch.no_grad()
def fit_norm(name: str, norm: nn.Module, x: torch.Tensor, y: torch.Tensor, tolerance: float) -> FrozenNorm:
    """Fit ``y = scale[p] * weight * x`` with ``weight = norm(ones)`` (any RMSNorm formula); refuse a norm that
    is not of that form."""
    weight = norm(torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)).to(x.dtype)
    basis = x * weight
    scale = (y * basis).sum(-1) / (basis * basis).sum(-1).clamp(min=torch.finfo(x.dtype).tiny)
    misfit = (y - scale[:, None] * basis).norm() / y.norm().clamp(min=torch.finfo(x.dtype).tiny)
    if misfit > tolerance:
        raise NotReplayable(f"norm {name!r} ({type(norm).__name__}) does not scale each position by one number "
                            f"times a fixed vector (relative misfit {float(misfit):.2g}): it cannot be frozen")
    return FrozenNorm(scale, weight)


@dataclass
class Block:
    """One decoder block as it ran: its residual input and output, attention pattern and frozen norms."""

    h_in: torch.Tensor
    h_out: torch.Tensor
    pattern: torch.Tensor
    """[H, P, P] the attention module's own pattern."""
    mlp_in: torch.Tensor
    attn_in: FrozenNorm
    attn_out: FrozenNorm | None
    mlp_norm: FrozenNorm
    mlp_out: FrozenNorm | None


@dataclass
class Captured:
    blocks: list[Block]
    final: FrozenNorm
    logits: torch.Tensor
    """[V] the model's own logits at the last position."""


def tolerance(dtype: torch.dtype) -> float:
    """Relative error allowed when matching the replay to the model (structure checks, norm fits)."""
    return max(1e-3, 8 * torch.finfo(dtype).eps)


class _Recorder:
    def __init__(self):
        self.calls: dict[int, tuple] = {}
        self.handles = []

    def watch(self, module: nn.Module):
        def hook(module, args, kwargs, output):
            first = args[0] if args else kwargs.get("hidden_states")
            self.calls[id(module)] = (first, output)

        self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _as_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _match(norms: dict, calls: dict, tensor: torch.Tensor, side: int):
    """The norm whose input (side 0) or output (side 1) is exactly ``tensor``."""
    for name, norm in norms.items():
        call = calls.get(id(norm))
        if call is not None and call[side].shape == tensor.shape and torch.equal(call[side], tensor):
            return name, norm, call
    return None


@torch.no_grad()
def capture(model, ids: torch.Tensor) -> Captured:
    """Run the adapter model once on ``ids`` [P] with eager attention; return what the replay freezes."""
    parts = anatomy(model)
    inner, outer_norms = parts.model, parts.outer_norms()
    recorder = _Recorder()
    watched = [m for i in range(parts.n_layers) for m in (parts.block(i), parts.attention(i), parts.mlp(i),
                                                           *parts.block_norms(i).values())] + list(outer_norms.values())
    for module in watched:
        recorder.watch(module)
    previous = inner.config._attn_implementation
    try:
        inner.set_attn_implementation("eager")
        logits = inner(ids[None], use_cache=False).logits[0, -1]
    finally:
        recorder.remove()
        inner.set_attn_implementation(previous)
    calls, tol = recorder.calls, tolerance(logits.dtype)
    blocks = [_block(i, parts, calls, tol) for i in range(parts.n_layers)]
    found = _match(outer_norms, calls, blocks[-1].h_out[None], 0)
    if found is None:
        raise NotReplayable("no norm module receives the last block's output: cannot find the final norm")
    name, norm, (x, y) = found
    return Captured(blocks, fit_norm(name, norm, x[0], y[0], tol), logits)


def _block(index: int, parts, calls: dict, tol: float) -> Block:
    block, attention, mlp = parts.block(index), parts.attention(index), parts.mlp(index)
    h_in, h_out = _as_tensor(calls[id(block)][0])[0], _as_tensor(calls[id(block)][1])[0]
    attn_input, attn_output = calls[id(attention)]
    attn_value, pattern = attn_output[0], attn_output[1]
    if pattern is None:
        raise NotReplayable(f"layer {index}'s attention returned no pattern even when run eagerly")
    mlp_input, mlp_output = calls[id(mlp)]
    norms = parts.block_norms(index)
    named = {}
    for role, tensor, side, required in (("attention input", attn_input, 1, True),
                                         ("attention output", attn_value, 0, False),
                                         ("MLP input", mlp_input, 1, True), ("MLP output", mlp_output, 0, False)):
        found = _match(norms, calls, tensor, side)
        if found is None and required:
            raise NotReplayable(f"layer {index}: no norm module produces the {role}; the replay knows pre-norm "
                                "blocks only")
        named[role] = None if found is None else fit_norm(found[0], found[1], found[2][0][0], found[2][1][0], tol)
    return Block(h_in, h_out, pattern[0], mlp_input[0], named["attention input"], named["attention output"],
                 named["MLP input"], named["MLP output"])
