"""The transcoder adapter: a sparse branch beside the base MLP that learns what fine-tuning changed.

    mlp_out(x) = base_mlp(x) + W_dec · relu(W_enc · x + b_enc) + b_dec

W_dec starts at zero, so a fresh adapter is a no-op. Feature activations pass through the ``features``
submodule (an identity), so nnsight sees them as ``...mlp.adapter.features.output`` and can read or edit them.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .models import PLACEMENTS, anatomy, default_placement, unwrap
from .results import atomic_directory

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"


@dataclass
class AdapterConfig:
    """Shape of one layer's adapter."""

    d_model: int
    """Width of the MLP input and output (the model's hidden size)."""
    n_features: int
    """Number of sparse features (the paper: 8192 per layer for a 3584-wide model)."""

    def __post_init__(self):
        for name in ("d_model", "n_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AdapterConfig.{name} must be a positive integer, got {value!r}")


class AdapterOutput(NamedTuple):
    out: torch.Tensor
    """What the adapter adds to the MLP output, shape [..., d_model]."""
    acts: torch.Tensor
    """Feature activations (non-negative), shape [..., n_features]."""


class TranscoderAdapter(nn.Module):
    def __init__(self, config: AdapterConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        bound = 1 / math.sqrt(config.d_model)
        self.W_enc = nn.Parameter(torch.empty(config.n_features, config.d_model).uniform_(-bound, bound,
                                                                                           generator=generator))
        self.b_enc = nn.Parameter(torch.zeros(config.n_features))
        self.W_dec = nn.Parameter(torch.zeros(config.d_model, config.n_features))
        self.b_dec = nn.Parameter(torch.zeros(config.d_model))
        self.features = nn.Identity()  # hook point: nnsight reads/edits activations at .features.output

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W_enc.T + self.b_enc)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec.T + self.b_dec

    def forward(self, x: torch.Tensor) -> AdapterOutput:
        acts = self.features(self.encode(x))
        return AdapterOutput(self.decode(acts), acts)

    def decoder_norms(self) -> torch.Tensor:
        """L2 norm of each feature's decoder column, shape [n_features] (weights the L1 penalty)."""
        return self.W_dec.norm(dim=0)


class AdapterSet(nn.Module):
    """One adapter per layer; ``layers`` says which layers have one (others keep the plain base MLP)."""

    def __init__(self, config: AdapterConfig, layers: list[int], meta: dict | None = None, seed: int = 0):
        super().__init__()
        if len(set(layers)) != len(layers) or any(i < 0 for i in layers):
            raise ValueError(f"adapter layers must be distinct non-negative indices, got {layers}")
        self.config = config
        self.layers = sorted(layers)
        self.meta = dict(meta or {})
        generator = torch.Generator().manual_seed(seed)
        self.adapters = nn.ModuleDict({str(i): TranscoderAdapter(config, generator) for i in self.layers})

    @classmethod
    def for_model(cls, model, n_features: int, layers: list[int] | None = None, **kw) -> "AdapterSet":
        """Adapters shaped for ``model`` (a transformers model or an nnsight wrapper); all layers by default.
        ``meta["placement"]`` records where they add their output (``tdlib.models.default_placement`` unless
        given); ``tdlib.splice.attach_adapters`` honours it."""
        inner = unwrap(model)
        n_layers = anatomy(inner).n_layers
        config = AdapterConfig(d_model=inner.config.hidden_size, n_features=n_features)
        meta = {"placement": default_placement(inner), **dict(kw.pop("meta", None) or {})}
        if meta["placement"] not in PLACEMENTS:
            raise ValueError(f"unknown adapter placement {meta['placement']!r}; use one of {PLACEMENTS}")
        return cls(config, list(range(n_layers)) if layers is None else layers, meta=meta, **kw)

    def __getitem__(self, layer: int) -> TranscoderAdapter | None:
        return self.adapters[str(layer)] if str(layer) in self.adapters else None

    def __contains__(self, layer: int) -> bool:
        return str(layer) in self.adapters

    def save(self, directory: str | Path) -> Path:
        """Write ``adapter_config.json`` + ``adapters.safetensors``; the folder appears only when complete."""
        directory = Path(directory)
        with atomic_directory(directory) as staging:
            tensors = {name: p.detach().cpu().contiguous() for name, p in self.adapters.state_dict().items()}
            save_file(tensors, staging / WEIGHTS_FILE)
            config = {"config": asdict(self.config), "layers": self.layers, "meta": self.meta}
            (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> "AdapterSet":
        directory = Path(directory)
        if not (directory / CONFIG_FILE).exists() or not (directory / WEIGHTS_FILE).exists():
            raise FileNotFoundError(
                f"no adapter checkpoint in {directory} (expected {CONFIG_FILE} and {WEIGHTS_FILE}); "
                "train one first (notebooks/01_train.ipynb) or check the path")
        try:
            saved = json.loads((directory / CONFIG_FILE).read_text())
            adapters = cls(AdapterConfig(**saved["config"]), saved["layers"], saved.get("meta"))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{directory / CONFIG_FILE} cannot be read ({type(error).__name__}: {error}): the "
                             "adapter checkpoint is damaged; save it again or retrain it") from None
        try:
            tensors = load_file(directory / WEIGHTS_FILE)
        except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError for a truncated file
            raise ValueError(f"{directory / WEIGHTS_FILE} cannot be read ({type(error).__name__}: {error}): the "
                             "adapter checkpoint is damaged (an interrupted copy?); save it again or retrain "
                             "it") from None
        adapters.adapters.load_state_dict(tensors)
        return adapters.to(device=device, dtype=dtype) if dtype else adapters.to(device)
