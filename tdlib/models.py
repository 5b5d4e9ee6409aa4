"""Model layer: load a (base, target) pair, find every layer's MLP in any decoder, check a pair is compatible.

One way to reach ``layers[i].mlp`` for any architecture (nnterp-style): ``find_layers`` knows where each
transformers family keeps its decoder blocks, and ``mlp_of`` where the block keeps its MLP.
"""
from __future__ import annotations

import json
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


def layers_path(model) -> str:
    """Dotted path of the decoder block list, e.g. ``"model.layers"``."""
    inner = unwrap(model)
    for path in LAYER_PATHS:
        if isinstance(_get_path(inner, path), nn.ModuleList):
            return path
    raise ValueError(
        f"cannot find the decoder layers of {type(inner).__name__}: none of {LAYER_PATHS} is a ModuleList; "
        "add this architecture's path to tdlib.models.LAYER_PATHS")


def find_layers(model) -> nn.ModuleList:
    return _get_path(unwrap(model), layers_path(model))


ATTENTION_NAMES = ("self_attn", "attn", "attention")
"""Attribute names of a decoder block's attention module (Llama/Qwen/Gemma/Mistral, GPT-2, GPT-NeoX)."""


def attention_name(block: nn.Module) -> str | None:
    """The attribute name of ``block``'s attention module, or None when the block has none of ``ATTENTION_NAMES``."""
    return next((name for name in ATTENTION_NAMES if isinstance(getattr(block, name, None), nn.Module)), None)


def attention_of(block: nn.Module) -> nn.Module:
    """``block``'s attention module; a clear error when it has none of ``ATTENTION_NAMES``."""
    name = attention_name(block)
    if name is None:
        raise ValueError(f"cannot find the attention of {type(block).__name__} (looked for {ATTENTION_NAMES})")
    return getattr(block, name)


def mlp_name(model) -> str:
    """Attribute name of the MLP inside a decoder block (``"mlp"`` for Qwen2, Llama, Gemma, GPT-2, NeoX)."""
    block = find_layers(model)[0]
    for name in MLP_NAMES:
        if isinstance(getattr(block, name, None), nn.Module):
            return name
    raise ValueError(f"cannot find the MLP of {type(block).__name__}; add its attribute name to MLP_NAMES")


# Block norms that act on the MLP's output before it joins the residual stream (Gemma 2 and 3's
# ``post_feedforward_layernorm``). Families without one (Qwen2, Llama, Gemma, GPT-2, NeoX) add the MLP's output to
# the residual stream as it is.
POST_MLP_NORM_NAMES = ("post_feedforward_layernorm",)
PLACEMENTS = ("mlp_output", "residual")
"""Where an adapter adds its output: ``"mlp_output"``: to the MLP's output (before any post-MLP norm);
``"residual"``: to the block's residual contribution, after the post-MLP norm (where a block has one; the two
are the same otherwise). docs/real_models.md has the measurement behind the default."""


def post_mlp_norm_name(model) -> str | None:
    """Attribute name of the norm a block applies to its MLP's output (``None`` when the family has none)."""
    block = find_layers(model)[0]
    for name in POST_MLP_NORM_NAMES:
        if isinstance(getattr(block, name, None), nn.Module):
            return name
    return None


def default_placement(model) -> str:
    """The adapter placement for this architecture: ``"mlp_output"`` (the paper's) for every family. In blocks with a
    post-MLP norm (Gemma 2 / 3) it was measured against ``"residual"`` on real Gemma 3 270M weights at notebook 01's
    settings (``scripts/measure_placement.py --config gemma3``, docs/real_models.md "Adapter placement"): at the
    same L1 weight and a similar L0 its held-out KL was six times lower, with a training KL that rose only 14%
    above its start in the first steps."""
    return "mlp_output"


def mlp_path(model, layer: int) -> str:
    """Dotted path of layer ``layer``'s MLP, e.g. ``"model.layers.3.mlp"`` (the same in nnsight's envoy tree)."""
    return f"{layers_path(model)}.{layer}.{mlp_name(model)}"


def get_mlp(model, layer: int) -> nn.Module:
    return getattr(find_layers(model)[layer], mlp_name(model))


def set_mlp(model, layer: int, module: nn.Module) -> None:
    setattr(find_layers(model)[layer], mlp_name(model), module)


def mlp_envoy(model, layer: int):
    """Layer ``layer``'s MLP in an nnsight model's envoy tree (read ``.input`` / ``.output`` inside a trace)."""
    envoy = model
    for name in mlp_path(model, layer).split("."):
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
    import warnings

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
    return {name: tuple(p.shape) for name, p in get_mlp(model, layer).named_parameters()}


def check_compatible(base, target, base_tokenizer=None, target_tokenizer=None) -> None:
    """Raise ``IncompatiblePairError`` naming the first property that differs between the two models."""
    base_inner, target_inner = unwrap(base), unwrap(target)

    def differ(what, base_value, target_value, hint):
        raise IncompatiblePairError(
            f"base and target differ in {what}: base has {base_value}, target has {target_value}. {hint}")

    pairs_of_same_family = "Transcoder adapters need a fine-tune and the model it was fine-tuned from."
    if type(base_inner).__name__ != type(target_inner).__name__:
        differ("architecture", type(base_inner).__name__, type(target_inner).__name__, pairs_of_same_family)
    base_layers, target_layers = len(find_layers(base_inner)), len(find_layers(target_inner))
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


@dataclass
class ModelPair:
    base: object
    target: object
    tokenizer: object
    base_name: str
    target_name: str


def load_pair(base: str, target: str, *, nnsight: bool = True, **kwargs) -> ModelPair:
    """Load both models (nnsight wrappers by default, plain transformers with ``nnsight=False``) and check them."""
    if nnsight:
        base_model, target_model = load_model(base, **kwargs), load_model(target, **kwargs)
        base_tokenizer, target_tokenizer = base_model.tokenizer, target_model.tokenizer
    else:
        (base_model, base_tokenizer), (target_model, target_tokenizer) = load_hf(base, **kwargs), load_hf(target, **kwargs)
    check_compatible(base_model, target_model, base_tokenizer, target_tokenizer)
    return ModelPair(base_model, target_model, target_tokenizer, str(base), str(target))
