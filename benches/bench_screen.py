"""Data screening (issue 14): samples/s of ``pc.screen`` vs the same algorithm on transformers.

Workload: N samples (default 256) of a ~64-token chat prompt and a ~64-token response, one random
vector at layer 20, batches of 16. transformers runs the same algorithm batch by batch: for
``delta``, a left-padded batched ``generate`` (greedy, ``max_new_tokens``) for the baselines y',
then one batched forward of the base model with ``output_hidden_states=True`` over the 2 x 16
right-padded (x, y) and (x, y') sequences, pooled and projected in torch; for ``prompt_last``, one
such forward over (x, y). Both sides get the same token ids; personacore runs at both precisions.

    pip install ".[bench]"
    python benches/bench_screen.py [--samples 256] [--threads 2] [--methods prompt_last delta]

One run per side (the sides alternate per method); prints samples/s, the ratios and how far the
scores of the two sides agree.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bench_generate import gguf_path, hf_eos, machine_line, quiet_transformers

WORDS = (
    "river stone garden window music paper morning travel market winter letter bridge forest "
    "kitchen candle silver question answer simple careful bright quiet history planet engine "
    "harbor village journey painting lesson number circle theory doctor teacher farmer"
).split()


def make_samples(n: int, prompt_words: int, response_words: int, seed: int = 0) -> list:
    """``n`` samples of random words: a user prompt and an assistant response."""
    rng = np.random.default_rng(seed)

    def text(k):
        return " ".join(rng.choice(WORDS, k)).capitalize() + "."

    return [{"prompt": text(prompt_words), "response": text(response_words)} for _ in range(n)]


class TransformersScreen:
    """The screening algorithm written on transformers (batched generate + one hidden-state forward)."""

    def __init__(self, hf, torch, unit: np.ndarray, layer: int, eos: int):
        self.hf, self.torch, self.layer, self.eos = hf, torch, layer, eos
        self.unit = torch.tensor(unit, dtype=torch.float32)

    def baselines(self, prompts):
        torch, w = self.torch, max(len(p) for p in prompts)
        ids = torch.tensor([[self.eos] * (w - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in prompts])
        out = self.hf.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.eos,
            eos_token_id=self.eos,
        )
        gens = []
        for row in out[:, w:].tolist():
            gens.append(row[: row.index(self.eos)] if self.eos in row else row)
        return gens

    def pooled(self, prompts, responses):
        """(response-mean projection, last-prompt projection) per sequence, one forward."""
        torch = self.torch
        seqs = [p + r for p, r in zip(prompts, responses)]
        w = max(len(s) for s in seqs)
        ids = torch.tensor([s + [self.eos] * (w - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (w - len(s)) for s in seqs])
        hs = self.hf.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        a = hs.hidden_states[self.layer]  # [n, w, h]
        resp = torch.zeros(len(seqs), dtype=torch.float32)
        last = torch.zeros(len(seqs), dtype=torch.float32)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            resp[i] = a[i, len(p) : len(p) + len(r)].mean(0) @ self.unit
            last[i] = a[i, len(p) - 1] @ self.unit
        return resp.numpy(), last.numpy()

    def __call__(self, prompts, responses, method, batch_size, max_new_tokens):
        self.max_new_tokens = max_new_tokens
        scores = []
        with self.torch.inference_mode():
            for s in range(0, len(prompts), batch_size):
                p, r = prompts[s : s + batch_size], responses[s : s + batch_size]
                if method == "delta":
                    base = self.baselines(p)
                    keep = [i for i, b in enumerate(base) if b]
                    resp, _ = self.pooled(p + [p[i] for i in keep], r + [base[i] for i in keep])
                    b = np.full(len(p), np.nan, np.float32)
                    b[keep] = resp[len(p) :]
                    scores.append(resp[: len(p)] - b)
                else:
                    resp, last = self.pooled(p, r)
                    scores.append(resp - last)
        return np.concatenate(scores)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--layer", type=int, default=20)
    ap.add_argument("--methods", nargs="+", default=["prompt_last", "delta"])
    ap.add_argument("--precision", choices=["both", "highest", "high"], default="both")
    args = ap.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    quiet_transformers()
    import torch
    import transformers

    import personacore as pc

    torch.set_num_threads(args.threads)
    gguf = gguf_path()
    precs = ["highest", "high"] if args.precision == "both" else [args.precision]
    models = {p: pc.load_model(str(gguf), precision=p) for p in precs}
    model = models[precs[0]]
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    rng = np.random.default_rng(1)
    vec = pc.PersonaVector(
        rng.standard_normal((model.num_layers + 1, model.hidden_size)), layer=args.layer, name="v"
    )
    unit = vec.directions[args.layer] / np.linalg.norm(vec.directions[args.layer])
    samples = make_samples(args.samples, 34, 58)
    prompts = [model.encode_chat([{"role": "user", "content": s["prompt"]}]) for s in samples]
    responses = [model.tokenizer.encode(s["response"]) for s in samples]
    theirs = TransformersScreen(hf, torch, unit, args.layer, hf_eos(hf))
    print(machine_line(args.threads))
    print(
        f"{len(samples)} samples: prompts {np.mean([len(p) for p in prompts]):.0f} tokens, responses "
        f"{np.mean([len(r) for r in responses]):.0f} tokens (mean); batch {args.batch_size}, "
        f"max_new_tokens {args.max_new_tokens}, layer {args.layer}; torch {torch.__version__}, "
        f"transformers {transformers.__version__} (f32)"
    )
    for method in args.methods:
        times, scores = {}, {}
        sides = [(f"personacore {p}", p) for p in precs]
        sides.insert(1, ("transformers", None))
        for name, prec in sides:
            t0 = time.perf_counter()
            if prec is None:
                s = theirs(prompts, responses, method, args.batch_size, args.max_new_tokens)
            else:
                res = pc.screen(
                    models[prec],
                    vec,
                    samples,
                    method=method,
                    max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size,
                )
                s = res.scores["v"]
            times[name], scores[name] = time.perf_counter() - t0, s
            print(f"  {method:12s} {name:22s} {len(samples) / times[name]:7.2f} samples/s "
                  f"({times[name]:.1f} s)", flush=True)  # fmt: skip
        for name, _ in sides:
            if name != "transformers":
                d = np.abs(scores[name] - scores["transformers"])
                print(
                    f"  {method}: {name}/transformers {times['transformers'] / times[name]:.2f}x; "
                    f"scores within 1e-2 for {np.mean(d < 1e-2):.0%} of samples (median |diff| "
                    f"{np.nanmedian(d):.1e})",
                    flush=True,
                )
    if "delta" in args.methods:
        phase_breakdown(models, theirs, vec, prompts, responses, args)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def phase_breakdown(models, theirs, vec, prompts, responses, args) -> None:
    """Where ``delta``'s time goes: one batch, each phase timed alone on every side (best of 2).

    The phases are those both sides run: greedy generation of y' for the batch's prompts, and the
    pooled forward (personacore: (x, y) up to the vector's layer, y' being scored by the
    generation's monitor; transformers: (x, y) and (x, y') through every layer).
    """
    import personacore as pc

    n = args.batch_size
    p, r = prompts[:n], responses[:n]
    monitor = pc.Monitor({"v": vec}, layers={"v": [args.layer]})

    def best(fn):
        out = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return min(out)

    theirs.max_new_tokens = args.max_new_tokens
    with theirs.torch.inference_mode():
        base = theirs.baselines(p)
        t_gen = best(lambda: theirs.baselines(p))
        t_pool = best(lambda: theirs.pooled(p + p, r + base))
    print(f"  delta, one batch of {n}: transformers generate y' {t_gen:.2f} s, "
          f"pooled forward of (x, y) and (x, y') {t_pool:.2f} s")  # fmt: skip
    for prec, model in models.items():
        g = best(lambda m=model: m.generate(p, max_new_tokens=args.max_new_tokens, temperature=0.0,
                                            monitor=monitor))  # fmt: skip
        f = best(lambda m=model: m.pool(p, r, poolings=["response_avg", "prompt_last"],
                                        batch_size=n, layers=[args.layer]))  # fmt: skip
        print(f"  delta, one batch of {n}: personacore {prec} generate y' {g:.2f} s "
              f"({t_gen / g:.2f}x), pooled forward of (x, y) {f:.2f} s ({t_pool / f:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
