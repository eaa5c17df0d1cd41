"""Mask learning: the bilevel MaskLearner (``learner``) and ``learn()`` (``run``: the whole publisher
run behind ``freezeguard learn``), with their building blocks, one idea per module.

- ``learner``: ``MaskLearner``, the learner's state and its releaser / user steps (the algorithm).
- ``logits``: the releaser's vectorized update of the per-tensor mask logits (budget penalty included)
  and the initial logits.
- ``budget``: the budget penalty's weight c ("auto") and the projection onto the budget.
- ``config``: ``LearnerConfig``, every learner setting, validated once.
- ``mask_rules``: from logits to a hard FreezeMask (top-k or threshold) and how far the mask moved.
- ``loop``: ``MaskLearner.fit``, a whole run over the batches with progress and a warning when
  nothing moved.
- ``checks``: validation of states, batches, losses and gradients with messages that name the culprit.
- ``distributed``: gradient averaging and logit broadcast when several processes learn one mask,
  and the learner's FSDP2 handling (local shards, completed sums).
- ``state_io``: the learner's save / resume file (safetensors with string metadata), written and
  read back into a learner.
- ``plot``: a PNG of the soft mask per tensor, grouped by UNet block (``freezeguard learn``).
"""
