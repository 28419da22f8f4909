"""lm-evaluation-harness against ``personacore serve``: its ``local-completions`` model (the
log-likelihood call: token-id prompts in a list, ``echo``, ``logprobs=1``, ``max_tokens=1``) on a
small multiple-choice task written here, served by a real server on 127.0.0.1 that steers every
request by default (``default_steer``: the harness sends no extra body keys).

Each answer's log-likelihood as the harness reports it must equal the sum of the steered model's
log-probabilities of the answer tokens, computed from ``Model.logits`` with the same steer, and
differ from the unsteered one: the harness evaluates the steered model, not the plain one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm_eval[api]: its API models

import personacore as pc  # noqa: E402
from personacore.serve import create_app  # noqa: E402
from test_serve import Running, make_vector  # noqa: E402

DATA = Path(__file__).parent / "data"
STEER = {"vector": "rnd", "coef": 6.0, "layers": [10]}
CAPITALS = [
    ("France", "Paris", ["Paris", "Rome", "Madrid", "Berlin"]),
    ("Japan", "Tokyo", ["Seoul", "Tokyo", "Beijing", "Bangkok"]),
    ("Egypt", "Cairo", ["Nairobi", "Lagos", "Cairo", "Accra"]),
]


@pytest.fixture(scope="module")
def model() -> pc.Model:
    """The default model (f32)."""
    return pc.load_model()


@pytest.fixture(scope="module")
def vector(model) -> pc.PersonaVector:
    return make_vector(model)


@pytest.fixture(scope="module")
def served(model, vector) -> Iterator[Running]:
    """A server that steers every request that sends no steer of its own."""
    running = Running(create_app(model, {"rnd": vector}, default_steer=[STEER]))
    yield running
    running.stop()


def _task(root: Path) -> Path:
    """A multiple-choice task over a local JSONL file, and the HF tokenizer the harness needs."""
    tasks = root / "tasks"
    tasks.mkdir()
    rows = [
        {
            "question": f"The capital of {c} is",
            "choices": [" " + x for x in ch],
            "answer": ch.index(a),
        }
        for c, a, ch in CAPITALS
    ]
    (tasks / "capitals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "capitals.yaml").write_text(
        "task: capitals\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'capitals.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n"
    )
    tok = root / "tokenizer"
    tok.mkdir()
    (tok / "tokenizer.json").write_text((DATA / "smollm2_tokenizer.json").read_text())
    (tok / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"})
    )
    return root


def _loglikelihood(model, context: str, answer: str, steer) -> float:
    """Sum of the log-probabilities of ``answer``'s tokens after ``context`` (the harness's split:
    the tokens of context + answer past those of the context)."""
    ctx = model.tokenizer.encode(context)
    whole = model.tokenizer.encode(context + answer)
    assert whole[: len(ctx)] == ctx
    logits = model.logits(whole, steer=steer).astype(np.float64)
    total = 0.0
    for t in range(len(ctx), len(whole)):
        row = logits[t - 1]
        top = row.max()
        total += row[whole[t]] - (top + np.log(np.exp(row - top).sum()))
    return total


def test_the_harness_evaluates_the_steered_model(served, model, vector, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    root = _task(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = model.path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    out = simple_evaluate(
        model="local-completions",
        model_args=(
            f"model={name},base_url={served.url}/v1/completions,tokenizer={root / 'tokenizer'},"
            "num_concurrent=1,max_retries=1,tokenized_requests=True"
        ),
        tasks=["capitals"],
        task_manager=TaskManager(include_path=str(root / "tasks")),
        log_samples=True,
    )
    samples = sorted(out["samples"]["capitals"], key=lambda s: s["doc_id"])
    assert len(samples) == len(CAPITALS)
    steer = pc.Steer(vector, STEER["coef"], STEER["layers"], "all")
    moved = 0.0
    for (country, _, choices), sample in zip(CAPITALS, samples):
        context = f"The capital of {country} is"
        for answer, resp in zip(choices, sample["resps"]):
            got = float(resp[0][0])
            want = _loglikelihood(model, context, " " + answer, steer)
            assert got == pytest.approx(want, abs=2e-3), (country, answer)
            moved = max(moved, abs(want - _loglikelihood(model, context, " " + answer, None)))
    assert moved > 0.1, "the default steer changed nothing"
    acc = out["results"]["capitals"]["acc,none"]
    assert acc == np.mean([s["acc"] for s in samples])
