"""The built-in model organism of reasoning distillation (its design: docs/method.md, section 6).

A small Qwen2 ``base`` that answers chained-arithmetic problems directly, and a ``target`` fine-tuned from it
on step-by-step traces with hesitation ("wait") + re-check segments whenever a running total goes negative.
"""
from .build import CONFIGS, OrganismConfig, OrganismPaths, TrainPhase, build_pair, eval_problems, get_config
from .task import Problem

__all__ = ["CONFIGS", "OrganismConfig", "OrganismPaths", "TrainPhase", "Problem", "build_pair",
           "eval_problems", "get_config"]
