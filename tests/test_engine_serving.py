"""pc.Engine: continuous batching with per-request steering, monitoring and alert policies.

The scheduler-level tests drive ``model._core.scheduler`` step by step from the test thread, so
they count steps, never time.
"""

import asyncio
import json
import time

import numpy as np
import pytest

import personacore as pc
from personacore.engine.generation import _prepare

PROMPTS = [
    "Say hi.",
    "Count to five.",
    "Name a color.",
    "What is two plus two?",
    "Write one word about the sea.",
    "Tell me a fruit.",
    "Describe the sky in three words.",
    "What day comes after Monday?",
]


@pytest.fixture(scope="module")
def vec(default_model) -> np.ndarray:
    rng = np.random.default_rng(0)
    shape = (default_model.num_layers + 1, default_model.hidden_size)
    return rng.standard_normal(shape).astype(np.float32)


def _plan(model, prompt, **kw):
    kw.setdefault("max_new_tokens", 4)
    plan, ids, _ = _prepare(
        model,
        prompt,
        **{k: kw.get(k) for k in ("steer", "monitor", "audit_log")},
        max_new_tokens=kw["max_new_tokens"],
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        seed=0,
        stop=None,
        ignore_eos=kw.get("ignore_eos", True),
        single=True,
    )
    return plan, ids[0]


def test_greedy_output_alone_equals_beside_15_others(default_model, vec):
    steer = pc.Steer(vec, 4.0, layers=[10])
    mon = pc.Monitor({"v": vec}, layers=[5, 20])
    # Same name and layers, other vector: its rows must not be projected with mon's vectors.
    other = pc.Monitor({"v": np.roll(vec, 1, axis=1)}, layers=[5, 20])
    kinds = [
        {},
        {"steer": steer},
        {"monitor": mon},
        {"steer": pc.Ablate(vec, layers=[8]), "monitor": mon},
        {"monitor": other},
    ]
    reqs = [(PROMPTS[i % 8], kinds[i % 5], 3 + i % 4) for i in range(16)]
    with pc.Engine(default_model, max_batch=16) as engine:
        handles = []
        for k, (prompt, kw, n) in enumerate(reqs):
            handles.append(engine.submit(prompt, max_new_tokens=n, ignore_eos=True, **kw))
            if k % 5 == 4:  # later requests join while earlier ones decode
                next(iter(handles[0]))
        results = [h.result(timeout=600) for h in handles]
        assert engine.stats()["tokens_generated"] == sum(n for _, _, n in reqs)
    for (prompt, kw, n), got in zip(reqs, results):
        alone = default_model.generate(prompt, max_new_tokens=n, ignore_eos=True, **kw)
        assert got.token_ids == alone.token_ids, (prompt, kw)
        assert got.text == alone.text and got.finish_reason == alone.finish_reason == "length"
        for name, s in alone.scores.items():
            np.testing.assert_allclose(got.scores[name], s, rtol=1e-3, atol=1e-3)


def test_scores_of_many_vectors_at_every_layer_equal_generate(default_model, vec):
    # Decode steps are projected on the host and put in column order there; prompt passes go
    # through tensors: both must give model.generate's table, column by column.
    rng = np.random.default_rng(3)
    other = pc.PersonaVector(
        rng.standard_normal(vec.data.shape).astype(np.float32), layer=7, name="o"
    )
    mon = pc.Monitor({"v": vec, "o": other, "w": -vec}, layers="all")
    with pc.Engine(default_model, max_batch=4) as engine:
        handles = [
            engine.submit(p, max_new_tokens=5, ignore_eos=True, monitor=mon) for p in PROMPTS[:3]
        ]
        results = [h.result(timeout=600) for h in handles]
    for prompt, got in zip(PROMPTS[:3], results):
        alone = default_model.generate(prompt, max_new_tokens=5, ignore_eos=True, monitor=mon)
        assert sorted(got.scores) == sorted(alone.scores) == ["o", "v", "w"]
        for name, s in alone.scores.items():
            assert got.scores[name].shape == s.shape
            np.testing.assert_allclose(got.scores[name], s, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(got.scores["w"], -got.scores["v"], rtol=1e-5, atol=1e-5)


def test_steps_stream_like_model_stream(default_model, vec):
    mon = pc.Monitor({"v": vec}, layers=[3])
    with pc.Engine(default_model) as engine:
        h = engine.submit("Say hi.", max_new_tokens=3, ignore_eos=True, monitor=mon)
        steps = list(h)
    want = list(default_model.stream("Say hi.", max_new_tokens=3, ignore_eos=True, monitor=mon))
    assert [s.token_id for s in steps] == [s.token_id for s in want]
    assert [s.positions for s in steps] == [s.positions for s in want]
    assert steps[-1].finish_reason == "length" and h.result().text == "".join(s.text for s in steps)


def test_cancel_frees_the_slot_for_a_queued_request(default_model):
    sched = default_model._core.scheduler(
        {"max_batch": 1, "max_tokens_in_flight": None, "prefill_chunk": 256}
    )
    a = sched.add(_plan(default_model, "Say hi.", max_new_tokens=50)[0], "flag", "a")
    b = sched.add(_plan(default_model, "Name a color.", max_new_tokens=2)[0], "flag", "b")
    sched.step()
    assert (sched.stats()["running"], sched.stats()["queued"]) == (1, 1)
    final = sched.cancel(a)
    assert final["result"]["finish_reason"] == "cancelled" and sched.cancel(a) is None
    ids = {u["id"] for u in sched.step()}
    assert b in ids and sched.stats()["running"] == 1


def test_stats_after_a_cancel_that_empties_the_engine(default_model):
    """Cancelling the last running request leaves no step to run: the counters still say so
    (a server's /metrics read them while the engine waits for work)."""
    with pc.Engine(default_model) as engine:
        h = engine.submit("Say hi.", max_new_tokens=500, ignore_eos=True)
        next(iter(h))  # running
        assert engine.stats()["running"] == 1
        h.cancel()
        assert h.result().finish_reason == "cancelled"
        deadline = time.time() + 10
        while engine.stats()["running"] or engine.stats()["tokens_in_flight"]:
            assert time.time() < deadline, engine.stats()
            time.sleep(0.01)
        assert engine.stats()["cancelled"] == 1


def test_budget_queues_instead_of_failing(default_model):
    plan_a, ids_a = _plan(default_model, "Say hi.", max_new_tokens=3)
    plan_b, ids_b = _plan(default_model, "Name a color.", max_new_tokens=3)
    budget = max(len(ids_a), len(ids_b)) + 3 + 1  # room for one request only
    sched = default_model._core.scheduler(
        {"max_batch": 8, "max_tokens_in_flight": budget, "prefill_chunk": 256}
    )
    a, b = sched.add(plan_a, "flag", "a"), sched.add(plan_b, "flag", "b")
    done = {}
    queued_seen = 0
    while sched.has_work:
        queued_seen += sched.stats()["queued"] > 0 and sched.stats()["running"] == 1
        for u in sched.step():
            assert u.get("error") is None
            if u["result"] is not None:
                done[u["id"]] = u["result"]
    assert set(done) == {a, b} and queued_seen >= 2
    assert all(len(r["token_ids"]) == 3 for r in done.values())
    with pc.Engine(default_model, max_tokens_in_flight=budget) as engine:
        with pytest.raises(pc.InvalidInputError, match="max_tokens_in_flight"):
            engine.submit("Say hi.", max_new_tokens=100)


def test_chunked_prefill_keeps_a_running_request_producing(default_model):
    sched = default_model._core.scheduler(
        {"max_batch": 4, "max_tokens_in_flight": None, "prefill_chunk": 8}
    )
    a = sched.add(_plan(default_model, "Say hi.", max_new_tokens=30)[0], "flag", "a")
    while not any(u["id"] == a for u in sched.step()):
        pass
    long_prompt = " ".join(["Tell me a long story about the sea and the ships."] * 6)
    plan_b, ids_b = _plan(default_model, long_prompt, max_new_tokens=2)
    assert len(ids_b) > 48
    b = sched.add(plan_b, "flag", "b")
    a_tokens = 0
    while True:
        ids = [u["id"] for u in sched.step()]
        if b in ids:
            break
        a_tokens += ids.count(a)
    assert a_tokens >= len(ids_b) // 8 - 1  # one token of `a` per prefill chunk of `b`


def test_alert_policies_and_audit_log(default_model, vec, tmp_path):
    mon = pc.Monitor({"v": vec}, layers=[10], thresholds={"v": -1e6})  # alerts at once
    log = tmp_path / "audit.jsonl"
    never = pc.When("v", above=1e6)
    cond = pc.Steer(vec, 2.0, layers=[10], when=never, name="calm")
    with pc.Engine(default_model) as engine:
        stopped = engine.submit(
            "Say hi.", max_new_tokens=4, monitor=mon, on_alert="stop", request_id="r-stop"
        )
        steered = engine.submit(
            "Say hi.",
            max_new_tokens=3,
            monitor=mon,
            steer=cond,
            on_alert="steer",
            audit_log=log,
            request_id="r-steer",
        )
        flagged = engine.submit(
            "Say hi.", max_new_tokens=3, monitor=mon, steer=cond, on_alert="flag"
        )
        g_stop, g_steer, g_flag = stopped.result(600), steered.result(600), flagged.result(600)
    assert g_stop.finish_reason == "content_filter" and g_stop.token_ids == []
    assert "steer_on" in [e.kind for e in g_steer.events]
    assert "steer_on" not in [e.kind for e in g_flag.events] and "alert" in [
        e.kind for e in g_flag.events
    ]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines and all(line["request_id"] == "r-steer" for line in lines)
    assert {"alert", "steer_on"} <= {line["kind"] for line in lines}


def test_async_iteration(default_model):
    async def main():
        with pc.Engine(default_model) as engine:
            h = engine.submit("Say hi.", max_new_tokens=3, ignore_eos=True)
            steps = [s async for s in h]
            return steps, await h.aresult()

    steps, gen = asyncio.run(main())
    assert [s.token_id for s in steps] == gen.token_ids and len(gen.token_ids) == 3
    # the Generation is made when first asked for (by aresult, off the loop), complete
    alone = default_model.generate("Say hi.", max_new_tokens=3, ignore_eos=True)
    assert gen.token_texts == alone.token_texts and len(gen.token_texts) == 3
    assert gen.text == alone.text and gen.prompt_ids == alone.prompt_ids


def test_aresult_wakes_the_loop_once_not_per_step(default_model):
    """A non-streamed reader (``aresult``) costs its event loop one wake-up for the whole reply."""

    async def main():
        loop = asyncio.get_running_loop()
        calls = []
        plain = loop.call_soon_threadsafe

        def counting(*args, **kwargs):
            calls.append(args[0])
            return plain(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # the engine thread wakes readers through it
        with pc.Engine(default_model) as engine:
            h = engine.submit("Say hi.", max_new_tokens=24, ignore_eos=True)
            gen = await h.aresult()
            wakes_whole = len(calls)
            h2 = engine.submit("Say hi.", max_new_tokens=24, ignore_eos=True)
            steps = [s async for s in h2]
        return gen, wakes_whole, steps, len(calls) - wakes_whole

    gen, wakes_whole, steps, wakes_steps = asyncio.run(main())
    assert len(gen.token_ids) == 24 and [s.token_id for s in steps] == gen.token_ids
    assert wakes_whole <= 2, wakes_whole  # the end (and at most a step racing the first await)
    assert wakes_steps >= 12, wakes_steps  # a step reader is woken as steps come


def test_async_readers_on_two_loops_each_get_every_step(default_model):
    """The engine wakes each event loop once per step for all the requests it reads: readers of
    several requests on two loops (two threads), one of them cancelled while it waits, each get
    every step, and the same steps as a blocking reader."""
    import threading

    with pc.Engine(default_model, max_batch=8) as engine:
        handles = [
            engine.submit(PROMPTS[k], max_new_tokens=6 + k, ignore_eos=True) for k in range(4)
        ]
        results = {}

        async def read(k, h):
            return [s.token_id async for s in h]

        async def loop_main(name, ks):
            tasks = {k: asyncio.ensure_future(read(k, handles[k])) for k in ks}
            doomed = asyncio.ensure_future(read(-1, handles[ks[0]]))
            await asyncio.sleep(0)
            doomed.cancel()  # a reader that leaves while it waits
            results.update({(name, k): await t for k, t in tasks.items()})
            with pytest.raises(asyncio.CancelledError):
                await doomed

        threads = [
            threading.Thread(target=asyncio.run, args=(loop_main(n, ks),))
            for n, ks in (("a", [0, 1]), ("b", [2, 3, 1]))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert len(results) == 5
        for (name, k), got in results.items():
            gen = handles[k].result(timeout=600)
            assert got == gen.token_ids == [s.token_id for s in handles[k]], (name, k)
            assert len(gen.token_ids) == 6 + k


def test_bad_arguments_raise_at_submit(default_model, vec):
    with pc.Engine(default_model) as engine:
        for kw, word in [
            ({"on_alert": "panic"}, "on_alert"),
            ({"max_new_tokens": 0}, "max_new_tokens"),
            ({"temperature": float("nan")}, "temperature"),
            ({"steer": pc.Steer(vec, 1.0, layers=[999])}, "layer"),
            ({"request_id": ""}, "request_id"),
        ]:
            with pytest.raises(pc.InvalidInputError, match=word):
                engine.submit("Say hi.", **kw)
        assert engine.stats()["submitted"] == 0
    with pytest.raises(pc.InvalidInputError, match="max_batch"):
        pc.Engine(default_model, max_batch=0)


def test_an_engine_error_fails_its_request_only(default_model, vec):
    mon = pc.Monitor({"v": vec}, layers=[10], thresholds={"v": -1e6})  # an event at once
    with pc.Engine(default_model) as engine:
        blocker = engine.submit("Say hi.", max_new_tokens=20, ignore_eos=True)
        next(iter(blocker))
        bad = engine.submit("Say hi.", max_new_tokens=2, monitor=mon, audit_log="/dev/full")
        with pytest.raises(pc.PersonacoreIOError):  # writing the audit line fails in the engine
            bad.result(600)
        ok = engine.submit("Name a color.", max_new_tokens=2)
        assert len(ok.result(600).token_ids) >= 1 and engine.stats()["failed"] == 1
        blocker.cancel()
        assert blocker.result(600).finish_reason == "cancelled"


def _chunked_vs_whole(model, prompt, steer, monitor):
    """(Engine with 8-token prefill chunks, model.generate) on one prompt, greedy."""
    engine = pc.Engine(model, max_batch=2, prefill_chunk=8)
    try:
        chunked = engine.submit(
            prompt, max_new_tokens=12, ignore_eos=True, steer=steer, monitor=monitor
        ).result()
    finally:
        engine.close()
    whole = model.generate(prompt, max_new_tokens=12, ignore_eos=True, steer=steer, monitor=monitor)
    return chunked, whole


LONG_PROMPT = " ".join(["Tell me a long story about the sea, the ships and the harbour."] * 4)


def test_chunked_prefill_steers_the_response_from_the_last_prompt_token_only(default_model, vec):
    """positions="response" steering over a prompt read in 8-token chunks acts where it acts on
    a prompt read whole (from its last token on), not at the end of every chunk."""
    v = pc.PersonaVector(vec / np.linalg.norm(vec[12]) * 4.0, layer=12, name="v")
    steer = pc.Steer(v, 6.0, layers=[12], positions="response")
    monitor = pc.Monitor({"v": v}, layers=[20])
    chunked, whole = _chunked_vs_whole(default_model, LONG_PROMPT, steer, monitor)
    assert len(chunked.prompt_ids) > 40
    assert chunked.token_ids == whole.token_ids
    np.testing.assert_allclose(chunked.scores["v"], whole.scores["v"], rtol=1e-3, atol=1e-2)


def test_chunked_prefill_decides_conditional_steering_at_the_prompt_end(default_model, vec):
    """A `When` condition is decided at the prompt's last token, as for a prompt read whole: a
    score above the threshold at the end of an earlier chunk switches nothing."""
    v = pc.PersonaVector(vec, layer=12, name="v")
    probe = default_model.generate(
        LONG_PROMPT, max_new_tokens=1, monitor=pc.Monitor({"v": v}, layers=[12])
    )
    s = probe.scores["v"][:, 0]
    n = len(probe.prompt_ids)
    ends = [p for p in range(7, n - 1, 8)]  # the last rows of the chunks before the last
    if s[ends].max() <= s[n - 1]:  # flip the vector so that an earlier chunk end scores higher
        v, s = -v, -s
    thr = float((s[ends].max() + s[n - 1]) / 2)
    monitor = pc.Monitor({"v": v}, layers=[12])
    steer = pc.Steer(v, 8.0, layers=[12], when=pc.When("v", above=thr, layer=12))
    chunked, whole = _chunked_vs_whole(default_model, LONG_PROMPT, steer, monitor)
    prompt_switches = [e for e in chunked.events if e.kind == "steer_on" and e.position < n - 1]
    assert prompt_switches == []
    assert chunked.token_ids == whole.token_ids
    assert [(e.kind, e.position) for e in chunked.events if e.kind.startswith("steer")] == [
        (e.kind, e.position) for e in whole.events if e.kind.startswith("steer")
    ]
