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
                                               attack_finetune,
                                               evaluate_masks,
                                               heldout_loss,
                                               measure,
)

__all__ = ["Attacker", "Domain", "EvalResult", "Run", "attack_finetune", "evaluate_masks", "heldout_loss", "measure"]


def __getattr__(name: str):
    # ``finetune`` was this function's old name, beside apps.finetune.finetune (a user's guarded
    # fine-tune of a pipeline): still importable, with a note of the new name.
    if name == "finetune":
        import warnings

        warnings.warn("freezeguard.evaluate.finetune is now attack_finetune", DeprecationWarning, stacklevel=2)
        return attack_finetune
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
