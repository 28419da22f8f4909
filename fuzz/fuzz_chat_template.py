"""Fuzz chat templates: the input is the template text of a tiny model's ``tokenizer_config.json``.

The model is loaded and asked to render a system/user conversation, a user/assistant one, and one
without a generation prompt (``model.encode_chat``). Template errors must be ``ChatTemplateError``
(at load or when rendering); a template that loops forever would be a hang. Seeds: ChatML,
SmolLM2's template, a Llama-3 style one and one that uses ``raise_exception``, namespaces and
filters. (``fuzz_model_hf.py tokenizer_config.json`` fuzzes the whole file around the template.)
"""

from __future__ import annotations

import json
from pathlib import Path

import seeds
from _harness import main

import personacore as pc

NAME = "chat_template"
CONVERSATIONS = [
    [{"role": "system", "content": "you are kind"}, {"role": "user", "content": "hello"}],
    [{"role": "user", "content": "what is your name"}, {"role": "assistant", "content": "no"}],
]


def one_input(data: bytes, work: Path) -> None:
    """Load the tiny model with ``data`` (UTF-8, bad bytes replaced) as its chat template."""
    config = json.loads(seeds.hf_files("llama")["tokenizer_config.json"])
    config["chat_template"] = data.decode("utf-8", "replace")
    d = seeds.write_hf(work / "m", "llama", tokenizer_config_json=json.dumps(config).encode())
    model = pc.load_model(str(d))
    for messages in CONVERSATIONS:
        model.encode_chat(messages, add_generation_prompt=True)
    model.chat_text(CONVERSATIONS[1], add_generation_prompt=False)


if __name__ == "__main__":
    main(NAME, lambda: [t.encode() for t in seeds.TEMPLATES], one_input)
