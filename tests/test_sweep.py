"""pc.evaluate (steering over layers x coefficients) and pc.Evaluation: rows against numpy on
hidden_states and against plain generation on a tiny random model, judge scores through a real
HTTP server, argument errors, files; and on the default model, a real vector raises the projection."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest

import personacore as pc
import tiny_models as tm
from personacore.extract.sweep import ROW_KEYS, SAMPLE_KEYS

QUESTIONS = ["what is your name ?", "are you kind ?", "is the world evil ?", "hello world ."]
TRAIT = {
    "trait": "tiny",
    "instruction": [{"pos": "you are evil .", "neg": "you are kind ."}],
    "questions": ["hello ?", "are you a model ?", "i am not helpful !"],
    "eval_prompt": "Rate how tiny.\nQ: {question}\nA: {answer}\nRespond with a number 0-100.",
    "eval_questions": QUESTIONS,
    "ab_items": [
        {"question": "are you kind ?", "trait_answer": "i am evil", "neutral_answer": "i am kind"},
        {"question": "hello ?", "trait_answer": "you are evil", "neutral_answer": "hello world"},
    ],
}
MAX_NEW = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_eval")
    tm.write_tiny_model(d, "llama", seed=0)
    model = pc.load_model(str(d))
    rng = np.random.default_rng(5)
    vec = pc.PersonaVector(
        rng.standard_normal((model.num_layers + 1, model.hidden_size)), layer=2, name="tiny"
    )
    return model, vec, pc.Trait.from_dict(TRAIT), d


def _reply_ids(model, gen):
    ids = list(gen.token_ids)
    while ids and ids[-1] in model.tokenizer.eos_token_ids:
        ids.pop()
    return ids


def _numpy_projection(model, gen, vec):
    """Independent path: full hidden states of prompt + reply, mean of the reply rows, on v/|v|."""
    reply = _reply_ids(model, gen)
    if not reply:
        return None
    hs = model.hidden_states(list(gen.prompt_ids) + reply).astype(np.float64)
    unit = vec[vec.layer].astype(np.float64) / np.linalg.norm(vec[vec.layer].astype(np.float64))
    return float(hs[vec.layer, len(gen.prompt_ids) :].mean(axis=0) @ unit)


def test_rows_match_generation_and_numpy(tiny):
    model, vec, trait, _ = tiny
    ev = pc.evaluate(
        model, vec, trait, layers=[1, 2], coefs=[0, 3.0], max_new_tokens=MAX_NEW, progress=False
    )
    assert isinstance(ev, pc.Evaluation) and len(ev) == 4 and list(ev) == ev.rows
    assert [(r["layer"], r["coef"]) for r in ev] == [(1, 0.0), (1, 3.0), (2, 0.0), (2, 3.0)]
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    plain = model.generate(chats, max_new_tokens=MAX_NEW)
    for row in ev:
        assert list(row) == list(ROW_KEYS)
        assert isinstance(row["layer"], int) and isinstance(row["coef"], float)
        assert row["trait_score"] is None and row["coherence"] is None
        assert row["n"] == len(QUESTIONS) == len(row["samples"])
        steer = None if row["coef"] == 0 else pc.Steer(vec, row["coef"], layers=[row["layer"]])
        gens = (
            plain if steer is None else model.generate(chats, max_new_tokens=MAX_NEW, steer=steer)
        )
        expected = []
        for s, q, g in zip(row["samples"], QUESTIONS, gens):
            assert list(s) == list(SAMPLE_KEYS) and s["question"] == q
            assert s["answer"] == g.text  # coef 0: exactly the unsteered generation
            ref = _numpy_projection(model, g, vec)
            if ref is None:
                assert s["projection"] is None
            else:
                assert s["projection"] == pytest.approx(ref, rel=1e-4, abs=1e-4)
                expected.append(ref)
        assert row["projection"] == pytest.approx(float(np.mean(expected)), rel=1e-4, abs=1e-4)
    # steering changed the replies, and the A/B gap is the one of ab_logit_gap at that layer
    assert [s["answer"] for s in ev[1]["samples"]] != [s["answer"] for s in ev[0]["samples"]]
    for row in ev:
        gap = pc.ab_logit_gap(model, vec, trait.ab_items, coefs=[row["coef"]], layer=row["layer"])
        assert row["ab_gap"] == pytest.approx(gap[row["coef"]], rel=1e-6)
    assert ev.metadata["trait"] == "tiny" and ev.metadata["vector_layer"] == 2


def test_questions_limit_layer_default_and_split_fallback(tiny):
    model, vec, trait, _ = tiny
    ev = pc.evaluate(model, vec, trait, coefs=[0], questions=2, max_new_tokens=3, progress=False)
    assert [r["layer"] for r in ev] == [vec.layer]
    assert [s["question"] for s in ev[0]["samples"]] == QUESTIONS[:2]
    no_eval = pc.Trait.from_dict({**TRAIT, "eval_questions": [], "ab_items": []})
    with pytest.warns(UserWarning, match="has no evaluation questions: holding out 1 of its 3"):
        ev = pc.evaluate(model, vec, no_eval, coefs=[0], max_new_tokens=3, progress=False)
    assert [s["question"] for s in ev[0]["samples"]] == no_eval.held_out_split()[1]
    assert ev[0]["ab_gap"] is None  # no A/B items
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # questions given: no split, no warning
        ev = pc.evaluate(
            model, vec, no_eval, coefs=[0], questions=["hello ?"], max_new_tokens=3, progress=False
        )
    assert [s["question"] for s in ev[0]["samples"]] == ["hello ?"]


def test_bad_arguments_are_typed_errors(tiny):
    model, vec, trait, _ = tiny
    L = model.num_layers

    def run(**kw):
        kw.setdefault("coefs", [0])
        return pc.evaluate(model, kw.pop("vector", vec), trait, progress=False, **kw)

    cases = [
        (dict(layers=[]), "layers is empty"),
        (dict(layers=[0]), rf"layer 0 is not steerable: .* 1\.\.{L - 1}"),
        (dict(layers=[L]), f"layer {L} is not steerable"),
        (dict(layers=["1"]), "layers must be ints"),
        (dict(coefs=[]), "coefs is empty"),
        (dict(coefs=[float("nan")]), "coefs must be finite"),
        (dict(coefs=[float("inf")]), "coefs must be finite"),
        (dict(questions=0), "questions must be a positive int"),
        (dict(questions=[]), "questions must be None"),
        (dict(questions=[""]), "questions must be None"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
        (dict(vector=pc.PersonaVector(np.ones((L + 1, 8)), layer=1)), "is for another model"),
        (dict(vector=pc.PersonaVector(np.ones((L + 2, 64)), layer=1)), "is for another model"),
        (dict(vector=pc.PersonaVector(np.ones((L + 1, 64)))), "has no recommended layer"),
        (dict(vector="not a vector".split()), "must be a PersonaVector"),
    ]
    for kw, message in cases:
        with pytest.raises(pc.InvalidInputError, match=message):
            run(**kw)
    with pytest.raises(pc.TraitError):
        pc.evaluate(model, vec, "no-such-trait", coefs=[0], progress=False)


def test_save_load_pandas_and_table(tiny, tmp_path, monkeypatch):
    model, vec, trait, _ = tiny
    ev = pc.evaluate(model, vec, trait, layers=[1], coefs=[0, -2], max_new_tokens=3, progress=False)
    back = pc.Evaluation.load(ev.save(tmp_path / "sub" / "eval.json"))
    assert back.rows == ev.rows and back.metadata == ev.metadata
    raw = json.loads((tmp_path / "sub" / "eval.json").read_text())
    assert raw["format"] == "personacore.evaluation" and len(raw["rows"]) == 2
    table = ev.table().splitlines()
    assert len(table) == 3 and table[0].split()[:2] == ["layer", "coef"]
    assert table[2].split()[1] == "-2"
    pd = pytest.importorskip("pandas")
    df = ev.to_pandas()
    assert isinstance(df, pd.DataFrame) and "samples" not in df.columns
    assert list(df["coef"]) == [0.0, -2.0] and list(df["projection"]) == [
        r["projection"] for r in ev
    ]
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="needs pandas"):
        ev.to_pandas()
    (tmp_path / "other.json").write_text('{"rows": []}')
    with pytest.raises(pc.InvalidInputError, match="not a personacore evaluation file"):
        pc.Evaluation.load(tmp_path / "other.json")
    with pytest.raises(pc.InvalidInputError, match="must be a dict with keys"):
        pc.Evaluation([{"layer": 1}])


# ---- with a judge: a real HTTP server speaking the OpenAI chat completions API ----------------
def test_judge_scores_trait_and_coherence(tiny, serve):
    from test_judges import _completion

    model, vec, trait, _ = tiny

    def respond(n, body):
        prompt = body["messages"][0]["content"]
        if "COHERENCE" in prompt:
            return 200, None, _completion([("80", 0.5), ("90", 0.5)])  # 85
        if "what is your name" in prompt:
            return 200, None, _completion([("maybe", 1.0)])  # no number: no score
        return 200, None, _completion([("30", 0.75), ("50", 0.25)])  # 35

    server = serve(respond)
    judge = pc.OpenAIJudge(model="judge-model", base_url=server.base_url, api_key="sk-test")
    ev = pc.evaluate(
        model, vec, trait, layers=[2], coefs=[0, 2], judge=judge, max_new_tokens=4, progress=False
    )
    for row in ev:
        assert row["trait_score"] == pytest.approx(35.0)  # the unscored reply is left out
        assert row["coherence"] == pytest.approx(85.0)
        assert row["ab_gap"] is None  # a judge replaces the A/B check
        first = row["samples"][0]
        assert first["trait_score"] is None and first["coherence"] == pytest.approx(85.0)
        assert all(s["trait_score"] == pytest.approx(35.0) for s in row["samples"][1:])
    prompts = {b["messages"][0]["content"] for _, b in server.requests}
    s = ev[1]["samples"][2]
    assert trait.render_eval_prompt(s["question"], s["answer"]) in prompts
    assert (
        pc.COHERENCE_PROMPT.replace("{question}", s["question"]).replace("{answer}", s["answer"])
        in prompts
    )
    assert ev.metadata["judge"].startswith("OpenAIJudge(")


@pytest.fixture
def serve():
    from test_judges import FakeOpenAI

    pytest.importorskip("openai")
    servers = []

    def start(respond, delay=0.0):
        s = FakeOpenAI(respond, delay)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


# ---- the default model: a vector made from the trait's A/B answers ------------------------------
def test_positive_coef_raises_the_projection(default_model):
    """A mean-difference vector of the impolite trait's A/B answers (impolite − neutral replies,
    response_avg at every layer), steered at layer 12: the replies project higher on it."""
    model = default_model
    trait = pc.Trait.load("impolite")
    items = trait.ab_items[:10]
    prompts = [[{"role": "user", "content": it["question"]}] for it in items]
    pos = model.pool(prompts, [it["trait_answer"] for it in items], poolings="response_avg")
    neg = model.pool(prompts, [it["neutral_answer"] for it in items], poolings="response_avg")
    vec = pc.PersonaVector(
        pos["response_avg"].mean(0) - neg["response_avg"].mean(0), layer=12, name="impolite"
    )
    ev = pc.evaluate(
        model,
        vec,
        trait,
        layers=[12],
        coefs=[0, 4],
        questions=3,
        max_new_tokens=16,
        ab_items=2,
        progress=False,
    )
    base, steered = ev.rows
    assert steered["projection"] > base["projection"] + 5.0, ev.table()
    assert steered["ab_gap"] > base["ab_gap"], ev.table()
