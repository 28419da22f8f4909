"""The function the malicious pickle seeds call from ``__reduce__``: if it ever runs, it is a crash.

``trip`` records the call in :data:`TRIPPED` (checked by the ``.pt`` harness after every input) and
also writes ``$PERSONACORE_FUZZ_CANARY`` when set, so a call in any process is visible.
"""

from __future__ import annotations

import os
from typing import List

#: what each call of :func:`trip` was given, in order
TRIPPED: List[str] = []


def trip(what: str = "") -> str:
    """Record that a pickle ran foreign code."""
    TRIPPED.append(str(what))
    path = os.environ.get("PERSONACORE_FUZZ_CANARY")
    if path:
        with open(path, "a") as f:
            f.write(f"{what}\n")
    return "tripped"
