"""Pooled all-layer capture: personacore vs transformers, same model, same machine, one run.

Workload: 8 sequences x 128 tokens (64 prompt + 64 response), response_avg / prompt_avg /
prompt_last at every layer. transformers runs `output_hidden_states=True` and pools the
returned states in torch (what persona_vectors does); personacore pools inside the forward pass.

    pip install ".[bench]"          # torch, transformers, gguf
    python benches/bench_pool.py [--threads 2] [--repeats 3]

Prints tokens/s for both and the ratio. Timings are the best of `--repeats` after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import numpy as np


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both engines")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions (best is reported)")
    ap.add_argument("--batch", type=int, default=8, help="number of sequences")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (half prompt, half response)")
    args = ap.parse_args()

    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    import torch
    import transformers

    import personacore as pc
    from personacore._defaults import default_model_path

    torch.set_num_threads(args.threads)
    gguf = pathlib.Path(default_model_path())
    rng = np.random.default_rng(0)
    n, t = args.batch, args.seq
    p = t // 2
    seqs = [rng.integers(20, 40000, t).tolist() for _ in range(n)]

    # --- personacore
    model = pc.load_model(str(gguf))
    prompts = [s[:p] for s in seqs]
    responses = [s[p:] for s in seqs]
    pools = ("response_avg", "prompt_avg", "prompt_last")
    ours_out = {}

    def run_ours():
        ours_out.update(model.pool(prompts, responses, poolings=pools, batch_size=n))

    t_ours = best_time(run_ours, args.repeats)

    # --- transformers (dequantizes the same GGUF to float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32
    ).eval()
    ids = torch.tensor(seqs)
    theirs = {}

    def run_theirs():
        with torch.inference_mode():
            out = hf.model(input_ids=ids, output_hidden_states=True)
            hs = torch.stack(out.hidden_states, 1)  # [n, L+1, t, h]
            theirs["response_avg"] = hs[:, :, p:].mean(2)
            theirs["prompt_avg"] = hs[:, :, :p].mean(2)
            theirs["prompt_last"] = hs[:, :, p - 1]

    t_theirs = best_time(run_theirs, args.repeats)

    err = max(
        float(np.abs(ours_out[k] - theirs[k].numpy()).max() / np.abs(theirs[k].numpy()).max()) for k in pools
    )
    toks = n * t
    print(f"workload: {n} x {t} tokens, pooled {pools} at all {model.num_layers + 1} rows, {args.threads} threads")
    print(f"personacore : {toks / t_ours:8.1f} tok/s  ({t_ours * 1000:.0f} ms)  avx2={pc.avx2_enabled()}")
    print(f"transformers: {toks / t_theirs:8.1f} tok/s  ({t_theirs * 1000:.0f} ms)  torch {torch.__version__}")
    print(f"ratio personacore/transformers: {t_theirs / t_ours:.2f}x   (max rel diff of pooled values {err:.1e})")


if __name__ == "__main__":
    main()
