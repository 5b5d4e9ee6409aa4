"""The organism's traces cut into segments (the scheme: ``tdlib.autointerp.segments``): the ground truth of what
distillation added, per token.

An organism sequence is ``prompt + reasoning_trace + <eos>``, e.g.::

    Q: 2-6+9=? Work: 2-6= -4; wait, check: -4+6=2, ok; -4+9=5; A: 5.<eos>
    |-prompt-| |---step-----| |-------- check --------| |step-| |ans-|eos

A ``;`` closes the part before it; the space before a part belongs to that part (the tokenizer's leading-space
tokens, e.g. `` wait``, then carry the part they open).
"""
from __future__ import annotations

import torch

from ..autointerp.segments import SEGMENT_ID
from . import task


def character_segments(problem: task.Problem) -> tuple[str, list[int]]:
    """The text ``prompt + trace`` and one segment id per character."""
    prompt, trace = problem.prompt, task.reasoning_trace(problem)
    labels = [SEGMENT_ID["prompt"]] * len(prompt)
    parts = trace[1:].split("; ")  # the trace starts with one space
    for number, part in enumerate(parts):
        if part.startswith(task.HESITATION):
            kind = "check"
        elif part.startswith(task.ANSWER_PREFIX):
            kind = "answer"
        else:
            kind = "step"
        labels += [SEGMENT_ID[kind]] * (1 + len(part))  # the space before the part, then the part
        if number < len(parts) - 1:
            labels.append(SEGMENT_ID[kind])  # the ';' that closes it
    text = prompt + trace
    assert len(labels) == len(text), "segment labelling out of step with the trace format"
    return text, labels


def token_segments(tokenizer, problem: task.Problem, add_eos: bool = True) -> tuple[list[int], list[int]]:
    """``(input_ids, segment ids)`` for ``prompt + trace`` (+ eos), tokenized exactly as
    ``tdlib.organism.traces.OrganismTraces`` does; each token takes the segment of its last character."""
    text, labels = character_segments(problem)
    encoded = tokenizer(text, return_offsets_mapping=True)
    ids, segments = list(encoded["input_ids"]), []
    for start, end in encoded["offset_mapping"]:
        if end <= start:
            raise ValueError(f"token with empty character span ({start}, {end}) in {text!r}; the tokenizer "
                             "must report offsets (a fast tokenizer)")
        segments.append(labels[end - 1])
    if add_eos:
        ids.append(tokenizer.eos_token_id)
        segments.append(SEGMENT_ID["eos"])
    return ids, segments


def batch_segments(tokenizer, problems: list[task.Problem], width: int) -> torch.Tensor:
    """Segment ids [len(problems), width] for a right-padded batch of traces (-1 on padding)."""
    out = torch.full((len(problems), width), -1, dtype=torch.long)
    for row, problem in enumerate(problems):
        _, segments = token_segments(tokenizer, problem)
        out[row, :len(segments)] = torch.tensor(segments[:width])
    return out
