"""The evaluation harness (``fg.evaluate``): does a mask stop illegal fine-tunes and spare legal ones?

``harness`` runs attackers x masks x domains, ``metrics`` turns runs into mitigation and innocent
impact, ``report`` writes the report folder; ``toy_domains`` and ``imagefolder_domains`` build the
domains for the built-in toy world and for local image folders; ``run`` is the whole run behind
``freezeguard evaluate`` (``run_evaluation``).

Example:
    >>> import freezeguard as fg
    >>> fg.evaluate.Attacker("user", lr=1e-3, steps=100).steps
    100
"""
from freezeguard.apps.evaluate.harness import (
                                               Attacker,
                                               Domain,
                                               EvalResult,
                                               Run,
                                               evaluate_masks,
                                               finetune,
                                               heldout_loss,
                                               measure,
)

__all__ = ["Attacker", "Domain", "EvalResult", "Run", "evaluate_masks", "finetune", "heldout_loss", "measure"]
