"""Model layer: load a (base, target) pair, find every layer's MLP in any decoder, check a pair is compatible.

One way to reach a model's parts for any architecture (nnterp-style): ``anatomy(model)`` resolves where its family
keeps the decoder blocks, each block's MLP, attention and post-MLP norm, the final norm and the head, validates
them once (an unsupported model is refused there, by name) and caches the result on the model.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# Where decoder families keep their list of blocks, tried in order.
LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
               "model.decoder.layers", "transformer.blocks")
# Where a block keeps its MLP.
MLP_NAMES = ("mlp", "feed_forward", "ffn")


class IncompatiblePairError(ValueError):
    """The base and target models cannot be diffed layer by layer."""


def unwrap(model) -> nn.Module:
    """The torch module inside an nnsight wrapper (or the module itself)."""
    inner = getattr(model, "_module", model)
    if not isinstance(inner, nn.Module):
        raise TypeError(f"expected a torch module or an nnsight model, got {type(model).__name__}")
    return inner


def _get_path(root: nn.Module, path: str):
    for name in path.split("."):
        root = getattr(root, name, None)
        if root is None:
            return None
    return root


ATTENTION_NAMES = ("self_attn", "attn", "attention")
"""Attribute names of a decoder block's attention module (Llama/Qwen/Gemma/Mistral, GPT-2, GPT-NeoX)."""
# Block norms that act on the MLP's output before it joins the residual stream (Gemma 2 and 3's
# ``post_feedforward_layernorm``). Families without one (Qwen2, Llama, Gemma, GPT-2, NeoX) add the MLP's output to
# the residual stream as it is.
POST_MLP_NORM_NAMES = ("post_feedforward_layernorm",)
PLACEMENTS = ("mlp_output", "residual")
"""Where an adapter adds its output: ``"mlp_output"``: to the MLP's output (before any post-MLP norm);
``"residual"``: to the block's residual contribution, after the post-MLP norm (where a block has one; the two
are the same otherwise). docs/real_models.md has the measurement behind the default."""


def is_norm(module: nn.Module) -> bool:
    """A normalisation module, by its class name (RMSNorm, LayerNorm, Gemma3RMSNorm, ...; not the adapters'
    ``PostMLPNorm`` wrapper, which adds an adapter's output after the norm it holds)."""
    name = type(module).__name__
    return "norm" in name.lower() and name != "PostMLPNorm"


def _first_child(block: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if isinstance(getattr(block, name, None), nn.Module)), None)


@dataclass(eq=False)
class Anatomy:
    """A decoder's parts, resolved and validated once per model (``anatomy(model)``) and cached on it; every module
    of the package reaches layers, MLPs, attention, norms and the head through it.

    Modules are read through their names at each access, so swapping a block's MLP (``tdlib.splice``) or wrapping
    its post-MLP norm is seen at once."""

    model: nn.Module
    """The torch module (unwrapped from nnsight)."""
    layers_path: str
    """Dotted path of the decoder block list, e.g. ``"model.layers"``."""
    layers: nn.ModuleList
    mlp_name: str
    """Attribute name of the MLP inside a block (``"mlp"`` for Qwen2, Llama, Gemma, GPT-2, NeoX)."""
    attention_name: str | None
    """Attribute name of the attention inside a block (None for a family with none of ``ATTENTION_NAMES``)."""
    post_mlp_norm_name: str | None
    """Attribute name of the norm a block applies to its MLP's output (Gemma 2 / 3); None for families without."""
    final_norm_name: str | None
    """Dotted name of the last norm outside the blocks (the final norm), None when there is none."""

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def head(self) -> nn.Module:
        """The output embedding (unembedding) module."""
        return self.model.get_output_embeddings()

    @property
    def final_norm(self) -> nn.Module | None:
        return None if self.final_norm_name is None else self.model.get_submodule(self.final_norm_name)

    def block(self, layer: int) -> nn.Module:
        return self.layers[layer]

    def mlp(self, layer: int) -> nn.Module:
        return getattr(self.layers[layer], self.mlp_name)

    def set_mlp(self, layer: int, module: nn.Module) -> None:
        setattr(self.layers[layer], self.mlp_name, module)

    def mlps(self) -> list[nn.Module]:
        return [self.mlp(layer) for layer in range(self.n_layers)]

    def attention(self, layer: int) -> nn.Module:
        if self.attention_name is None:
            raise ValueError(f"cannot find the attention of {type(self.layers[layer]).__name__} (looked for "
                             f"{ATTENTION_NAMES})")
        return getattr(self.layers[layer], self.attention_name)

    def post_mlp_norm(self, layer: int) -> nn.Module | None:
        return None if self.post_mlp_norm_name is None else getattr(self.layers[layer], self.post_mlp_norm_name)

    def mlp_path(self, layer: int) -> str:
        """Dotted path of layer ``layer``'s MLP, e.g. ``"model.layers.3.mlp"`` (the same in nnsight's envoy tree)."""
        return f"{self.layers_path}.{layer}.{self.mlp_name}"

    def block_norms(self, layer: int) -> dict[str, nn.Module]:
        """Layer ``layer``'s own norm modules by dotted name (not those inside its attention or MLP, such as q/k
        norms): which one feeds the attention, the MLP, or acts on their outputs differs by family."""
        inside = {id(m) for child in (self.attention(layer), self.mlp(layer)) for m in child.modules()}
        return {name: m for name, m in self.layers[layer].named_modules() if is_norm(m) and id(m) not in inside}

    def outer_norms(self) -> dict[str, nn.Module]:
        """Norm modules outside the decoder blocks, by dotted name (the last is the final norm)."""
        return _outer_norms(self.model, self.layers)


def _outer_norms(inner: nn.Module, layers: nn.ModuleList) -> dict[str, nn.Module]:
    inside = {id(m) for m in layers.modules()}
    return {name: m for name, m in inner.named_modules() if is_norm(m) and id(m) not in inside}


def _resolve_anatomy(inner: nn.Module) -> Anatomy:
    architecture = type(inner).__name__
    path = next((p for p in LAYER_PATHS if isinstance(_get_path(inner, p), nn.ModuleList)), None)
    if path is None:
        raise ValueError(f"cannot find the decoder layers of {architecture}: none of {LAYER_PATHS} is a "
                         "ModuleList; add this architecture's path to tdlib.models.LAYER_PATHS")
    layers = _get_path(inner, path)
    if len(layers) == 0:
        raise ValueError(f"{architecture} has no decoder layers at {path}")
    block = layers[0]
    mlp = _first_child(block, MLP_NAMES)
    if mlp is None:
        raise ValueError(f"cannot find the MLP of {type(block).__name__} ({architecture}); add its attribute name "
                         "to tdlib.models.MLP_NAMES")
    outer_norms = list(_outer_norms(inner, layers))
    return Anatomy(inner, path, layers, mlp, _first_child(block, ATTENTION_NAMES),
                   _first_child(block, POST_MLP_NORM_NAMES), outer_norms[-1] if outer_norms else None)


def anatomy(model) -> Anatomy:
    """The model's ``Anatomy`` (resolved at the first call and cached on the module; an ``Anatomy`` is returned as
    it is, so a function can take either); a ``ValueError`` naming the architecture and the missing part for a model
    the package does not support."""
    if isinstance(model, Anatomy):
        return model
    inner = unwrap(model)
    cached = inner.__dict__.get("_tdlib_anatomy")
    if cached is None or cached.model is not inner:  # a deep copy carries its original's cache
        cached = _resolve_anatomy(inner)
        inner.__dict__["_tdlib_anatomy"] = cached
    return cached


def default_placement(model) -> str:
    """The adapter placement for this architecture: ``"mlp_output"`` (the paper's) for every family. In blocks with a
    post-MLP norm (Gemma 2 / 3) it was measured against ``"residual"`` on real Gemma 3 270M weights at notebook 01's
    settings (``scripts/measure_placement.py --config gemma3``, docs/real_models.md "Adapter placement"): at the
    same L1 weight and a similar L0 its held-out KL was six times lower, with a training KL that rose only 14%
    above its start in the first steps."""
    return "mlp_output"


def mlp_envoy(model, layer: int):
    """Layer ``layer``'s MLP in an nnsight model's envoy tree (read ``.input`` / ``.output`` inside a trace)."""
    envoy = model
    for name in anatomy(model).mlp_path(layer).split("."):
        envoy = envoy[int(name)] if name.isdigit() else getattr(envoy, name)
    return envoy


# ----------------------------------------------------------------------------------------------- loading

def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None


def load_tokenizer(name_or_path: str):
    """The model's tokenizer; a folder that names ``PreTrainedTokenizerFast`` is loaded as exactly that
    (AutoTokenizer would substitute the architecture's own tokenizer class, see docs/stack_notes.md)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = Path(name_or_path) / "tokenizer_config.json"
    if config_file.exists() and json.loads(config_file.read_text()).get("tokenizer_class") == "PreTrainedTokenizerFast":
        return PreTrainedTokenizerFast.from_pretrained(name_or_path)
    return AutoTokenizer.from_pretrained(name_or_path)


def load_hf(name_or_path: str, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """A plain transformers ``(model, tokenizer)`` from a local folder or a hub id (e.g. ``Qwen/Qwen2.5-Math-7B``)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar per load drowns notebook output; loads here are quick
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_torch_dtype(dtype), device_map=device)
    return model.eval(), load_tokenizer(name_or_path)


def load_model(name_or_path, *, dtype: str | torch.dtype = "float32", device: str = "cpu", remote: bool = False,
               tokenizer=None, dispatch: bool = True):
    """An nnsight ``LanguageModel`` from a local folder, a hub id, or an already built transformers model.

    ``remote=True`` builds the NDIF-backed object (no weights are loaded here); NDIF serves models by hub id,
    so a local folder cannot run remotely.
    """
    from nnsight import LanguageModel

    if remote:
        if isinstance(name_or_path, nn.Module) or Path(str(name_or_path)).exists():
            raise ValueError("remote=True needs a hub id that NDIF hosts (e.g. 'deepseek-ai/DeepSeek-R1-Distill-"
                             "Qwen-7B'); a local folder or in-memory model can only run locally")
        return LanguageModel(name_or_path)
    if tokenizer is None:
        if isinstance(name_or_path, nn.Module):
            raise ValueError("wrapping an in-memory model needs its tokenizer: load_model(model, tokenizer=tok)")
        tokenizer = load_tokenizer(name_or_path)
    kwargs = {} if isinstance(name_or_path, nn.Module) else {
        "dtype": _torch_dtype(dtype), "device_map": device, "dispatch": dispatch}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LanguageModel is deprecated")
        return LanguageModel(name_or_path, tokenizer=tokenizer, **kwargs)


# ----------------------------------------------------------------------------------------- compatibility

def _mlp_shapes(model, layer: int) -> dict[str, tuple]:
    return {name: tuple(p.shape) for name, p in anatomy(model).mlp(layer).named_parameters()}


def check_compatible(base, target, base_tokenizer=None, target_tokenizer=None) -> None:
    """Raise ``IncompatiblePairError`` naming the first property that differs between the two models."""
    base_inner, target_inner = unwrap(base), unwrap(target)

    def differ(what, base_value, target_value, hint):
        raise IncompatiblePairError(
            f"base and target differ in {what}: base has {base_value}, target has {target_value}. {hint}")

    pairs_of_same_family = "Transcoder adapters need a fine-tune and the model it was fine-tuned from."
    if type(base_inner).__name__ != type(target_inner).__name__:
        differ("architecture", type(base_inner).__name__, type(target_inner).__name__, pairs_of_same_family)
    base_layers, target_layers = anatomy(base_inner).n_layers, anatomy(target_inner).n_layers
    if base_layers != target_layers:
        differ("number of layers", base_layers, target_layers, pairs_of_same_family)
    base_hidden, target_hidden = base_inner.config.hidden_size, target_inner.config.hidden_size
    if base_hidden != target_hidden:
        differ("hidden size", base_hidden, target_hidden, pairs_of_same_family)
    for layer in range(base_layers):
        base_shapes, target_shapes = _mlp_shapes(base_inner, layer), _mlp_shapes(target_inner, layer)
        if base_shapes != target_shapes:
            differ(f"layer {layer} MLP parameter shapes", base_shapes, target_shapes, pairs_of_same_family)
    base_vocab, target_vocab = base_inner.config.vocab_size, target_inner.config.vocab_size
    if base_vocab != target_vocab:
        differ("vocabulary size", base_vocab, target_vocab, "Both models must share one tokenizer.")
    if base_tokenizer is not None and target_tokenizer is not None and \
            base_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        differ("tokenizer vocabulary", f"{len(base_tokenizer)} tokens", f"{len(target_tokenizer)} tokens",
               "Both models must share one tokenizer.")
