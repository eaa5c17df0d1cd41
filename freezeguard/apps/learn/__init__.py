"""Building blocks of the bilevel MaskLearner (``freezeguard.apps.learn.learner``), one idea per module.

- ``logits``: the releaser's vectorized update of the per-tensor mask logits (budget penalty included).
- ``user_adamw``: the AdamW simulated user (a stronger attacker than the reference's SGD).
- ``checks``: validation of states, batches, losses and gradients with messages that name the culprit.
- ``distributed``: gradient averaging and logit broadcast when several processes learn one mask.
- ``state_io``: the learner's save / resume file (safetensors with string metadata).
- ``plot``: a PNG of the soft mask per tensor, grouped by UNet block (``freezeguard learn``).
"""
