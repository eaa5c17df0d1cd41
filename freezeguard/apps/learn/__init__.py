"""Mask learning: the bilevel MaskLearner (``learner``) and ``learn()`` (``run``: the whole publisher
run behind ``freezeguard learn``), with their building blocks, one idea per module.

- ``logits``: the releaser's vectorized update of the per-tensor mask logits (budget penalty included).
- ``checks``: validation of states, batches, losses and gradients with messages that name the culprit.
- ``distributed``: gradient averaging and logit broadcast when several processes learn one mask.
- ``state_io``: the learner's save / resume file (safetensors with string metadata).
- ``plot``: a PNG of the soft mask per tensor, grouped by UNet block (``freezeguard learn``).
"""
