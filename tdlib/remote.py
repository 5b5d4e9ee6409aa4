"""NDIF: run the steps that make sense on a hosted model through nnsight (``remote=True``).

NDIF hosts models by hub id (e.g. ``deepseek-ai/DeepSeek-R1-Distill-Qwen-7B``) and runs the body of an nnsight
trace next to them: the code of the trace is serialised, shipped, run on the server, and only ``.save()``-d
values come back. That fits any step that *reads or nudges one hosted model*:

* ``collect``: logits and activations (each layer's MLP input and output, residual stream);
* ``generate``: greedy generations;
* ``steer``: logits (or generations) with a feature direction added to an MLP's output, e.g. an adapter
  feature's decoder column ``W_dec[:, f]`` scaled by a coefficient (the paper's transfer experiment).

Steps that need our own trainable parameters or a second model's weights inside the hosted model cannot run
there; ``check_remote(step)`` raises ``RemoteNotSupported`` naming the step and why (see ``LOCAL_ONLY``).

Every function takes ``remote``: ``False`` (run locally), ``True`` (ship to NDIF; needs ``NDIF_API_KEY``) or
``"local"`` (nnsight's in-process simulation: serialise, deserialise with the project's modules hidden as on
the server, run -- what the tests use). ``register_project()`` ships tdlib's own code by value with each request
(``nnsight.register``), because tdlib is installed in editable mode here and nnsight would otherwise assume
the server has it.
"""
from __future__ import annotations

import os
import warnings

import torch

from .models import anatomy, load_model, mlp_envoy, unwrap

REMOTE_STEPS = {
    "collect": "logits and activations (MLP inputs/outputs, residuals) of a hosted model",
    "generate": "greedy generation by a hosted model",
    "steer": "adding a feature direction to an MLP output of a hosted model, for logits or generation",
}
LOCAL_ONLY = {
    "train": "training adapters needs gradients on our own adapter parameters inside the model and the base's "
             "MLP weights next to the target's; NDIF runs a hosted model's forward, not an optimiser over "
             "parameters it does not host",
    "splice": "splicing puts the base model's MLP weights (and adapters) into the target; NDIF hosts each model "
              "separately, so no hosted target can run the base's MLPs",
    "hybrid": "the hybrid is the target with the base's MLPs, which is a splice (see 'splice')",
    "adapter_model": "the adapter model runs base MLPs plus our adapters inside the target (see 'splice')",
    "attribution": "attribution graphs need the adapter model's backward pass through the spliced layers and "
                   "our adapters' parameters, which only exist locally",
}


class RemoteNotSupported(RuntimeError):
    """A pipeline step was asked to run on NDIF but cannot."""


def check_remote(step: str) -> None:
    """Raise ``RemoteNotSupported`` for a step that cannot run on NDIF (and for unknown step names)."""
    if step in REMOTE_STEPS:
        return
    if step in LOCAL_ONLY:
        raise RemoteNotSupported(
            f"step {step!r} cannot run on NDIF: {LOCAL_ONLY[step]}. Run it locally (remote=False) on a GPU; "
            f"steps that can run remote: {', '.join(sorted(REMOTE_STEPS))}")
    raise ValueError(f"unknown step {step!r}; remote steps: {sorted(REMOTE_STEPS)}, local-only: {sorted(LOCAL_ONLY)}")


_REGISTERED = False


def register_project() -> None:
    """Ship tdlib's source by value with every NDIF request (``nnsight.register``), once per process."""
    global _REGISTERED
    if _REGISTERED:
        return
    import nnsight

    import tdlib

    nnsight.register(tdlib)
    _REGISTERED = True


def _prepare(remote) -> None:
    if remote not in (False, True, "local"):
        raise ValueError(f"remote must be False, True or 'local', got {remote!r}")
    if remote is True and not os.environ.get("NDIF_API_KEY"):
        from nnsight import CONFIG

        if not CONFIG.API.APIKEY:
            raise RuntimeError("remote=True needs an NDIF API key: export NDIF_API_KEY=... (get one at "
                               "https://login.ndif.us) or call nnsight.CONFIG.set_default_api_key(key)")
        os.environ.setdefault("NDIF_API_KEY", CONFIG.API.APIKEY)
    if remote:
        register_project()


def hosted_model(model_id: str, remote: bool | str = True):
    """An nnsight model for ``model_id``: NDIF-backed (no weights here) for ``remote=True``; for ``"local"`` or
    False, loaded here (a folder or hub id) so the same code runs without a server."""
    _prepare(remote)
    return load_model(model_id, remote=remote is True)


def _trace_kwargs(remote, backend):
    if backend is not None:
        return {"backend": backend}
    return {"remote": remote} if remote else {}


def _layer_output(output):
    return output[0] if isinstance(output, tuple) else output


def collect(model, prompts: list[str], layers: list[int] | None = None,
            sites: tuple[str, ...] = ("mlp_input", "mlp_output", "residual"), remote: bool | str = False,
            backend=None) -> dict[str, torch.Tensor]:
    """Logits and activations for ``prompts`` (left-padded as the tokenizer pads):
    ``{"logits": [B, T, V], "mlp_input.3": [B, T, d], "mlp_output.3": ..., "residual.3": layer 3's output}``."""
    import nnsight

    unknown = set(sites) - {"mlp_input", "mlp_output", "residual"}
    if unknown:
        raise ValueError(f"unknown sites {sorted(unknown)}; use mlp_input, mlp_output, residual")
    check_remote("collect")
    _prepare(remote)
    n_layers = anatomy(model).n_layers
    layers = list(range(n_layers)) if layers is None else sorted(layers)
    if layers and not 0 <= layers[0] <= layers[-1] < n_layers:
        raise ValueError(f"layers must be in 0..{n_layers - 1}, got {layers}")
    envoys = [(layer, mlp_envoy(model, layer), _block_envoy(model, layer)) for layer in layers]
    with torch.no_grad(), model.trace(prompts, **_trace_kwargs(remote, backend)):
        values = nnsight.save({})
        for layer, mlp, block in envoys:  # module values are requested in execution order
            if "mlp_input" in sites:
                values[f"mlp_input.{layer}"] = mlp.input
            if "mlp_output" in sites:
                values[f"mlp_output.{layer}"] = mlp.output
            if "residual" in sites:
                values[f"residual.{layer}"] = _layer_output(block.output)
        values["logits"] = model.output.logits
    return dict(values)


def _block_envoy(model, layer: int):
    envoy = model
    for name in anatomy(model).layers_path.split("."):
        envoy = getattr(envoy, name)
    return envoy[layer]


def add_direction(output: torch.Tensor, direction: torch.Tensor, scale: float) -> torch.Tensor:
    """``output + scale * direction`` at every position (the steering edit; runs inside the trace)."""
    return output + scale * direction.to(device=output.device, dtype=output.dtype)


def steer(model, prompts: list[str], layer: int, direction: torch.Tensor, scale: float = 1.0,
          remote: bool | str = False, backend=None) -> torch.Tensor:
    """Logits when ``scale * direction`` is added to layer ``layer``'s MLP output (e.g. an adapter feature's
    decoder column); ``direction`` has the model's hidden size."""
    check_remote("steer")
    direction = _check_direction(model, layer, direction)
    _prepare(remote)
    mlp = mlp_envoy(model, layer)
    with torch.no_grad(), model.trace(prompts, **_trace_kwargs(remote, backend)):
        mlp.output = add_direction(mlp.output, direction, scale)
        logits = model.output.logits.save()
    return logits


def generate(model, prompts: list[str], max_new_tokens: int = 64, steering: tuple | None = None,
             remote: bool | str = False, backend=None) -> torch.Tensor:
    """Greedy generations (prompt + completion token ids, left-padded). ``steering=(layer, direction, scale)``
    adds the direction to that MLP's output at every generated step."""
    check_remote("generate")
    if steering is not None:
        check_remote("steer")
        layer, direction, scale = steering
        steering = (layer, _check_direction(model, layer, direction), float(scale))
    _prepare(remote)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was never reached")
        return _generate(model, prompts, max_new_tokens, steering, remote, backend)


def _generate(model, prompts, max_new_tokens, steering, remote, backend):
    if steering is not None:
        layer, direction, scale = steering
    with torch.no_grad(), model.generate(max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=model.tokenizer.pad_token_id,
                                         **_trace_kwargs(remote, backend)) as tracer:
        with tracer.invoke(prompts):
            if steering is not None:
                mlp = mlp_envoy(model, layer)
                for _ in tracer.iter[:]:  # open-ended: nnsight warns that the step after the last is not reached
                    mlp.output = add_direction(mlp.output, direction, scale)
        with tracer.invoke():  # code after an open-ended iter loop does not run: read the result here
            ids = tracer.result.save()
    return ids


def _check_direction(model, layer: int, direction) -> torch.Tensor:
    n_layers = anatomy(model).n_layers
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must be in 0..{n_layers - 1}, got {layer}")
    direction = torch.as_tensor(direction).detach().cpu()
    hidden = unwrap(model).config.hidden_size
    if direction.shape != (hidden,):
        raise ValueError(f"direction must have shape ({hidden},) (the hidden size), got {tuple(direction.shape)}")
    return direction


def feature_direction(adapters, layer: int, feature: int) -> torch.Tensor:
    """Adapter feature ``feature``'s decoder column at ``layer``: what it adds to the MLP output per unit of
    activation (the vector to steer with)."""
    adapter = adapters[layer]
    if adapter is None:
        raise ValueError(f"the adapter set has no adapter at layer {layer}")
    if not 0 <= feature < adapter.config.n_features:
        raise ValueError(f"feature must be in 0..{adapter.config.n_features - 1}, got {feature}")
    return adapter.W_dec[:, feature].detach().cpu().clone()


# ------------------------------------------------------------------------------------- offline requests

class RequestBuilt(Exception):
    """Raised by ``OfflineBackend`` once the request is built: carries it and its serialised payload."""

    def __init__(self, request, payload: bytes):
        super().__init__(f"NDIF request for {request.model_key!r} built ({len(payload):,} bytes); not sent")
        self.request, self.payload = request, payload


def offline_backend(model_key: str):
    """nnsight's NDIF backend with the network call replaced: it builds the request envelope and serialises the
    trace exactly as a real remote run would, then raises ``RequestBuilt`` instead of sending. Pass it as
    ``backend=`` to ``collect``/``steer``/``generate`` to check a request (and its size) without a server."""
    from nnsight.intervention.backends.remote import RemoteBackend

    class OfflineBackend(RemoteBackend):
        def request(self, request, tracer):
            register_project()
            raise RequestBuilt(request, self._serialize(tracer))

    return OfflineBackend(model_key, host="https://ndif.invalid", api_key="offline")
