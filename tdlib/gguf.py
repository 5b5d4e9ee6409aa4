"""Bring a GGUF checkpoint as a plain transformers folder that every notebook can load:

    python -m tdlib.gguf path/to/model.gguf path/to/folder        # needs `pip install gguf`

transformers reads a GGUF file (``from_pretrained(..., gguf_file=...)``) and dequantises it to float32, but the
model it returns keeps a ``quantization_config`` naming the GGUF quantizer: ``save_pretrained`` refuses it, and a
folder whose config keeps the key would re-attach the quantizer when loaded. ``convert`` rebuilds the model from
its config without that key, copies the weights, saves model and tokenizer (into a staging folder renamed into
place when complete), reloads the folder and checks that its logits equal the GGUF model's on a short text.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .results import atomic_directory

CHECK_TEXT = "Q: What is 7 + 5? A: 12. Wait, let me check: 12 - 5 = 7."
"""The text whose logits must agree between the GGUF model and the converted folder."""


def load_gguf(path: str | Path):
    """(model, tokenizer) read from a GGUF file by transformers, the model dequantised to float32 (as loaded: its
    config still names the GGUF quantizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise RuntimeError("reading a GGUF file needs the gguf package: pip install gguf") from None
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def plain_copy(model):
    """A plain float32 model of the same class with ``model``'s weights and no ``quantization_config``."""
    values = model.config.to_dict()
    values.pop("quantization_config", None)
    values.pop("_name_or_path", None)
    config = type(model.config).from_dict(values)
    config.dtype = torch.float32
    copy = type(model)(config).to(torch.float32)
    missing, unexpected = copy.load_state_dict(model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:  # a tied head is one tensor: only its alias may be absent
        raise RuntimeError(f"copying the GGUF model: missing {missing}, unexpected {unexpected}")
    copy.tie_weights()
    return copy.eval()


def save_plain(model, tokenizer, folder: str | Path) -> None:
    """Save model and tokenizer; refuse a config that still names a quantizer (it would re-attach on reload)."""
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if "quantization_config" in json.loads((folder / "config.json").read_text()):
        raise RuntimeError(f"{folder}/config.json still names a quantizer; save a plain_copy of the model")


@torch.no_grad()
def logit_gap(model, folder: str | Path, tokenizer, text: str = CHECK_TEXT) -> float:
    """Largest absolute logit difference between ``model`` and the model saved in ``folder`` on ``text``."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if getattr(reloaded, "hf_quantizer", None) is not None:
        raise RuntimeError(f"{folder} loads with a quantizer attached; it is not a plain folder")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return (model(ids).logits - reloaded(ids).logits).abs().max().item()


def convert_model(model, tokenizer, out: str | Path, tolerance: float = 1e-5) -> dict:
    """Save ``model`` (as transformers loaded it, e.g. from a GGUF file) as a plain folder at ``out`` and check the
    folder reproduces its logits to ``tolerance``; nothing is left at ``out`` when the check fails."""
    out = Path(out)
    copy = plain_copy(model)
    with atomic_directory(out) as staging:
        save_plain(copy, tokenizer, staging)
        gap = logit_gap(model, staging, tokenizer)
        if not gap <= tolerance:
            raise RuntimeError(f"the converted folder's logits differ from the source model's by {gap:.3g} (more "
                               f"than {tolerance:g}); nothing was written to {out}")
    return {"folder": str(out), "max_logit_gap": gap, "n_params": sum(p.numel() for p in copy.parameters())}


def convert(gguf_file: str | Path, out: str | Path, tolerance: float = 1e-5) -> dict:
    """A GGUF file as a plain float32 transformers folder at ``out``, checked (``convert_model``)."""
    model, tokenizer = load_gguf(gguf_file)
    return convert_model(model, tokenizer, out, tolerance)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf_file", help="the .gguf checkpoint")
    parser.add_argument("out", help="folder to write (replaced when it exists)")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest allowed logit difference")
    args = parser.parse_args(argv)
    try:
        report = convert(args.gguf_file, args.out, args.tolerance)
    except (FileNotFoundError, RuntimeError) as error:
        raise SystemExit(f"[gguf] {error}") from None
    print(f"[gguf] wrote {report['folder']} ({report['n_params'] / 1e6:.1f}M parameters); logits equal the GGUF "
          f"model's to {report['max_logit_gap']:.1e}")
    return report


if __name__ == "__main__":
    main()
