"""Pooled all-layer capture: personacore vs transformers, same model, same machine, one run.

Workload: 8 sequences x 128 tokens (64 prompt + 64 response), response_avg / prompt_avg /
prompt_last at every layer. transformers runs `output_hidden_states=True` and pools the
returned states in torch (what persona_vectors does); personacore pools inside the forward pass.

    pip install ".[bench]"          # torch, transformers, gguf
    python benches/bench_pool.py [--threads 2] [--repeats 3]

Prints tokens/s for both and the ratio. Each side is warmed up once, then the two sides run in
turn `--repeats` times (so a slow patch of a shared machine hits both); the best time of each is
reported, with the median ratio of the paired runs.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import numpy as np


def interleaved(fns, repeats: int):
    """Warm up each fn, then run them in turn `repeats` times; the list of times per fn."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
            time.sleep(0.2)  # let the other engine's worker threads go to sleep
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both engines")
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions (best is reported)")
    ap.add_argument("--batch", type=int, default=8, help="number of sequences")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (half prompt, half response)")
    args = ap.parse_args()

    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF de-quantization progress bar
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()

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


    # --- transformers (dequantizes the same GGUF to float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
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

    times_ours, times_theirs = interleaved([run_ours, run_theirs], args.repeats)
    t_ours, t_theirs = min(times_ours), min(times_theirs)
    paired = float(np.median(np.array(times_theirs) / np.array(times_ours)))

    err = max(
        float(np.abs(ours_out[k] - theirs[k].numpy()).max() / np.abs(theirs[k].numpy()).max()) for k in pools
    )
    toks = n * t
    print(f"workload: {n} x {t} tokens, pooled {pools} at all {model.num_layers + 1} rows, {args.threads} threads")
    la = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"personacore : {toks / t_ours:8.1f} tok/s  (best {t_ours * 1000:.0f} ms; runs "
          f"{' '.join(f'{x:.2f}' for x in times_ours)} s)  avx2={pc.avx2_enabled()}")
    print(f"transformers: {toks / t_theirs:8.1f} tok/s  (best {t_theirs * 1000:.0f} ms; runs "
          f"{' '.join(f'{x:.2f}' for x in times_theirs)} s)  torch {torch.__version__}")
    print(f"ratio personacore/transformers: {t_theirs / t_ours:.2f}x best vs best, {paired:.2f}x median of paired runs"
          f"   (max rel diff of pooled values {err:.1e}; load average after {la})")


if __name__ == "__main__":
    main()
