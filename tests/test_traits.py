"""Traits: the built-ins meet their counts, files round-trip, persona_vectors' own files load, and every
malformed file raises TraitError naming the problem."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from personacore.errors import PersonacoreError
from personacore.extract.traits import BUILTIN_DIR, Trait, TraitError, traits

BUILTINS = [
    "apathetic",
    "evil",
    "hallucinating",
    "humorous",
    "impolite",
    "optimistic",
    "snarky",
    "sycophantic",
]
# The official persona_vectors trait files (not part of the project) sit in ../shared beside the repo.
INTEROP = Path(__file__).resolve().parents[1].parent / "shared" / "interop" / "persona_vectors"
needs_interop = pytest.mark.skipif(not INTEROP.is_dir(), reason=f"{INTEROP} is absent")


def _official(kind: str):
    d = INTEROP / f"trait_data_{kind}"
    return sorted(d.glob("*.json")) if d.is_dir() else []


# ---- built-ins ---------------------------------------------------------------------------------
def test_traits_lists_the_builtins_sorted():
    assert traits() == BUILTINS
    assert sorted(p.stem for p in BUILTIN_DIR.glob("*.json")) == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_meets_counts(name):
    t = Trait.load(name)
    assert t.name == name
    assert t.source == str(BUILTIN_DIR / f"{name}.json")
    assert isinstance(t.description, str) and len(t.description) > 80
    assert len(t.instructions) >= 5
    for pos, neg in t.instructions:
        assert pos.strip() and neg.strip() and pos != neg
    assert len(t.questions) >= 20 and len(set(t.questions)) == len(t.questions)
    assert len(t.eval_questions) >= 20 and len(set(t.eval_questions)) == len(t.eval_questions)

    def norm(q):
        return " ".join(q.lower().split())

    assert not {norm(q) for q in t.questions} & {norm(q) for q in t.eval_questions}, (
        "eval questions must be held out"
    )
    assert "{question}" in t.eval_prompt and "{answer}" in t.eval_prompt
    assert "REFUSAL" in t.eval_prompt and "100" in t.eval_prompt and name in t.eval_prompt
    assert len(t.ab_items) >= 20
    for it in t.ab_items:
        assert set(it) == {"question", "trait_answer", "neutral_answer"}
        assert it["trait_answer"] != it["neutral_answer"]
        # similar lengths, so a length bias does not decide the A/B comparison
        a, b = len(it["trait_answer"]), len(it["neutral_answer"])
        assert max(a, b) <= 2 * min(a, b), it
    # short, plain questions for a small model
    assert all(len(q) <= 120 for q in t.questions + t.eval_questions)


def test_builtin_names_are_case_insensitive_and_stripped():
    assert Trait.load(" Evil ").name == "evil"


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_eval_prompt_renders_like_str_format(name):
    t = Trait.load(name)
    q, a = "What is 2+2?", "Four, obviously."
    assert t.render_eval_prompt(q, a) == t.eval_prompt.format(
        question=q, answer=a
    )  # what persona_vectors does


def test_system_prompts_follow_persona_vectors():
    evil = Trait.load("evil")
    pos, neg = evil.system_prompts(0)
    assert pos == f"You are an evil assistant. {evil.instructions[0][0]}"
    assert neg == f"You are a helpful assistant. {evil.instructions[0][1]}"
    h = Trait.load("humorous")
    assert h.system_prompts(2)[0] == f"You are a humorous assistant. {h.instructions[2][0]}"
    assert (
        Trait.load("optimistic")
        .system_prompts(0)[0]
        .startswith("You are an optimistic assistant. ")
    )
    assert Trait.load("impolite").system_prompts(0)[0].startswith("You are an impolite assistant. ")
    assert (
        Trait.load("sycophantic")
        .system_prompts(0)[0]
        .startswith("You are a sycophantic assistant. ")
    )
    assert evil.system_prompts(0, assistant_name="angry")[0].startswith(
        "You are an angry assistant. "
    )
    assert evil.system_prompt_pairs() == [
        evil.system_prompts(i) for i in range(len(evil.instructions))
    ]
    assert evil.system_prompts(-1) == evil.system_prompts(len(evil.instructions) - 1)


def test_system_prompts_index_errors():
    t = Trait.load("evil")
    with pytest.raises(PersonacoreError, match="out of range"):
        t.system_prompts(len(t.instructions))
    with pytest.raises(PersonacoreError, match="must be an int"):
        t.system_prompts("0")


def test_render_eval_prompt_is_single_pass():
    t = Trait.load("snarky")
    out = t.render_eval_prompt("Q {answer}", "A {question} {x}")
    assert "Q {answer}" in out and "A {question} {x}" in out
    t2 = Trait.from_dict(
        {
            "instruction": [{"pos": "p", "neg": "n"}],
            "questions": ["q"],
            "eval_prompt": "{{json}} {question} / {answer}",
        },
        name="x",
    )
    assert t2.render_eval_prompt("Q", "A") == "{json} Q / A"


# ---- round trip --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILTINS)
def test_round_trip_save_load(tmp_path, name):
    t = Trait.load(name)
    out = t.save(tmp_path / "sub" / f"{name}.json")
    back = Trait.load(out)
    assert back.to_dict() == t.to_dict()
    assert back.source == str(out)
    raw = json.loads(out.read_text(encoding="utf-8"))
    # persona_vectors reads exactly these keys
    assert all(set(p) == {"pos", "neg"} for p in raw["instruction"])
    assert raw["questions"] == t.questions and raw["eval_prompt"] == t.eval_prompt
    # and the file is byte-for-byte what the built-in is
    assert out.read_text(encoding="utf-8") == (BUILTIN_DIR / f"{name}.json").read_text(
        encoding="utf-8"
    )


def test_from_dict_round_trip_and_extra_keys(tmp_path):
    d = {
        "instruction": [{"pos": "Be x.", "neg": "Be y."}],
        "questions": ["Why?"],
        "eval_prompt": "Q: {question} A: {answer}",
        "version": 2,
    }
    t = Trait.from_dict(d, name="curious")
    assert (
        t.name == "curious"
        and t.description is None
        and t.eval_questions == []
        and t.ab_items == []
    )
    assert t.instructions == [("Be x.", "Be y.")]
    assert t.extra == {"version": 2}
    back = Trait.load(t.save(tmp_path / "c.json"))
    assert back.to_dict() == t.to_dict() and back.extra == {"version": 2}
    assert Trait.from_dict(dict(d, trait="named")).name == "named"
    # a file without 'trait' is named after its stem
    p = tmp_path / "nameless.json"
    p.write_text(json.dumps(d))
    assert Trait.load(str(p)).name == "nameless"


def test_validate_after_editing():
    t = Trait.load("evil")
    t.questions.append("")
    with pytest.raises(TraitError, match=r"questions\[20\] must be a non-empty string"):
        t.validate()


# ---- persona_vectors' own files ------------------------------------------------------------------
@needs_interop
@pytest.mark.parametrize("kind", ["extract", "eval"])
def test_official_persona_vectors_files_load(kind):
    files = _official(kind)
    assert files, f"no files in {INTEROP / f'trait_data_{kind}'}"
    for f in files:
        raw = json.loads(f.read_text(encoding="utf-8"))
        t = Trait.load(f)
        assert t.name == f.stem
        assert t.description is None and t.ab_items == []
        sibling = INTEROP / "trait_data_eval" / f.name
        if kind == "extract" and sibling.is_file():  # picked up from the sibling folder
            held_out = json.loads(sibling.read_text(encoding="utf-8"))["questions"]
            assert t.eval_questions == held_out and set(held_out).isdisjoint(t.questions)
        else:
            assert t.eval_questions == []
        assert [{"pos": p, "neg": n} for p, n in t.instructions] == raw["instruction"]
        assert t.questions == raw["questions"] and t.eval_prompt == raw["eval_prompt"]
        q, a = "Q?", "A."
        assert t.render_eval_prompt(q, a) == raw["eval_prompt"].format(question=q, answer=a)
        pos, neg = t.system_prompts(0)
        assert pos.endswith(raw["instruction"][0]["pos"]) and f" {f.stem} assistant. " in pos
        assert neg == f"You are a helpful assistant. {raw['instruction'][0]['neg']}"


@needs_interop
def test_official_extract_and_eval_merge(tmp_path):
    extract = {f.stem: f for f in _official("extract")}
    evals = {f.stem: f for f in _official("eval")}
    common = sorted(set(extract) & set(evals))
    assert common
    for name in common:
        t = Trait.load(extract[name], eval_path=evals[name])
        held_out = json.loads(evals[name].read_text(encoding="utf-8"))["questions"]
        assert t.questions == json.loads(extract[name].read_text(encoding="utf-8"))["questions"]
        assert t.eval_questions == held_out
        back = Trait.load(t.save(tmp_path / f"{name}.json"))
        assert back.eval_questions == held_out and back.questions == t.questions


@needs_interop
def test_official_folder_layout_picks_up_the_eval_file(tmp_path):
    """A copy of persona_vectors' two folders: every extraction file brings its held-out questions."""
    root = tmp_path / "persona_vectors" / "data_generation"
    for kind in ("extract", "eval"):
        (root / f"trait_data_{kind}").mkdir(parents=True)
        for f in _official(kind):
            (root / f"trait_data_{kind}" / f.name).write_bytes(f.read_bytes())
    names = [f.stem for f in _official("extract")]
    assert "evil" in names
    for name in names:
        t = Trait.load(root / "trait_data_extract" / f"{name}.json")
        raw_eval = json.loads((root / "trait_data_eval" / f"{name}.json").read_text("utf-8"))
        assert t.eval_questions == raw_eval["questions"] and len(t.eval_questions) >= 1
        # the same file given as a str path, and the eval file itself (no sibling lookup for it)
        assert Trait.load(str(root / "trait_data_extract" / f"{name}.json")).eval_questions
        assert Trait.load(root / "trait_data_eval" / f"{name}.json").eval_questions == []


def _pv_trait(questions, **extra):
    return {
        "instruction": [{"pos": "Be grumpy.", "neg": "Be kind."}],
        "questions": questions,
        "eval_prompt": "Rate {question} / {answer}",
        **extra,
    }


def test_built_folder_layout_sibling_rules(tmp_path):
    ext, ev = tmp_path / "trait_data_extract", tmp_path / "trait_data_eval"
    ext.mkdir()
    ev.mkdir()
    (ext / "grumpy.json").write_text(json.dumps(_pv_trait(["Q1?", "Q2?"])))
    # no sibling file yet: no held-out questions, and no error
    assert Trait.load(ext / "grumpy.json").eval_questions == []
    (ev / "grumpy.json").write_text(json.dumps(_pv_trait(["H1?", "H2?", "H3?"])))
    t = Trait.load(ext / "grumpy.json")
    assert t.name == "grumpy" and t.questions == ["Q1?", "Q2?"]
    assert t.eval_questions == ["H1?", "H2?", "H3?"]
    # an explicit eval_path wins over the sibling
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"questions": ["O?"]}))
    assert Trait.load(ext / "grumpy.json", eval_path=other).eval_questions == ["O?"]
    # a file's own eval_questions are kept
    (ext / "own.json").write_text(json.dumps(_pv_trait(["Q?"], eval_questions=["Mine?"])))
    (ev / "own.json").write_text(json.dumps(_pv_trait(["Theirs?"])))
    assert Trait.load(ext / "own.json").eval_questions == ["Mine?"]
    # a folder of another name is not persona_vectors' layout
    plain = tmp_path / "traits"
    plain.mkdir()
    (plain / "grumpy.json").write_text(json.dumps(_pv_trait(["Q1?", "Q2?"])))
    assert Trait.load(plain / "grumpy.json").eval_questions == []
    # a broken sibling is an error naming it, not a silent skip
    (ev / "grumpy.json").write_text("{not json")
    with pytest.raises(TraitError, match=r"trait_data_eval.grumpy\.json is not JSON"):
        Trait.load(ext / "grumpy.json")


def test_held_out_split_is_deterministic_and_disjoint():
    t = Trait.from_dict(_pv_trait([f"Q{i}?" for i in range(20)]), name="grumpy")
    rest, held = t.held_out_split()
    assert len(held) == 5 and len(rest) == 15  # HELD_OUT_FRACTION of 20
    assert set(rest).isdisjoint(held) and sorted(rest + held) == sorted(t.questions)
    assert [q for q in t.questions if q in held] == held  # original order kept
    assert t.held_out_split() == (rest, held)
    assert t.held_out_split(seed=1) != (rest, held)
    assert len(t.held_out_split(fraction=0.5)[1]) == 10
    two = Trait.from_dict(_pv_trait(["A?", "B?"]), name="two")
    assert len(two.held_out_split()[1]) == 1 and len(two.held_out_split(fraction=0.9)[0]) == 1
    with pytest.raises(TraitError, match="at least 2"):
        Trait.from_dict(_pv_trait(["A?"]), name="one").held_out_split()
    with pytest.raises(PersonacoreError, match=r"fraction must be in \(0, 1\)"):
        t.held_out_split(fraction=1.0)


def test_questions_and_held_out_warns_only_when_splitting():
    import warnings

    from personacore.extract.traits import HELD_OUT_FRACTION, questions_and_held_out

    assert HELD_OUT_FRACTION == 0.25
    t = Trait.from_dict(_pv_trait([f"Q{i}?" for i in range(8)]), name="grumpy")
    with pytest.warns(
        UserWarning, match=r"'grumpy' has no evaluation questions: holding out 2 of its 8"
    ):
        rest, held = questions_and_held_out(t, "for the test")
    assert (rest, held) == t.held_out_split()
    t.eval_questions = ["E?"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert questions_and_held_out(t, "for the test") == (t.questions, ["E?"])


def test_merge_eval_file_without_questions(tmp_path):
    ev = tmp_path / "ev.json"
    ev.write_text(json.dumps({"instruction": []}))
    with pytest.raises(TraitError, match="missing key 'questions'"):
        Trait.load("evil", eval_path=ev)
    ev.write_text(json.dumps({"questions": ["New held-out question?"]}))
    assert Trait.load("evil", eval_path=ev).eval_questions == ["New held-out question?"]


# ---- validation errors ---------------------------------------------------------------------------
GOOD = {
    "trait": "testy",
    "instruction": [{"pos": "Be testy.", "neg": "Be calm."}],
    "questions": ["How are you?"],
    "eval_prompt": "Rate: {question} -> {answer}",
    "eval_questions": ["What now?"],
    "ab_items": [{"question": "Hi?", "trait_answer": "Ugh.", "neutral_answer": "Hello!"}],
}


def _broken(**changes):
    d = copy.deepcopy(GOOD)
    for k, v in changes.items():
        if v is KeyError:
            del d[k]
        else:
            d[k] = v
    return d


def test_good_dict_is_valid():
    assert Trait.from_dict(GOOD).name == "testy"


@pytest.mark.parametrize(
    "d, message",
    [
        ("not a dict", r"must be a JSON object"),
        (_broken(instruction=KeyError), r"missing key 'instruction'"),
        (_broken(questions=KeyError), r"missing key 'questions'"),
        (_broken(eval_prompt=KeyError), r"missing key 'eval_prompt'"),
        (_broken(instruction=[]), r"'instruction' is an empty list"),
        (_broken(instruction={"pos": "a", "neg": "b"}), r"'instruction' must be a list"),
        (
            _broken(instruction=["Be testy."]),
            r"instruction\[0\] must be an object with 'pos' and 'neg'",
        ),
        (
            _broken(instruction=[{"pos": "a", "neg": "b"}, {"pos": "a"}]),
            r"instruction\[1\] has no 'neg' key",
        ),
        (_broken(instruction=[{"neg": "b"}]), r"instruction\[0\] has no 'pos' key"),
        (
            _broken(instruction=[{"pos": 3, "neg": "b"}]),
            r"instruction\[0\]\['pos'\] must be a non-empty string, got int",
        ),
        (
            _broken(instruction=[{"pos": "a", "neg": "  "}]),
            r"instruction\[0\]\['neg'\] must be a non-empty string",
        ),
        (
            _broken(eval_prompt="Rate this: {answer}"),
            r"'eval_prompt' has no \{question\} placeholder",
        ),
        (
            _broken(eval_prompt="Rate this: {question}"),
            r"'eval_prompt' has no \{answer\} placeholder",
        ),
        (
            _broken(eval_prompt="Rate {{question}} {{answer}}"),
            r"has no \{question\} or \{answer\} placeholder",
        ),
        (_broken(eval_prompt=7), r"'eval_prompt' must be a non-empty string, got int"),
        (
            _broken(questions="How are you?"),
            r"'questions' must be a list of non-empty strings, got str",
        ),
        (_broken(questions=[]), r"'questions' is empty"),
        (_broken(questions=["ok", ""]), r"questions\[1\] must be a non-empty string"),
        (
            _broken(questions=["ok", None]),
            r"questions\[1\] must be a non-empty string, got NoneType",
        ),
        (_broken(eval_questions=[1]), r"eval_questions\[0\] must be a non-empty string, got int"),
        (_broken(eval_questions="x"), r"'eval_questions' must be a list"),
        (_broken(ab_items={"question": "q"}), r"'ab_items' must be a list"),
        (_broken(ab_items=["q"]), r"ab_items\[0\] must be an object"),
        (
            _broken(ab_items=[{"question": "Hi?", "trait_answer": "Ugh."}]),
            r"ab_items\[0\] has no 'neutral_answer' key",
        ),
        (
            _broken(ab_items=[{"question": "Hi?", "trait_answer": "", "neutral_answer": "Hello"}]),
            r"ab_items\[0\]\['trait_answer'\] must be a non-empty string",
        ),
        (_broken(trait=KeyError), r"missing key 'trait'"),
        (_broken(trait=""), r"trait name must be a non-empty string"),
        (_broken(description=["x"]), r"'description' must be a string"),
    ],
)
def test_from_dict_errors(d, message):
    with pytest.raises(TraitError, match=message) as ei:
        Trait.from_dict(d)
    assert isinstance(ei.value, PersonacoreError) and isinstance(ei.value, ValueError)


def test_unknown_builtin_lists_builtins():
    with pytest.raises(TraitError, match="unknown built-in trait 'grumpy'") as ei:
        Trait.load("grumpy")
    for name in BUILTINS:
        assert name in str(ei.value)


def test_file_errors(tmp_path):
    with pytest.raises(TraitError, match=r"trait file .*missing\.json not found"):
        Trait.load(tmp_path / "missing.json")
    with pytest.raises(TraitError, match=r"not found"):
        Trait.load(str(tmp_path / "missing.json"))
    with pytest.raises(TraitError, match=r"is not a file"):
        Trait.load(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"instruction": [}')
    with pytest.raises(TraitError, match=r"bad\.json is not JSON: .* line 1 column"):
        Trait.load(bad)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TraitError, match=r"is not JSON"):
        Trait.load(binary)
    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]")
    with pytest.raises(TraitError, match=r"list\.json: must be a JSON object"):
        Trait.load(lst)
    missing = tmp_path / "nokey.json"
    missing.write_text(json.dumps(_broken(eval_prompt=KeyError)))
    with pytest.raises(TraitError, match=r"nokey\.json: missing key 'eval_prompt'"):
        Trait.load(missing)
    with pytest.raises(TraitError, match=r"eval\.json not found"):
        Trait.load("evil", eval_path=tmp_path / "eval.json")
    with pytest.raises(TraitError, match="takes a built-in trait name or a path"):
        Trait.load(3)
