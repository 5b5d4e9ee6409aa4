"""Autointerp (notebook 04; docs/method.md, section 4): explain and score adapter features and target MLP neurons.

* ``cache``: stream held-out text, keep per unit the top, uniformly sampled and non-activating contexts;
* ``backends``: explainer/scorer/judge behind one interface: ``OfflineBackend`` (token patterns, no LLM) and
  ``LLMBackend`` (any OpenAI-compatible chat API, concurrent, retried, cached);
* ``scoring``: detection balanced accuracy on held-out top and uniformly sampled contexts;
* ``classify``: language / domain / reasoning / uninterpretable, and the organism's ground-truth check;
* ``page``: a static HTML feature browser;
* ``segments``: the segment scheme tokens are labelled with (organism traces label theirs: the ground truth);
* ``run``: notebook 04's steps.
"""
import importlib

from .backends import LLMBackend, LLMConfig, OfflineBackend, make_backend
from .cache import ActivationCache, CacheConfig, build_cache, stream_batches
from .segments import ADDED_BY_DISTILLATION, SEGMENTS

_NEEDS_PANDAS = {"category_shares": "classify", "classify_units": "classify", "ground_truth_check": "classify",
                 "logit_effects": "page", "write_feature_page": "page", "ScoringConfig": "scoring",
                 "detection_figure": "scoring", "score_units": "scoring", "summarize_detection": "scoring"}
"""Names from the modules that import pandas, loaded on first use: ``tdlib.attribution`` imports ``backends`` (and
so this package), and must import where only torch and transformers are installed (scripts/gpu_acceptance.py)."""


def __getattr__(name):
    if name in _NEEDS_PANDAS:
        return getattr(importlib.import_module(f".{_NEEDS_PANDAS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ADDED_BY_DISTILLATION", "SEGMENTS", "ActivationCache", "CacheConfig", "LLMBackend", "LLMConfig",
           "OfflineBackend", "ScoringConfig", "build_cache", "category_shares", "classify_units", "detection_figure",
           "ground_truth_check", "logit_effects", "make_backend", "score_units",
           "stream_batches", "summarize_detection", "write_feature_page"]
