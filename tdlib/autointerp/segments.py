"""Trace segments: the labels a data source may give its tokens, so the activation cache can say where each unit
fires (``tdlib.autointerp.cache``) and the classification can test what distillation added
(``tdlib.autointerp.classify``).

The scheme is the organism's (its traces are ``prompt + reasoning trace + <eos>``; how a trace is cut into them:
``tdlib.organism.segments``). Segments (``SEGMENTS``, in this order; ids are indices into it):

* ``prompt``: ``Q: ...=?`` (also in the base model's data);
* ``step``: one ``a+b=c`` step of the chain (the first opens with ``Work:``);
* ``check``: a hesitation: a re-check ``wait, check: c-b=a, ok`` or a correction ``wait, no: a+b=c``;
* ``answer``: ``A: n.`` (the base answers ``A: n`` directly);
* ``eos``: the end-of-sequence token.

A data source with a ``segments(step, width)`` method labels its batches (``tdlib.autointerp.cache.stream_batches``);
a source without one (a real pair's traces) leaves the segment columns empty.
"""
from __future__ import annotations

SEGMENTS = ("prompt", "step", "check", "answer", "eos")
ADDED_BY_DISTILLATION = ("step", "check")
"""Segments the fine-tune made the model write on every Q prompt (the ground truth of the diff): the base writes
steps only when a prompt asks for them and re-checks only at random, never by rule."""
SEGMENT_ID = {name: i for i, name in enumerate(SEGMENTS)}
