"""Make tests/data/smollm2_long_reference.npz with transformers (the independent reference of the
long-context parity test, tests/test_long_context.py).

    pip install ".[torch]"
    python scripts/make_long_reference.py

The default model's GGUF is dequantized to f32 by transformers (SDPA attention, its default).
Input: 4,000 tokens of natural text (the built-in traits' questions, joined by newlines and
repeated). Saved: the ids; the hidden states of every capture row (embeddings, each block,
final norm; transformers' ``hidden_states``) at 32 positions spread over the input, the first and
last ones included; each row's max |value| over all 4,000 positions (the tolerance scale); and
transformers' 32 greedy tokens after the first 2,000 tokens.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests/data/smollm2_long_reference.npz"
N, GREEDY_PROMPT, GREEDY_NEW = 4000, 2000, 32


def long_text() -> str:
    parts = []
    for f in sorted((ROOT / "python/personacore/extract/data").glob("*.json")):
        d = json.loads(f.read_text())
        parts += list(d.get("questions", [])) + list(d.get("eval_questions", []))
    return "\n".join(parts)


def main() -> None:
    import torch
    import transformers

    from personacore.engine.defaults import default_model_path

    torch.set_num_threads(2)
    gguf = pathlib.Path(default_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ids = tok(long_text(), add_special_tokens=False)["input_ids"]
    while len(ids) < N:
        ids = ids + ids
    ids = ids[:N]
    positions = np.unique(
        np.concatenate([[0, 1, 2], np.linspace(3, N - 9, 21).round(), np.arange(N - 8, N)])
    ).astype(np.int64)
    with torch.inference_mode():
        hs = torch.stack(
            hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        )[:, 0]
        row_max = hs.abs().amax(dim=(1, 2)).numpy().astype(np.float32)
        picked = hs[:, torch.tensor(positions)].numpy().astype(np.float32)
        del hs
        out = hf.generate(
            input_ids=torch.tensor([ids[:GREEDY_PROMPT]]),
            attention_mask=torch.ones(1, GREEDY_PROMPT, dtype=torch.long),
            do_sample=False,
            max_new_tokens=GREEDY_NEW,
            min_new_tokens=GREEDY_NEW,
        )
    greedy = out[0, GREEDY_PROMPT:].numpy().astype(np.int64)
    np.savez_compressed(
        OUT,
        ids=np.array(ids, dtype=np.int64),
        positions=positions,
        hidden=picked,
        row_max=row_max,
        greedy_prompt_len=np.int64(GREEDY_PROMPT),
        greedy=greedy,
        versions=np.array(
            [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
        ),
    )
    print(
        f"wrote {OUT} ({OUT.stat().st_size / 1e6:.1f} MB): hidden {picked.shape}, greedy {greedy.tolist()}"
    )


if __name__ == "__main__":
    main()
