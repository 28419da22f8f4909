"""Fuzz the trait file reader: ``pc.Trait.load("x.json")`` (persona_vectors' trait JSON).

Seeds: the built-in trait files, and persona_vectors' official trait files when
``PERSONACORE_FUZZ_TRAITS`` names their folder (read at run time, not copied). A trait that loads is
used: its instruction pairs, the eval prompt rendered, the held-out split, ``to_dict`` round trip.
"""

from __future__ import annotations

from pathlib import Path

import seeds
from _harness import main

from personacore.extract import Trait

NAME = "trait_json"


def one_input(data: bytes, work: Path) -> None:
    """Write ``data`` as ``trait.json``, load it and use it."""
    path = work / "trait.json"
    path.write_bytes(data)
    trait = Trait.load(path)
    trait.system_prompt_pairs()
    if trait.questions:
        trait.render_eval_prompt(trait.questions[0], "an answer")
    Trait.from_dict(trait.to_dict())


if __name__ == "__main__":
    main(NAME, seeds.trait_seeds, one_input)
