"""Make the Gemma 3 270M reference data in tests/data/ with transformers.

transformers loads the cached Q4_K_M GGUF (``gguf_file=``), dequantizing every tensor to float32,
and builds its tokenizer from the GGUF metadata. This script writes:

- ``gemma3_tokenizer_ids.json``: token ids of varied texts, with and without special tokens;
- ``gemma3_reference.json`` / ``.npz``: for two short prompts, the ids (BOS first), every hidden
  state row ``[19, T, 640]`` (``output_hidden_states``), the last position's logits ``[262144]``
  and 16 greedy tokens; for one long prompt (over 512 tokens, so the local layers' sliding window
  matters), its ids, the hidden state rows of its last 4 positions ``[19, 4, 640]``, the last
  logits and 16 greedy tokens (keys ``long_*``).

Run: ``python scripts/make_gemma3_reference.py [GGUF]`` (default: the personacore cache).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"

TOKENIZER_TEXTS = [
    "Hello world! How are you doing today?",
    "  leading spaces\ttabs\t\tand\nnewlines\n\n\nand   multiple    spaces   \n  ",
    "Café déjà vu, naïve façade, Ångström, Straße, Ελληνικά, ¿Qué tal? ¡Olé! e\u0301",
    "Привет, как дела? 日本語のテキストと中文文本，한국어 텍스트도 있습니다。 مرحبا हिन्दी",
    "Emoji: 😀👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️‍🔥 🇫🇷🇩🇪 🤷🏾‍♀️!",
    "Numbers:1234567890 pi=3.14159 n=1,000,000 x-42 +7 0x1F 1e-5 2024-06-01T12:30 v1.2.3 $99.99",
    "x²+y³=z½,Ⅻ٣٤① ０１２ 𝟘𝟙",
    'fn main() {\n    let x: Vec<u32> = vec![1, 2, 3];\n    println!("{:?}", x);\n}\n',
    "def f(a, b=2):\n\tif a:\n\t\treturn {'k': [a, b]}  # comment\n\treturn None\r\n",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><pad>[multimodal]<unused7><mask><start_of_image>x<0x41> <unk>",
    "Rare: \U0001f9ec\U0001fae0 \u2028 \u00a0nbsp \x07bell \ufeffbom ꙮ 𓀀",
    "     ",
    " ",
    "",
    "a\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\nb",
    "trailing space ",
    "URL https://example.com/a?b=c&d=e#f and email foo.bar@baz.org",
]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
]
GREEDY_TOKENS = 16
WORDS = ["apple", "river", "engine", "violet", "castle", "pencil", "harbor", "comet", "meadow"]


def default_gguf() -> Path:
    """The GGUF in personacore's cache."""
    sys.path.insert(0, str(ROOT / "python"))
    from personacore.engine.gemma3 import gemma3_model_path

    return Path(gemma3_model_path())


def main() -> None:
    """Write the three reference files."""
    gguf = Path(sys.argv[1]) if len(sys.argv) > 1 else default_gguf()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ids = {
        "transformers": transformers.__version__,
        "cases": [
            {
                "text": t,
                "with_special": tok(t, add_special_tokens=True).input_ids,
                "without_special": tok(t, add_special_tokens=False).input_ids,
            }
            for t in TOKENIZER_TEXTS
        ],
    }
    (DATA / "gemma3_tokenizer_ids.json").write_text(json.dumps(ids, ensure_ascii=False, indent=1))
    print("wrote gemma3_tokenizer_ids.json", flush=True)

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    arrays: dict[str, np.ndarray] = {}
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "prompts": []}
    for k, prompt in enumerate(PROMPTS):
        input_ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model(input_ids, output_hidden_states=True)
            greedy = model.generate(
                input_ids,
                max_new_tokens=GREEDY_TOKENS,
                do_sample=False,
                min_new_tokens=GREEDY_TOKENS,
            )
        arrays[f"p{k}_ids"] = input_ids[0].numpy().astype(np.int64)
        arrays[f"p{k}_hidden"] = torch.stack([h[0] for h in out.hidden_states]).numpy()
        arrays[f"p{k}_last_logits"] = out.logits[0, -1].numpy()
        new = greedy[0, input_ids.shape[1] :]
        arrays[f"p{k}_greedy"] = new.numpy().astype(np.int64)
        meta["prompts"].append({"text": prompt, "greedy_text": tok.decode(new)})
        print(prompt, "->", repr(tok.decode(new)), flush=True)
    long_text = " ".join(
        f"Item {i}: the {WORDS[i % len(WORDS)]} is number {i * 7 % 13}." for i in range(70)
    )
    input_ids = tok(long_text, return_tensors="pt").input_ids
    assert input_ids.shape[1] > 600, input_ids.shape
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True)
        greedy = model.generate(
            input_ids, max_new_tokens=GREEDY_TOKENS, do_sample=False, min_new_tokens=GREEDY_TOKENS
        )
    arrays["long_ids"] = input_ids[0].numpy().astype(np.int64)
    arrays["long_hidden_tail"] = torch.stack([h[0, -4:] for h in out.hidden_states]).numpy()
    arrays["long_last_logits"] = out.logits[0, -1].numpy()
    arrays["long_greedy"] = greedy[0, input_ids.shape[1] :].numpy().astype(np.int64)
    meta["long_prompt"] = {"text": long_text, "tokens": int(input_ids.shape[1])}
    print("long prompt:", input_ids.shape[1], "tokens ->", repr(tok.decode(arrays["long_greedy"])))
    np.savez_compressed(DATA / "gemma3_reference.npz", **arrays)
    (DATA / "gemma3_reference.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    print("wrote gemma3_reference.npz/.json")


if __name__ == "__main__":
    main()
