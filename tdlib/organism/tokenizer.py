"""A small byte-level BPE tokenizer for the organism task, trained with the `tokenizers` library.

It has exactly the structure of Qwen2's tokenizer (Qwen's pre-tokenizer regex, byte-level alphabet, BPE
with merges, files vocab.json + merges.txt). That is deliberate: transformers 5.x maps every ``qwen2``
model folder to ``Qwen2Tokenizer`` whatever tokenizer_config.json says (docs/stack_notes.md), so the only tokenizer
that ``AutoTokenizer.from_pretrained(model_dir)`` loads faithfully for a Qwen2 model is a Qwen-format one.
Digits are single tokens (as in Qwen); frequent words with their leading space (" wait") become one token.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"
# Qwen2's pre-tokenizer regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _qwen_style_core(vocab_size: int) -> tuple[Tokenizer, trainers.BpeTrainer]:
    core = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS, PAD],
        show_progress=False,
    )
    return core, trainer


def train_tokenizer(corpus: list[str], vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train the BPE on ``corpus`` (deterministic for a given corpus)."""
    core, trainer = _qwen_style_core(vocab_size)
    core.train_from_iterator(sorted(set(corpus)), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS,
        pad_token=PAD,
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """Save in both formats: tokenizer.json (fast) and vocab.json + merges.txt (what Qwen2Tokenizer reads)."""
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    tokenizer.backend_tokenizer.model.save(str(directory))
