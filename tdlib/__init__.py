"""tdlib: transcoder adapters for model diffing (README.md, docs/method.md).

The main entry points, importable from the package (each is loaded on first use, so ``import tdlib`` stays cheap):

* pairs and models: ``resolve_pair`` (a configuration name or pair file), ``load_model`` (an nnsight model),
  ``load_named`` (base, target, hybrid or a trained run of a pair), ``spliced_target``;
* splicing: ``splice_pair`` (``tdlib.splice.splice``: give the target the choice target / base / base + adapter),
  ``mlp_choice``, ``AdapterSet``;
* training: ``TrainConfig``, ``train_adapters`` (``tdlib.train.train``);
* analysis: ``evaluate_replacement`` (held-out KL and L0), ``attribute`` (an attribution graph), ``run_pipeline``
  (the numbered notebooks).

``splice`` and ``train`` are also module names (``tdlib.splice``, ``tdlib.train``), so the package exports their
main functions as ``splice_pair`` and ``train_adapters`` rather than under a second meaning of the same name.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "resolve_pair": ("pairs", "resolve_pair"),
    "load_model": ("models", "load_model"),
    "load_named": ("runs", "load_named"),
    "spliced_target": ("runs", "spliced_target"),
    "splice_pair": ("splice", "splice"),
    "mlp_choice": ("splice", "mlp_choice"),
    "AdapterSet": ("adapter", "AdapterSet"),
    "TrainConfig": ("train", "TrainConfig"),
    "train_adapters": ("train", "train"),
    "evaluate_replacement": ("faithfulness", "evaluate_replacement"),
    "attribute": ("attribution", "attribute"),
    "run_pipeline": ("pipeline", "run_pipeline"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tdlib' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})
