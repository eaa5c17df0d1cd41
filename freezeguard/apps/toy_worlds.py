"""The evaluation's toy worlds (docs/evaluation.md): who the target is, what the published model knew.

Example:
    >>> from freezeguard.apps.toy_worlds import WORLDS
    >>> WORLDS["relearn"].erases, WORLDS["new concept"].erases
    (True, False)
"""
from __future__ import annotations

from dataclasses import dataclass

from freezeguard.integrations.diffusers import toy


@dataclass(frozen=True)
class World:
    """One toy world of the evaluation (docs/evaluation.md): who the target is, what the model knew.

    ``kin`` is the class the target belongs to, which the model knows: the erase's anchor (UCE maps a
    person onto "celebrity") and the prior-preservation attacker's class images (DreamBooth's "a dog").
    ``known`` are the classes the published model is pretrained on beside ``PretrainConfig.classes``;
    ``erases``: the publisher erases the target before release (the model knew it).
    """

    target: tuple[str, ...]
    innocent: tuple[str, ...]
    kin: str
    known: tuple[str, ...]
    erases: bool

    def judge_classes(self) -> tuple[str, ...]:
        """The classes the demo's judge tells apart in this world."""
        return tuple(dict.fromkeys(toy.ALL_CLASSES + self.known + self.target + self.innocent))


_OTHER_MEMBERS = tuple(m for m in toy.FAMILY_MEMBERS if m != toy.FAMILY_MEMBERS[0])
# The worlds. The shapes world's target, a frame, is new spatial knowledge; the family world's is one
# member of a family the model draws (procedural faces), so relearning or learning it can reuse what
# the model knows of the family. Each has an arm where the model knew the target and the publisher
# erased it (the authors' setting) and one where the target is new and nothing is erased.
WORLDS = {
    "relearn": World(toy.TARGET_CLASSES, toy.INNOCENT_CLASSES, "square", toy.TARGET_CLASSES, erases=True),
    "new concept": World(toy.TARGET_CLASSES, toy.INNOCENT_CLASSES, "square", (), erases=False),
    "family relearn": World(toy.FAMILY_MEMBERS[:1], toy.INNOCENT_CLASSES, toy.FAMILY,
                            (toy.FAMILY,) + toy.FAMILY_MEMBERS, erases=True),
    "family new member": World(toy.FAMILY_MEMBERS[:1], toy.INNOCENT_CLASSES, toy.FAMILY,
                               (toy.FAMILY,) + _OTHER_MEMBERS, erases=False),
}

