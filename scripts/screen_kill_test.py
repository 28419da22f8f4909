"""SIGKILL ``personacore screen`` at 20 random moments per output format, resuming after each.

    python scripts/screen_kill_test.py [--kills 20] [--seed 19] [--samples 400]

Runs tests/screen_kills.py's kill_and_resume on a tiny random-weight model for ``.jsonl`` and
``.parquet`` output and prints one summary line per format; exits 1 unless every final output
equals the uninterrupted run's with every sample exactly once. CI runs a shorter version
(tests/test_screen.py, 5 and 3 kills); the result of this script is recorded in README.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "tests")]

from screen_kills import kill_and_resume  # noqa: E402


def main() -> int:
    """Run both formats; print the summaries; 0 when both pass."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--samples", type=int, default=400)
    args = ap.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".jsonl", ".parquet"):
            r = kill_and_resume(Path(tmp), suffix, args.kills, args.seed, args.samples)
            ok &= r.ok and r.kills == args.kills
            print(
                f"{suffix}: {r.kills} kills ({r.kills_after_first_commit} after the first commit), "
                f"committed rows at each kill {r.committed_rows_at_kills}; equal to the "
                f"uninterrupted run: {r.equal_to_reference}; every sample exactly once: "
                f"{r.indices_exactly_once}; {r.seconds:.0f} s"
            )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
