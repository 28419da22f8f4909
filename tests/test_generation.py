"""Generation on the default model: greedy parity with transformers, batching, sampling, stop
conditions, input forms, streaming (including Ctrl-C), and bad input rejected before compute."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import personacore as pc

SHORT = [{"role": "user", "content": "Answer with one word: what color is the sky?"}]


@pytest.fixture(scope="module")
def short_reply(default_model):
    """A prompt whose greedy reply ends with an end-of-turn token within a few tokens."""
    out = default_model.generate(SHORT, max_new_tokens=24)
    assert out.finish_reason == "eos", out
    return out


def test_greedy_matches_transformers(default_model, reference):
    for conv in reference.conversations:
        out = default_model.generate(conv.prompt_ids, max_new_tokens=16)
        assert out.token_ids == conv.greedy, conv.index
        assert out.text == conv.greedy_text
        assert out.finish_reason == "length" and out.prompt_ids == conv.prompt_ids
        assert out.prompt_len == conv.prompt_len and out.scores == {} and out.events == []


def test_input_forms(default_model, reference):
    c0, c1 = reference.conversations
    # A chat, and a str (one user message: the template adds the default system prompt).
    chat = default_model.generate(c0.messages, max_new_tokens=3)
    assert chat.prompt_ids == c0.prompt_ids and chat.token_ids == c0.greedy[:3]
    user = default_model.generate(c1.messages[-1]["content"], max_new_tokens=3)
    assert user.prompt_ids == c1.prompt_ids and user.token_ids == c1.greedy[:3]
    # ids as a numpy array and as a tuple.
    arr = default_model.generate(np.array(c0.prompt_ids), max_new_tokens=3)
    assert arr.token_ids == c0.greedy[:3]
    assert default_model.generate(tuple(c0.prompt_ids), max_new_tokens=3).token_ids == c0.greedy[:3]
    # A batch of mixed forms returns a list, even with one item.
    batch = default_model.generate(
        [c0.messages, c1.messages[-1]["content"], c0.prompt_ids], max_new_tokens=3
    )
    assert [g.token_ids for g in batch] == [c0.greedy[:3], c1.greedy[:3], c0.greedy[:3]]
    one = default_model.generate([c0.prompt_ids], max_new_tokens=2)
    assert isinstance(one, list) and one[0].token_ids == c0.greedy[:2]


def test_batched_greedy_equals_one_by_one(default_model, reference):
    c0, c1 = reference.conversations
    assert c0.prompt_len != c1.prompt_len
    batch = default_model.generate([c0.prompt_ids, c1.prompt_ids], max_new_tokens=16)
    assert [g.token_ids for g in batch] == [c0.greedy, c1.greedy]
    assert [g.text for g in batch] == [c0.greedy_text, c1.greedy_text]


def test_sampling_is_reproducible(default_model, reference):
    ids = reference.conversations[0].prompt_ids
    kw = dict(max_new_tokens=8, temperature=1.0, ignore_eos=True)
    a = default_model.generate(ids, seed=1, **kw)
    b = default_model.generate(ids, seed=1, **kw)
    c = default_model.generate(ids, seed=2, **kw)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    # Filters that leave one candidate give the greedy tokens.
    greedy = reference.conversations[0].greedy[:6]
    assert (
        default_model.generate(ids, max_new_tokens=6, temperature=0.7, top_k=1, seed=3).token_ids
        == greedy
    )
    nucleus1 = default_model.generate(ids, max_new_tokens=6, temperature=0.7, top_p=1e-6, seed=3)
    assert nucleus1.token_ids == greedy
    # Sequence i of a batch samples with seed + i.
    batch = default_model.generate([ids, ids], seed=1, **kw)
    assert batch[0].token_ids == a.token_ids and batch[1].token_ids == c.token_ids


def test_top_k_and_top_p_keep_only_their_candidates(default_model):
    ids = default_model.encode_chat([{"role": "user", "content": "Name a fruit."}])
    logits = default_model.logits(ids)[-1].astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p)
    nucleus = set(order[: int(np.searchsorted(np.cumsum(p[order]), 0.6)) + 1].tolist())
    assert 2 < len(nucleus) < 50
    k3 = default_model.generate([ids] * 12, max_new_tokens=1, temperature=1.0, top_k=3, seed=5)
    assert {g.token_ids[0] for g in k3} <= set(order[:3].tolist())
    tp = default_model.generate([ids] * 12, max_new_tokens=1, temperature=1.0, top_p=0.6, seed=5)
    got = {g.token_ids[0] for g in tp}
    assert got <= nucleus and len(got) > 1


def test_max_new_tokens(default_model, reference):
    ids = reference.conversations[1].prompt_ids
    for n in (1, 3):
        out = default_model.generate(ids, max_new_tokens=n)
        assert len(out.token_ids) == n and out.finish_reason == "length"


def test_stop_strings(default_model, reference):
    conv = reference.conversations[0]  # "Tying shoes is a classic and timeless task. ..."
    out = default_model.generate(conv.prompt_ids, max_new_tokens=16, stop=["classic", "zzz"])
    assert out.finish_reason == "stop"
    assert out.text == conv.greedy_text[: conv.greedy_text.index("classic")]
    assert len(out.token_ids) < 16
    # A stop string spanning tokens, given as a str.
    out = default_model.generate(conv.prompt_ids, max_new_tokens=16, stop="task. You")
    assert (
        out.finish_reason == "stop"
        and out.text == conv.greedy_text[: conv.greedy_text.index("task. You")]
    )


def test_eos_and_ignore_eos(default_model, short_reply):
    eos = default_model.tokenizer.eos_token_ids
    assert short_reply.token_ids[-1] in eos
    assert all(t not in eos for t in short_reply.token_ids[:-1])
    n = len(short_reply.token_ids) + 3
    out = default_model.generate(SHORT, max_new_tokens=n, ignore_eos=True)
    assert len(out.token_ids) == n and out.finish_reason == "length"
    assert out.token_ids[: len(short_reply.token_ids)] == short_reply.token_ids


def test_generation_object(default_model, reference):
    conv = reference.conversations[0]
    out = default_model.generate(
        conv.prompt_ids,
        max_new_tokens=4,
        monitor=pc.Monitor({"v": np.ones(576, np.float32)}, layers=[2, 9]),
    )
    r = repr(out)
    assert r.startswith("Generation(text=") and "n_generated=4" in r and "'v': (" in r
    assert out.ids == conv.prompt_ids + out.token_ids
    assert out.is_generated.sum() == 4 and not out.is_generated[: out.prompt_len].any()
    assert out.early_warning["v"].shape == (2,)


# ---- streaming -------------------------------------------------------------------------------
def test_stream_matches_generate(default_model, reference):
    conv = reference.conversations[1]
    st = default_model.stream(conv.prompt_ids, max_new_tokens=8)
    steps = list(st)
    assert [s.token_id for s in steps] == conv.greedy[:8]
    assert conv.greedy_text.startswith("".join(s.text for s in steps))
    assert [s.finish_reason for s in steps] == [None] * 7 + ["length"]
    assert all(s.scores == {} and s.events == [] for s in steps)
    assert st.done and next(st, None) is None
    g = st.generation()
    assert g.token_ids == conv.greedy[:8] and g.finish_reason == "length"
    assert g.text == "".join(s.text for s in steps)


def test_stream_close(default_model, reference):
    conv = reference.conversations[0]
    with default_model.stream(conv.prompt_ids, max_new_tokens=50, ignore_eos=True) as st:
        first = [next(st).token_id for _ in range(3)]
        st.close()
        st.close()  # idempotent
        assert st.done and next(st, None) is None
    g = st.generation()
    assert g.token_ids == first == conv.greedy[:3] and g.finish_reason is None


class _InterruptingSession:
    """Delivers SIGINT while the engine is inside a step (as a real Ctrl-C would)."""

    def __init__(self, session, at_calls):
        self._s, self._at, self.calls = session, set(at_calls), 0

    def step(self):
        out = self._s.step()
        self.calls += 1
        if self.calls in self._at:
            signal.raise_signal(signal.SIGINT)
        return out

    def __getattr__(self, name):
        return getattr(self._s, name)


@pytest.fixture
def default_sigint():
    """Python's default SIGINT handler (KeyboardInterrupt), whatever the test runner inherited."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_ctrl_c_during_a_step_loses_nothing(default_model, reference, default_sigint):
    conv = reference.conversations[1]
    st = default_model.stream(conv.prompt_ids, max_new_tokens=10, ignore_eos=True)
    st._session = _InterruptingSession(st._session, at_calls={2, 5})
    tokens, interrupts = [], 0
    while True:
        try:
            step = next(st)
        except KeyboardInterrupt:
            interrupts += 1
            continue
        except StopIteration:
            break
        tokens.append(step.token_id)
    assert interrupts == 2
    assert tokens == conv.greedy[:10]  # nothing lost, nothing repeated, same tokens
    assert st.generation().token_ids == conv.greedy[:10]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_real_ctrl_c_in_a_subprocess(default_model_path, tmp_path):
    """A real SIGINT while a stream runs: KeyboardInterrupt, consistent partial result, close()."""
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent("""
        import json, signal, sys
        import personacore as pc
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even if SIGINT was inherited ignored
        m = pc.load_model()
        st = m.stream("Write a long story about a dragon.", max_new_tokens=400, ignore_eos=True)
        n = 0
        try:
            for step in st:
                n += 1
                if n == 1:
                    print("ready", flush=True)
        except KeyboardInterrupt:
            st.close()
            g = st.generation()
            print(json.dumps({"interrupted": True, "seen": n, "tokens": len(g.token_ids),
                              "finish": g.finish_reason, "done": st.done}), flush=True)
            sys.exit(0)
        print(json.dumps({"interrupted": False}), flush=True)
    """)
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["interrupted"] and res["done"] and res["finish"] is None
    # Every token the engine made is in the result; at most the interrupted step was not yet seen.
    assert res["seen"] <= res["tokens"] <= res["seen"] + 1 and res["tokens"] < 400


# ---- bad input: typed errors before any compute ----------------------------------------------
class _NoCompute:
    """Stands in for the engine: tokenizing/templating is allowed, computing is a test failure."""

    def __init__(self, core):
        self._core = core

    def __getattr__(self, name):
        if name in ("generate_start", "logits", "hidden_states", "pool"):

            def fail(*a, **k):
                raise AssertionError(f"{name} was called: validation should have failed first")

            return fail
        return getattr(self._core, name)


@pytest.fixture
def guarded(default_model, monkeypatch):
    monkeypatch.setattr(default_model, "_core", _NoCompute(default_model._core))
    return default_model


V = np.random.default_rng(0).standard_normal((31, 576)).astype(np.float32)
NAN = V.copy()
NAN[10, 3] = np.nan
IDS = [1, 2, 3]


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda m: m.generate(IDS, steer=pc.Steer(V, 1.0, layers=[10], positions="middle")),
            "positions",
        ),
        (lambda m: m.generate(IDS, steer=pc.Steer(V[:, :500], 1.0, layers=[10])), "width 500"),
        (lambda m: m.generate(IDS, steer=pc.Steer(V[10, :500], 1.0, layers=[10])), "width 500"),
        (lambda m: m.generate(IDS, steer=pc.Steer(V[:30], 1.0, layers=[10])), "30 rows"),
        (lambda m: m.generate(IDS, steer=pc.Steer(V, 1.0, layers=[0])), "not steerable"),
        (lambda m: m.generate(IDS, steer=pc.Steer(V, 1.0, layers=[30])), "not steerable"),
        (lambda m: m.generate(IDS, steer=pc.Ablate(V, [-1])), "not steerable"),
        (lambda m: m.generate(IDS, steer=pc.Steer(V, 1.0)), "layers"),
        (lambda m: m.generate(IDS, steer=pc.Steer(NAN, 1.0, layers=[10])), "NaN"),
        (lambda m: m.generate(IDS, steer=pc.Steer(V, float("nan"), layers=[10])), "finite"),
        (lambda m: m.generate(IDS, steer=pc.Steer(V, float("inf"), layers=[10])), "finite"),
        (lambda m: m.generate(IDS, steer=pc.Cap(V, [10], min=float("-inf"))), "finite"),
        (lambda m: m.generate(IDS, steer=pc.Cap(V, [10], min=2.0, max=1.0)), "greater"),
        (lambda m: m.generate(IDS, steer=pc.Ablate(np.zeros(576), [10])), "zero"),
        (lambda m: m.generate(IDS, steer="evil"), "pc.Steer"),
        (lambda m: m.generate([IDS, IDS], steer=[[pc.Steer(V, 1.0, layers=[4])]]), "per-sequence"),
        (lambda m: m.generate(IDS, max_new_tokens=0), "max_new_tokens"),
        (lambda m: m.generate(IDS, max_new_tokens=-5), "max_new_tokens"),
        (lambda m: m.generate(IDS, max_new_tokens=2.0), "max_new_tokens"),
        (lambda m: m.generate([1] * m.max_position_embeddings), "context window"),
        (
            lambda m: m.generate([[5], [1] * (m.max_position_embeddings + 1)]),
            "max_position_embeddings",
        ),
        (lambda m: m.generate(IDS, temperature=-0.1), "temperature"),
        (lambda m: m.generate(IDS, temperature=float("nan")), "temperature"),
        (lambda m: m.generate(IDS, top_p=0.0), "top_p"),
        (lambda m: m.generate(IDS, top_p=1.01), "top_p"),
        (lambda m: m.generate(IDS, top_k=-1), "top_k"),
        (lambda m: m.generate(IDS, seed=-1), "seed"),
        (lambda m: m.generate(IDS, stop=[""]), "stop"),
        (lambda m: m.generate(IDS, stop=[3]), "stop"),
        (lambda m: m.generate(IDS, ignore_eos="yes"), "ignore_eos"),
        (lambda m: m.generate(IDS, monitor="evil"), "monitor"),
        (
            lambda m: m.generate(
                IDS,
                steer=pc.Steer(V, 1.0, layers=[4], when=pc.When("evil", above=1.0)),
                monitor=pc.Monitor({"calm": V}, layers=[4]),
            ),
            "'evil'",
        ),
        (lambda m: m.generate(IDS, audit_log="/nonexistent-dir/audit.jsonl"), "does not exist"),
        (lambda m: m.generate(IDS, audit_log=os.getcwd()), "directory"),
        (lambda m: m.generate([]), "empty"),
        (lambda m: m.generate([[]]), "empty"),
        (lambda m: m.generate([1, -2]), "out of range"),
        (lambda m: m.generate([1, 10**6]), "out of range"),
        (lambda m: m.generate({"role": "user", "content": "hi"}), "list of messages"),
        (lambda m: m.generate([{"role": "user", "content": "hi"}, 5]), "prompt"),
        (lambda m: m.generate(42), "prompt"),
        (lambda m: m.stream([IDS, IDS]), "single prompt"),
        (lambda m: m.stream(IDS, max_new_tokens=0), "max_new_tokens"),
        (lambda m: m.logits(IDS, steer=pc.Steer(V, 1.0, layers=[30])), "not steerable"),
        (lambda m: m.hidden_states(IDS, steer=pc.Steer(V[:, :5], 1.0, layers=[3])), "width 5"),
        (
            lambda m: m.logits(IDS, steer=pc.Steer(V, 1.0, layers=[3], when=("x", "above", 0.0))),
            "conditional",
        ),
    ],
)
def test_bad_input_is_rejected_before_compute(guarded, call, match):
    with pytest.raises(pc.InvalidInputError, match=match):
        call(guarded)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: pc.Steer(V, 1.0, layers=[10], positions="last"), "positions"),
        (lambda: pc.Steer(V, "big", layers=[10]), "coef"),
        (lambda: pc.Steer(V, True, layers=[10]), "coef"),
        (lambda: pc.Steer(V, 1.0, layers=[]), "empty"),
        (lambda: pc.Steer(V, 1.0, layers=[3, 3]), "twice"),
        (lambda: pc.Steer(V, 1.0, layers=["3"]), "ints"),
        (lambda: pc.Steer(V, 1.0, layers=[3], when="evil > 3"), "when"),
        (lambda: pc.Steer(np.ones((2, 3, 4)), 1.0, layers=[1]), "shape"),
        (lambda: pc.Steer(np.array([np.inf]), 1.0, layers=[1]), "NaN or inf"),
        (lambda: pc.Cap(V, [3]), "min=, max="),
        (lambda: pc.When("evil"), "exactly one"),
        (lambda: pc.When("evil", above=1.0, below=0.0), "exactly one"),
        (lambda: pc.When("evil", above=1.0, hysteresis=-1.0), "hysteresis"),
        (lambda: pc.When("", above=1.0), "name"),
    ],
)
def test_bad_steer_arguments(make, match):
    with pytest.raises(pc.InvalidInputError, match=match):
        make()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_prefill_runs_the_last_layer_for_the_last_position(tmp_path, arch):
    """A prompt's first token comes from a prefill that runs the last layer for the last
    position only (no hook reads the last rows); greedy tokens must equal those picked from full
    forwards without a cache (every position through every layer), for one prompt, a batch with
    left padding, and with a monitor at every row (which keeps every position)."""
    import tiny_models as tm

    tm.write_tiny_model(tmp_path, arch, seed=3, initializer_range=0.2)
    model = pc.load_model(str(tmp_path))
    rng = np.random.default_rng(7)
    prompts = [[int(x) for x in rng.integers(5, 90, n)] for n in (23, 9, 16)]

    def by_full_forwards(ids, n):
        ids = list(ids)
        for _ in range(n):
            ids.append(int(np.argmax(model.logits(ids)[-1])))
        return ids[-n:]

    want = [by_full_forwards(p, 6) for p in prompts]
    for p, w in zip(prompts, want):
        got = model.generate(p, max_new_tokens=6, temperature=0.0, ignore_eos=True).token_ids
        assert list(got) == w, (arch, len(p))
    batched = model.generate(prompts, max_new_tokens=6, temperature=0.0, ignore_eos=True)
    assert [list(g.token_ids) for g in batched] == want, arch
    vec = pc.PersonaVector(rng.standard_normal((model.num_layers + 1, model.hidden_size)))
    watched = model.generate(
        prompts[0],
        max_new_tokens=6,
        temperature=0.0,
        ignore_eos=True,
        monitor=pc.Monitor({"v": vec}, layers="all"),
    )
    assert list(watched.token_ids) == want[0], arch
