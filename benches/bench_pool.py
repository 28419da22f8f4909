"""Pooled all-layer capture: personacore vs transformers, same model, same machine, one run.

Workload: 8 sequences x 128 tokens (64 prompt + 64 response), response_avg / prompt_avg /
prompt_last at every layer. transformers runs `output_hidden_states=True` and pools the
returned states in torch; personacore pools inside the forward pass. transformers runs it two
ways: the whole batch through the base model (no LM head), the strongest setup and the one the
ratio is quoted against, and as persona_vectors' `get_hidden_p_and_r` does it (one sequence at
a time through AutoModelForCausalLM, logits included), for reference.

    pip install ".[bench]"          # torch, transformers, gguf
    python benches/bench_pool.py [--threads 2] [--repeats 3] [--precision both|highest|high]

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
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both engines")
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions (best is reported)")
    ap.add_argument("--batch", type=int, default=8, help="number of sequences")
    ap.add_argument(
        "--seq", type=int, default=128, help="tokens per sequence (half prompt, half response)"
    )
    ap.add_argument(
        "--precision",
        choices=["both", "highest", "high"],
        default="both",
        help="personacore matmul precision(s); 'both' adds 'high' when the CPU has AMX",
    )
    args = ap.parse_args()

    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF de-quantization progress bar
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()

    import personacore as pc
    from personacore.engine.defaults import default_model_path

    torch.set_num_threads(args.threads)
    gguf = pathlib.Path(default_model_path())
    rng = np.random.default_rng(0)
    n, t = args.batch, args.seq
    p = t // 2
    seqs = [rng.integers(20, 40000, t).tolist() for _ in range(n)]

    # --- personacore: plain f32 matmuls, and bf16x3 on AMX tiles when the CPU has them
    precisions = (
        ["highest", "high"]
        if pc.amx_available() and args.precision == "both"
        else ["highest" if args.precision == "both" else args.precision]
    )
    models = {prec: pc.load_model(str(gguf), precision=prec) for prec in precisions}
    prompts = [s[:p] for s in seqs]
    responses = [s[p:] for s in seqs]
    pools = ("response_avg", "prompt_avg", "prompt_last")
    ours_out = {prec: {} for prec in precisions}

    def runner(prec):
        def run():
            ours_out[prec].update(
                models[prec].pool(prompts, responses, poolings=pools, batch_size=n)
            )

        return run

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

    def run_theirs_per_sample():
        with torch.inference_mode():
            for i in range(n):
                out = hf(input_ids=ids[i : i + 1], output_hidden_states=True)
                hs = torch.stack(out.hidden_states, 1)[0]  # [L+1, t, h]
                hs[:, p:].mean(1), hs[:, :p].mean(1), hs[:, p - 1]

    *times_ours, times_theirs, times_seq = interleaved(
        [*(runner(prec) for prec in precisions), run_theirs, run_theirs_per_sample], args.repeats
    )
    t_theirs, t_seq = min(times_theirs), min(times_seq)
    toks = n * t
    model = models[precisions[0]]
    print(
        f"workload: {n} x {t} tokens, pooled {pools} at all {model.num_layers + 1} rows, {args.threads} threads"
    )
    print(
        f"transformers: {toks / t_theirs:8.1f} tok/s  (best {t_theirs * 1000:.0f} ms; runs "
        f"{' '.join(f'{x:.2f}' for x in times_theirs)} s)  torch {torch.__version__}, f32, batched, base model"
    )
    print(
        f"transformers as persona_vectors runs it (one sequence at a time, with logits): {toks / t_seq:8.1f} tok/s "
        f"(best {t_seq * 1000:.0f} ms)"
    )
    for prec, times in zip(precisions, times_ours):
        t_ours = min(times)
        paired = float(np.median(np.array(times_theirs) / np.array(times)))
        err = max(
            float(
                np.abs(ours_out[prec][k] - theirs[k].numpy()).max()
                / np.abs(theirs[k].numpy()).max()
            )
            for k in pools
        )
        print(
            f"personacore precision={prec!r}: {toks / t_ours:8.1f} tok/s  (best {t_ours * 1000:.0f} ms; runs "
            f"{' '.join(f'{x:.2f}' for x in times)} s)  avx2={pc.avx2_enabled()} amx={pc.amx_available()}"
        )
        print(
            f"  ratio personacore/transformers: {t_theirs / t_ours:.2f}x best vs best, {paired:.2f}x median of "
            f"paired runs   (max rel diff of pooled values vs transformers {err:.1e})"
        )
        print(f"  ratio vs the one-sequence-at-a-time loop: {t_seq / t_ours:.2f}x best vs best")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
