"""Train, store and load the replacement models of one (base, target) pair; what notebook 01 calls.

Each run lives in its own folder ``artifacts/train/<pair key>/<run name>/``: ``checkpoint.pt`` while training
(an interrupted run resumes from it; deleted once the run is finished), ``log.csv``, the final weights
(``adapters/`` as safetensors + JSON, or ``base_mlps.safetensors`` for the dense skyline) and ``run.json``, written
last, which marks the run finished.
``train_run`` on a finished run with the same config loads it instead of training.

Later notebooks get any model by name with ``load_named(pair, name)``: ``"base"``, ``"target"``,
``"hybrid"`` or a run name from the sweep (``"adapter_l1_0.001"``, ``"mlp_finetune"``, ``"local_mse"``).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from .adapter import AdapterSet
from .models import load_hf
from .pairs import Pair
from .results import atomic_write_text
from .splice import attach_adapters, set_mlp_choice, splice, spliced_mlps
from .train import TrainConfig, TrainResult, config_from_dict, train, training_identity

RUN_FILE = "run.json"
BASE_MLPS_FILE = "base_mlps.safetensors"
REFERENCE_MODELS = ("base", "target", "hybrid")


@dataclass(frozen=True)
class RunSpec:
    """One model of the sweep: a name and its training config."""

    name: str
    config: TrainConfig


def adapter_run_name(l1_weight: float) -> str:
    return f"adapter_l1_{l1_weight:g}"


def sweep_specs(l1_weights, base: TrainConfig, baselines: bool = True) -> list[RunSpec]:
    """Adapters at each ``l1_weight`` plus the dense MLP fine-tune skyline and the local-MSE transcoder, all
    sharing ``base``'s data budget (steps, batch size, seed). The local-MSE baseline uses the middle l1_weight."""
    l1_weights = sorted(l1_weights, reverse=True)
    if not l1_weights:
        raise ValueError("the sweep needs at least one l1_weight")
    shared = {k: v for k, v in asdict(base).items() if k not in ("kind", "l1_weight")}
    specs = [RunSpec(adapter_run_name(w), TrainConfig(kind="adapter", l1_weight=w, **shared)) for w in l1_weights]
    if baselines:
        specs.append(RunSpec("mlp_finetune", TrainConfig(kind="mlp_finetune", l1_weight=0.0, **shared)))
        middle = l1_weights[len(l1_weights) // 2]
        specs.append(RunSpec("local_mse", TrainConfig(kind="local_mse", l1_weight=middle, **shared)))
    return specs


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


def train_run(pair: Pair, spec: RunSpec, data, root: Path | None = None, progress: bool = True):
    """Train (or load when finished, or resume when interrupted) one run; returns (spliced model, TrainResult or
    None when loaded). A finished run whose config differs from ``spec`` is stale and trained again; fields that
    only change memory (``tdlib.train.MEMORY_FIELDS``) do not count."""
    directory = run_dir(pair, spec.name, root)
    try:
        finished = read_run(directory)
        if finished is not None and training_identity(finished["train_config"]) == training_identity(spec.config):
            return load_named(pair, spec.name, root), None
        stale = finished is not None or _stale_checkpoint(directory, spec.config)
    except DamagedRunError as error:
        print(f"[sweep] {spec.name}: {error}. Training it again")
        stale = True
    if stale:
        print(f"[sweep] {spec.name}: {directory} holds a different or damaged run; training it again")
        shutil.rmtree(directory)
    adapters = None
    model = spliced_target(pair)
    if spec.config.kind != "mlp_finetune":
        adapters = AdapterSet.for_model(model, spec.config.n_features, seed=spec.config.seed,
                                        meta={"run": spec.name, "train_config": asdict(spec.config)})
        attach_adapters(model, adapters)
    started = time.time()
    result: TrainResult = train(model, data, spec.config, directory, progress=progress)
    if adapters is not None:
        adapters.save(directory / "adapters")
    else:
        state = {f"{i}.{name}": p.detach().cpu().contiguous()
                 for i, mlp in enumerate(spliced_mlps(model)) for name, p in mlp.base_mlp.state_dict().items()}
        save_file(state, directory / BASE_MLPS_FILE)
    since_fired = {str(k): v.tolist() for k, v in result.tokens_since_fired.items()}
    atomic_write_text(directory / RUN_FILE, json.dumps({
        "name": spec.name, "kind": spec.config.kind, "pair": pair.name, "train_config": asdict(spec.config),
        "train_seconds": round(time.time() - started, 1), "tokens_since_fired": since_fired}))
    # finished: later notebooks need the weights and run.json, not the optimiser state (2x the weights, in fp32)
    (directory / "checkpoint.pt").unlink(missing_ok=True)
    set_mlp_choice(model, spec.config.replacement)
    return model, result


def _stale_checkpoint(directory: Path, config: TrainConfig) -> bool:
    import torch

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


# --------------------------------------------------------------------------------------------- the sweep

@dataclass(frozen=True)
class SweepPlan:
    """What notebook 01 trains for one pair: adapters at several sparsities plus the two trained baselines."""

    l1_weights: tuple[float, ...]
    """The sparsity knob; one adapter per value."""
    base: TrainConfig
    """Shared settings (features, steps, batch size, lr, loss weights, seed) of every run."""
    n_validation_batches: int = 8
    """Held-out batches (of ``base.batch_size`` sequences) for the final metrics."""
    baselines: bool = True
    """Also train the dense MLP fine-tune skyline and the local-MSE transcoder. The skyline trains every base MLP
    (5.7e9 parameters on the 7B pair: 68 GB of fp32 gradients and AdamW states), so a one-GPU 7B run sets False."""

    def __post_init__(self):
        if not self.l1_weights or any(w <= 0 for w in self.l1_weights):
            raise ValueError(f"SweepPlan.l1_weights must be positive values, got {self.l1_weights}")
        if self.n_validation_batches < 1:
            raise ValueError("SweepPlan.n_validation_batches must be >= 1")

    @property
    def specs(self) -> list[RunSpec]:
        return sweep_specs(self.l1_weights, self.base, self.baselines)


# Per-configuration defaults. The organism's hybrid is far from its target (KL ~8.6 nats/token), so its adapters
# need ~100x the paper's L1 weights for the same L0: in 300-step trials l1 0.01 gave L0 ~60 and 0.1 gave ~33.
# This range spans L0 ~0.4 to ~45 (results/01_train.json). Smoke only exercises every code path in seconds.
DEFAULT_PLANS = {
    "organism": SweepPlan(l1_weights=(3.0, 1.0, 0.3, 0.1, 0.03, 0.01),
                          base=TrainConfig(n_features=512, steps=600, batch_size=16, lr=3e-3,
                                           dead_after_tokens=100_000)),
    "smoke": SweepPlan(l1_weights=(1e-2, 1e-3), base=TrainConfig(n_features=64, steps=20, batch_size=8,
                                                                 dead_after_tokens=2_000),
                       n_validation_batches=2),
}


def default_plan(pair: Pair, n_validation_batches: int = 8) -> SweepPlan:
    """The organism's measured plan (``DEFAULT_PLANS``), or for a hub pair one built from its training defaults
    (``tdlib.pairs.TrainingDefaults``: the paper's L1 sweep and optimiser unless the pair file says otherwise)."""
    if pair.name in DEFAULT_PLANS:
        return DEFAULT_PLANS[pair.name]
    if pair.hub is None:
        raise ValueError(f"no default sweep for {pair.name!r}; pass a SweepPlan (known: {sorted(DEFAULT_PLANS)})")
    training = pair.hub.training
    return SweepPlan(l1_weights=tuple(training.l1_weights), base=training.train_config(),
                     n_validation_batches=n_validation_batches)


def run_sweep(pair: Pair, plan: SweepPlan, data, progress: bool = True) -> dict[str, object]:
    """Train (or load) every run of ``plan``; returns {name: TrainResult or None when loaded from disk}."""
    results = {}
    for spec in plan.specs:
        _, results[spec.name] = train_run(pair, spec, data, progress=progress)
    return results


def read_log(pair: Pair, name: str, root: Path | None = None):
    import pandas as pd

    return pd.read_csv(run_dir(pair, name, root) / "log.csv")


def evaluate_sweep(pair: Pair, names: list[str], batches: list[dict], root: Path | None = None) -> dict[str, dict]:
    """Held-out metrics for the hybrid and every named run, in the 01_train.json ``models`` schema."""
    from .metrics import evaluate_replacement
    from .splice import get_mlp_choice
    from .train import run_dead_features

    models = {}
    for name in ["hybrid", *names]:
        model = load_named(pair, name, root)
        choice = get_mlp_choice(model)[0]
        metrics = evaluate_replacement(model, batches, choice)
        info = read_run(run_dir(pair, name, root)) if name != "hybrid" else None
        config = info["train_config"] if info else None
        dead = run_dead_features(run_dir(pair, name, root), info) if info else {}
        models[name] = {
            "kind": config["kind"] if config else "hybrid",
            "l1_weight": config["l1_weight"] if config and config["kind"] != "mlp_finetune" else None,
            "l0": metrics.get("l0"),
            "kl": metrics["kl"],
            "top1_error": metrics["top1_error"],
            "nmse_layers": metrics["nmse_layers"],
            "nmse_with_embedding": metrics["nmse_with_embedding"],
            "dead_fraction_train": dead.get("dead_fraction_train"),
            "dead_after_tokens": dead.get("dead_after_tokens"),
            "dead_fraction_heldout": metrics.get("dead_fraction_heldout"),
            "l0_by_layer": metrics.get("l0_by_layer"),
            "fvu_by_layer": metrics.get("fvu_by_layer"),
            "fvu_target_inputs_by_layer": metrics.get("fvu_target_inputs_by_layer"),
            "nmse_by_layer": metrics["nmse_by_layer"],
            "n_tokens": metrics["n_tokens"],
            "train_seconds": info["train_seconds"] if info else 0.0,
        }
    return models


def sweep_checks(models: dict) -> dict[str, bool]:
    """The sweep's checks: L0 falls as l1_weight rises, and the middle-sparsity adapter's KL is <= hybrid KL / 10."""
    adapters = sorted((n for n in models if models[n]["kind"] == "adapter"), key=lambda n: models[n]["l1_weight"])
    l0s = [models[n]["l0"] for n in adapters]
    middle = adapters[len(adapters) // 2]
    return {
        "L0 decreases monotonically as l1_weight increases": all(a > b for a, b in zip(l0s, l0s[1:])),
        "middle-sparsity adapter KL <= hybrid KL / 10": models[middle]["kl"] <= models["hybrid"]["kl"] / 10,
    }


def analysis_models(models: dict) -> dict[str, str]:
    """The adapters later notebooks use: the middle sparsity (analysis) and the lowest penalty."""
    adapters = sorted((n for n in models if models[n]["kind"] == "adapter"), key=lambda n: models[n]["l1_weight"])
    return {"analysis_model": adapters[len(adapters) // 2], "lowest_penalty_model": adapters[0]}
