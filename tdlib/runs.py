"""Trained runs on disk and the named models every notebook loads.

Each run lives in its own folder ``artifacts/train/<pair key>/<run name>/``: ``checkpoint.pt`` while training
(an interrupted run resumes from it; deleted once the run is finished), ``log.csv``, the final weights
(``adapters/`` as safetensors + JSON, or ``base_mlps.safetensors`` for the dense skyline) and ``run.json``, written
last, which marks the run finished (``write_run_info``; ``tdlib.sweep`` and ``tdlib.distributed`` train runs).

Every later stage gets a model by name with ``load_named(pair, name)``: ``"base"``, ``"target"``,
``"hybrid"`` or a run name from the sweep (``"adapter_l1_0.001"``, ``"mlp_finetune"``, ``"local_mse"``).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from .adapter import AdapterSet
from .models import load_hf
from .pairs import Pair
from .results import atomic_write_text
from .splice import set_mlp_choice, splice, spliced_mlps
from .train import TrainConfig, TrainResult, config_from_dict, training_identity

RUN_FILE = "run.json"
BASE_MLPS_FILE = "base_mlps.safetensors"
REFERENCE_MODELS = ("base", "target", "hybrid")


def train_root(pair: Pair) -> Path:
    return pair.artifacts("train")


def run_dir(pair: Pair, name: str, root: Path | None = None) -> Path:
    return Path(root or train_root(pair)) / name


def spliced_target(pair: Pair, adapters: AdapterSet | None = None):
    """The target spliced with the base's MLPs (all layers start as "target"), on the pair's device."""
    base, _ = load_hf(pair.base, pair.dtype, pair.device)
    target, _ = load_hf(pair.target, pair.dtype, pair.device)
    model = splice(target, base, adapters)
    del base
    return model


class DamagedRunError(RuntimeError):
    """A run folder whose files cannot be read (a truncated weights file, an unreadable run.json): the message
    names the file and the fix. ``train_run`` retrains such a run; loading one raises this."""


def damaged(path: Path, error: BaseException) -> DamagedRunError:
    directory = Path(path).parent if Path(path).name in (RUN_FILE, BASE_MLPS_FILE, "checkpoint.pt") else \
        Path(path).parent.parent
    return DamagedRunError(
        f"{path} cannot be read ({type(error).__name__}: {error}); the run folder {directory} is damaged (an "
        f"interrupted copy or a full disk?). Delete it (rm -r '{directory}') and run notebook 01 again (make "
        "figures), which trains it anew; train_run retrains a damaged run by itself")


def read_run(directory: Path) -> dict | None:
    """The run.json of a finished run; None when the run has not finished (no run.json). An unreadable run.json
    raises ``DamagedRunError`` naming the file and the fix."""
    path = Path(directory) / RUN_FILE
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
        missing = {"name", "kind", "train_config"} - set(info if isinstance(info, dict) else ())
        if missing:
            raise ValueError(f"no {sorted(missing)} in it")
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise damaged(path, error) from None
    return info


def write_run_info(directory: Path, pair: Pair, name: str, config: TrainConfig, result: TrainResult,
                   seconds: float, **extra) -> None:
    """Write a finished run's ``run.json`` (what ``read_run`` and ``load_named`` read), atomically."""
    since_fired = {str(k): v.tolist() for k, v in result.tokens_since_fired.items()}
    atomic_write_text(directory / RUN_FILE, json.dumps({
        "name": name, "kind": config.kind, "pair": pair.name, "train_config": asdict(config),
        "train_seconds": round(seconds, 1), "tokens_since_fired": since_fired, **extra}))


def checkpoint_is_stale(directory: Path, config: TrainConfig) -> bool:
    """Whether ``directory`` holds an interrupted run's checkpoint trained with another identity than ``config``
    (``tdlib.train.training_identity``); a checkpoint that cannot be read raises ``DamagedRunError``."""
    checkpoint = directory / "checkpoint.pt"
    if not checkpoint.exists():
        return False
    try:
        saved = torch.load(checkpoint, weights_only=False)["config"]
    except Exception as error:  # noqa: BLE001 - a truncated pickle raises many kinds; all mean "damaged"
        raise damaged(checkpoint, error) from None
    return training_identity(saved) != training_identity(config)


def trained_runs(pair: Pair, root: Path | None = None) -> dict[str, dict]:
    """Finished runs of this pair: {name: run.json contents}."""
    root = Path(root or train_root(pair))
    runs = {}
    for directory in sorted(root.glob("*/")) if root.exists() else []:
        info = read_run(directory)
        if info is not None:
            runs[info["name"]] = info
    return runs


def load_named(pair: Pair, name: str, root: Path | None = None):
    """A model of this pair by name, ready to run (eval mode, on the pair's device).

    ``"base"`` and ``"target"`` are the plain models; ``"hybrid"`` and every trained run are the spliced target
    with the matching MLP choice set (so ``tdlib.splice.mlp_choice`` can switch it, e.g. to bridges).
    """
    if name in ("base", "target"):
        return load_hf(pair.base if name == "base" else pair.target, pair.dtype, pair.device)[0]
    if name == "hybrid":
        model = spliced_target(pair)
        set_mlp_choice(model, "base")
        return model.eval()
    directory = run_dir(pair, name, root)
    info = read_run(directory)
    if info is None:
        known = sorted(trained_runs(pair, root))
        raise FileNotFoundError(
            f"no finished run {name!r} in {directory.parent} (finished runs: {known or 'none'}); "
            "run notebooks/01_train.ipynb first (make figures), or pick one of " + ", ".join(REFERENCE_MODELS))
    config = config_from_dict(info["train_config"])
    if config.kind == "mlp_finetune":
        model = spliced_target(pair)
        state = _read_weights(directory / BASE_MLPS_FILE)
        try:
            for i, mlp in enumerate(spliced_mlps(model)):
                prefix = f"{i}."
                mlp.base_mlp.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        except RuntimeError as error:  # missing or misshapen tensors
            raise damaged(directory / BASE_MLPS_FILE, error) from None
    else:
        model = spliced_target(pair, _read_adapters(directory))
    set_mlp_choice(model, config.replacement)
    return model.eval()


def _read_weights(path: Path) -> dict:
    try:
        return load_file(path)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError)
        raise damaged(path, error) from None


def _read_adapters(directory: Path) -> AdapterSet:
    try:
        return AdapterSet.load(directory / "adapters")
    except Exception as error:  # noqa: BLE001 - a truncated file, bad JSON or a shape mismatch: all "damaged"
        raise damaged(directory / "adapters" / "adapters.safetensors", error) from None


def load_adapters(pair: Pair, name: str, root: Path | None = None) -> AdapterSet:
    """Only the adapter weights of a finished run."""
    directory = run_dir(pair, name, root)
    if read_run(directory) is None:
        raise FileNotFoundError(f"no finished run {name!r} in {directory.parent}; run notebooks/01_train.ipynb")
    return _read_adapters(directory)


def read_log(pair: Pair, name: str, root: Path | None = None):
    import pandas as pd

    return pd.read_csv(run_dir(pair, name, root) / "log.csv")
