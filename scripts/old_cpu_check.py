"""Forward passes of the installed personacore checked against independent references.

Run by scripts/check-old-cpu.sh under ``qemu-x86_64 -cpu Nehalem`` (a CPU without AVX, AVX2,
FMA or F16C): a build that assumed any of them dies there with SIGILL (illegal instruction), and
a build that picks its kernels at run time must take the baseline paths and still compute the
right numbers. ``scripts/check-aarch64.sh --python`` runs the same checks on the aarch64 wheel
under ``qemu-aarch64`` (64-bit ARM, where our x86 kernels are compiled out). Checks, each against
a reference that personacore did not compute:

- a tiny random Llama (tests/tiny_models.py, f32 safetensors): every layer's hidden states and
  the logits against the float64 numpy forward of tests/numpy_reference.py;
- with ``--default-model``, the default SmolLM2-135M GGUF on the first conversation of
  tests/data/smollm2_reference.npz (transformers): f32 last-position logits (max abs diff <= 2e-2,
  same argmax), quantized=True last-position logits (correlation > 0.995, same argmax), and a
  greedy f32 decode of 3 tokens equal to transformers' greedy tokens.

Prints one line per check and ``old-cpu check: ok``; exits 1 on the first mismatch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

import numpy_reference as ref  # noqa: E402  (tests/ is put on the path just above)
import personacore as pc  # noqa: E402
import tiny_models as tm  # noqa: E402

REL_TOL = 1e-4  # f32 engine vs float64 reference, relative to max(1, max|reference layer|)


def fail(msg: str) -> None:
    """Report a mismatch and stop."""
    print(f"old-cpu check FAILED: {msg}", flush=True)
    sys.exit(1)


def check_tiny_model() -> None:
    """Tiny Llama: hidden states of every layer and logits within REL_TOL of numpy's."""
    with tempfile.TemporaryDirectory() as d:
        config, weights = tm.write_tiny_model(d, "llama", seed=7)
        model = pc.load_model(d)
        ids = [int(i) for i in np.random.default_rng(7).integers(0, config["vocab_size"], 13)]
        exp_h, exp_l = ref.forward(config, weights, ids)
        for name, got, exp in (
            ("hidden_states", model.hidden_states(ids), exp_h),
            ("logits", model.logits(ids)[None], exp_l[None]),
        ):
            got = np.asarray(got, dtype=np.float64)
            if got.shape != exp.shape:
                fail(f"tiny llama {name}: shape {got.shape} != reference {exp.shape}")
            for layer in range(exp.shape[0]):
                tol = REL_TOL * max(1.0, float(np.abs(exp[layer]).max()))
                diff = float(np.abs(got[layer] - exp[layer]).max())
                if not diff <= tol:
                    fail(f"tiny llama {name} row {layer}: max |diff| {diff:.3e} > {tol:.1e}")
        print("tiny llama (f32): hidden states and logits match the numpy reference", flush=True)


def first_reference_conversation() -> tuple:
    """Conversation 0 of the transformers reference: (ids, prompt ids, last-position logits,
    greedy tokens continuing the prompt)."""
    with np.load(TESTS / "data" / "smollm2_reference.npz") as npz:
        ids = [int(i) for i in npz["c0_ids"]]
        prompt = ids[: int(npz["c0_prompt_len"])]
        greedy = [int(i) for i in npz["c0_greedy"]]
        return ids, prompt, npz["c0_last_logits"].astype(np.float64), greedy


def check_default_model() -> None:
    """Default GGUF, f32 and quantized=True, against the transformers reference."""
    ids, prompt, ref_logits, ref_greedy = first_reference_conversation()
    model = pc.load_model()
    got = model.logits(ids)[-1].astype(np.float64)
    diff = float(np.abs(got - ref_logits).max())
    if not (diff <= 2e-2 and int(np.argmax(got)) == int(np.argmax(ref_logits))):
        fail(
            f"default model f32 logits: max abs diff {diff:.4g} (<= 2e-2 wanted) or argmax differs"
        )
    print(f"default model (f32): last-position logits max abs diff {diff:.3g}", flush=True)
    out = list(model.generate(prompt, max_new_tokens=3, temperature=0.0, ignore_eos=True).token_ids)
    if out[:3] != ref_greedy[:3]:
        fail(f"default model greedy decode {out[:3]} != transformers {ref_greedy[:3]}")
    print(f"default model (f32): greedy decode {out[:3]} matches transformers", flush=True)
    del model
    qmodel = pc.load_model(quantized=True)
    got = qmodel.logits(ids)[-1].astype(np.float64)
    corr = float(np.corrcoef(got, ref_logits)[0, 1])
    if not (corr > 0.995 and int(np.argmax(got)) == int(np.argmax(ref_logits))):
        fail(f"default model quantized logits: correlation {corr:.5f} or argmax differs")
    print(
        f"default model (quantized=True): last-position logits correlation {corr:.5f}", flush=True
    )


def main() -> None:
    """Parse the flags, say which SIMD level candle sees, run the checks."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--default-model", action="store_true", help="also check the default GGUF")
    args = parser.parse_args()
    t0 = time.perf_counter()
    print(f"personacore {pc.__version__}: avx2_enabled={pc.avx2_enabled()}", flush=True)
    check_tiny_model()
    if args.default_model:
        check_default_model()
    print(f"old-cpu check: ok ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
