"""Judges: persona_vectors' 0–100 scoring, OpenAIJudge (the openai SDK) against a real HTTP server on
127.0.0.1 (retries, concurrency bound, cache, errors), LocalJudge on the default model, and pair
filtering."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from personacore.errors import PersonacoreError
from personacore.judges import (
    COHERENCE_PROMPT,
    FilterReport,
    JudgeError,
    LocalJudge,
    NoJudge,
    OpenAIJudge,
    aggregate_0_100,
    filter_pairs,
    judge_enabled,
    render_prompt,
)

TRAIT_PROMPT = (
    "Rate how snarky this is.\nQ: {question}\nA: {answer}\nRespond with:\n"
    "- REFUSAL if the model clearly refused to answer\n- A score from 0 to 100"
)


def _top(pairs):
    """OpenAI ``top_logprobs`` entries from (token, probability) pairs."""
    return [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in pairs]


def _completion(pairs):
    return {
        "id": "x",
        "object": "chat.completion",
        "model": "judge",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": pairs[0][0] if pairs else ""},
                "logprobs": {
                    "content": [{"token": pairs[0][0], "logprob": 0.0, "top_logprobs": _top(pairs)}]
                    if pairs
                    else []
                },
                "finish_reason": "length",
            }
        ],
    }


class FakeOpenAI:
    """A real HTTP server: POST /v1/chat/completions answers from ``self.respond(n, body)``
    -> (status, headers, json_or_bytes); counts requests and the most requests in flight at once."""

    def __init__(self, respond, delay=0.0):
        self.respond, self.delay = respond, delay
        self.requests, self.headers = [], []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append((self.path, body))
                    outer.headers.append(self.headers)  # case-insensitive lookups
                    n = len(outer.requests)
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    time.sleep(outer.delay)
                    status, headers, payload = outer.respond(n, body)
                finally:
                    with outer.lock:
                        outer.in_flight -= 1
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve():
    pytest.importorskip("openai")  # OpenAIJudge runs on the openai SDK (personacore[judge])
    servers = []

    def start(respond, delay=0.0):
        s = FakeOpenAI(respond, delay)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def _judge(server, **kw):
    kw.setdefault("api_key", "sk-test")
    return OpenAIJudge(model="judge-model", base_url=server.base_url, **kw)


def _ok(pairs):
    return lambda n, body: (200, None, _completion(pairs))


# ------------------------------------------------------------------------------- scoring rule


def test_aggregate_weighted_mean_and_mass():
    assert aggregate_0_100([("80", 0.5), ("90", 0.3), ("foo", 0.2)]) == pytest.approx(
        (80 * 0.5 + 90 * 0.3) / 0.8
    )
    assert aggregate_0_100({"0": 0.3, "100": 0.1, " 50": 0.2}) == pytest.approx((0 + 10 + 10) / 0.6)
    assert aggregate_0_100([("5", 0.1), (" 5", 0.1), ("7", 0.1)]) == pytest.approx(
        1.7 / 0.3
    )  # "5"s add up
    assert aggregate_0_100([("5", 0.1), ("7", 0.1), ("x", 0.8)]) is None  # mass 0.2 < 0.25
    assert aggregate_0_100([("5", 0.125), ("7", 0.125), ("x", 0.75)]) == pytest.approx(
        6.0
    )  # mass 0.25 is enough
    assert (
        aggregate_0_100([("101", 0.9), ("-5", 0.05), ("1_0", 0.05)]) is None
    )  # not integers 0..100
    assert aggregate_0_100([]) is None


def test_aggregate_refusal():
    top = [("REF", 0.6), ("50", 0.35), ("60", 0.05)]
    assert aggregate_0_100(top, refusal_check=True) is None
    assert aggregate_0_100(top) == pytest.approx(
        (50 * 0.35 + 60 * 0.05) / 0.4
    )  # persona_vectors' rule alone
    assert (
        aggregate_0_100([("REFUSAL", 0.3), ("50", 0.7)], refusal_check=True) == 50.0
    )  # not the top token
    assert aggregate_0_100([(" Refusal", 0.9), ("50", 0.1)], refusal_check=True) is None


def test_render_prompt_and_coherence_prompt():
    assert render_prompt("{question}|{answer}|{other}", "q {answer}", "a") == "q {answer}|a|{other}"
    text = render_prompt(COHERENCE_PROMPT, "How are you?", "Fine.")
    assert "How are you?" in text and "Fine." in text and "{" not in text and "0 and 100" in text


# ------------------------------------------------------------------------------------ OpenAIJudge


def test_openai_score_and_request(serve):
    s = serve(_ok([("80", 0.5), ("90", 0.3), ("x", 0.2)]))
    j = _judge(s)
    assert j.score("Q1", "A1", TRAIT_PROMPT) == pytest.approx(83.75)
    path, body = s.requests[0]
    assert path == "/v1/chat/completions"
    assert body["model"] == "judge-model" and body["messages"] == [
        {"role": "user", "content": render_prompt(TRAIT_PROMPT, "Q1", "A1")}
    ]
    assert (
        body["max_tokens"],
        body["temperature"],
        body["logprobs"],
        body["top_logprobs"],
        body["seed"],
    ) == (1, 0, True, 20, 0)
    assert s.headers[0]["Authorization"] == "Bearer sk-test"


def test_openai_env_configuration(serve, monkeypatch):
    s = serve(_ok([("40", 1.0)]))
    monkeypatch.setenv("OPENAI_BASE_URL", s.base_url + "/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    assert OpenAIJudge().score("q", "a", TRAIT_PROMPT) == pytest.approx(40.0)
    assert s.headers[0]["Authorization"] == "Bearer sk-from-env"
    monkeypatch.delenv("OPENAI_BASE_URL")
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(JudgeError, match="OPENAI_API_KEY"):
        OpenAIJudge()


def test_openai_low_mass_and_refusal(serve):
    s = serve(
        lambda n, body: (
            200,
            None,
            _completion(
                [("REF", 0.7), ("50", 0.3)]
                if "refuse" in body["messages"][0]["content"]
                else [("x", 0.8), ("70", 0.2)]
            ),
        )
    )
    j = _judge(s)
    assert j.score("q", "blah", TRAIT_PROMPT) is None  # mass 0.2 < 0.25
    assert j.score("q", "I refuse", TRAIT_PROMPT) is None  # REFUSAL
    assert _judge(s, refusal_check=False).score("q", "I refuse", TRAIT_PROMPT) == pytest.approx(
        50.0
    )
    assert j.score("q", "I refuse", "no refusal option here: {question} {answer}") == pytest.approx(
        50.0
    )


def test_openai_retries_429_then_succeeds(serve):
    s = serve(
        lambda n, body: (
            (429, {"Retry-After": "0"}, {"error": {"message": "slow down"}})
            if n <= 2
            else (200, None, _completion([("60", 1.0)]))
        )
    )
    assert _judge(s).score("q", "a", TRAIT_PROMPT) == pytest.approx(60.0)
    assert len(s.requests) == 3


def test_openai_honours_retry_after(serve):
    s = serve(
        lambda n, body: (
            (429, {"Retry-After": "1"}, {}) if n == 1 else (200, None, _completion([("1", 1.0)]))
        )
    )
    t0 = time.monotonic()
    assert _judge(s).score("q", "a", TRAIT_PROMPT) == 1.0
    assert time.monotonic() - t0 >= 0.95 and len(s.requests) == 2


def test_openai_retries_5xx_and_gives_up(serve):
    s = serve(
        lambda n, body: (
            (500, None, {"error": "boom"}) if n == 1 else (200, None, _completion([("30", 1.0)]))
        )
    )
    assert _judge(s).score("q", "a", TRAIT_PROMPT) == pytest.approx(30.0)
    assert len(s.requests) == 2
    s2 = serve(lambda n, body: (503, None, {"error": {"message": "overloaded"}}))
    with pytest.raises(
        JudgeError, match=r"failed \(retried up to 2 times\); last error: HTTP 503: overloaded"
    ):
        _judge(s2, max_retries=2).score("q", "a", TRAIT_PROMPT)
    assert len(s2.requests) == 3  # the first try and max_retries retries, all by the SDK
    assert [h["x-stainless-retry-count"] for h in s2.headers] == ["0", "1", "2"]


def test_openai_401_is_a_clear_error_without_retry(serve):
    s = serve(lambda n, body: (401, None, {"error": {"message": "Incorrect API key provided"}}))
    with pytest.raises(JudgeError, match="rejected the API key .*Incorrect API key provided") as e:
        _judge(s).score("q", "a", TRAIT_PROMPT)
    assert isinstance(e.value, PersonacoreError) and isinstance(e.value, RuntimeError)
    assert len(s.requests) == 1
    s2 = serve(lambda n, body: (400, None, {"error": {"message": "logprobs not supported"}}))
    with pytest.raises(JudgeError, match="HTTP 400.*logprobs not supported"):
        _judge(s2).score("q", "a", TRAIT_PROMPT)
    assert len(s2.requests) == 1


def test_openai_connection_errors_are_retried(serve):
    s = serve(_ok([("1", 1.0)]))
    url = s.base_url
    s.close()  # nothing listens on that port any more
    j = OpenAIJudge(model="m", base_url=url, api_key="k", max_retries=1, timeout=5)
    with pytest.raises(
        JudgeError, match=r"retried up to 1 times\); last error: connection error: .*refused"
    ):
        j.score("q", "a", TRAIT_PROMPT)


def test_openai_without_a_key_on_a_local_server(serve, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    s = serve(_ok([("70", 1.0)]))
    assert OpenAIJudge(base_url=s.base_url).score("q", "a", TRAIT_PROMPT) == pytest.approx(70.0)
    assert s.headers[0]["Authorization"] == "Bearer EMPTY"  # the SDK needs some key


def test_openai_judge_without_the_sdk_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # "import openai" now raises ImportError
    with pytest.raises(JudgeError, match=r"pip install 'personacore\[judge\]'"):
        OpenAIJudge(base_url="http://127.0.0.1:1/v1", api_key="k")


def test_openai_endpoint_without_logprobs(serve):
    def respond(n, body):
        c = _completion([("5", 1.0)])
        c["choices"][0]["logprobs"] = None
        return 200, None, c

    with pytest.raises(JudgeError, match="no logprobs"):
        _judge(serve(respond)).score("q", "a", TRAIT_PROMPT)
    s = serve(_ok([]))  # an empty content list: no score, as in persona_vectors
    assert _judge(s).score("q", "a", TRAIT_PROMPT) is None


def test_openai_concurrency_bound(serve):
    s = serve(
        lambda n, body: (
            200,
            None,
            _completion([(body["messages"][0]["content"][-2:].strip(), 1.0)]),
        ),
        delay=0.05,
    )
    j = _judge(s, max_concurrency=3)
    items = [("q", f"{k:2d}") for k in range(15)]
    scores = j.score_many(items, "{question} {answer}")
    assert scores == [float(k) for k in range(15)]  # in order
    assert len(s.requests) == 15
    assert 2 <= s.max_in_flight <= 3


def test_openai_score_many_dedupes(serve):
    s = serve(_ok([("10", 1.0)]))
    assert _judge(s).score_many([("q", "a")] * 4 + [("q", "b")], TRAIT_PROMPT) == [10.0] * 5
    assert len(s.requests) == 2


def test_openai_cache(serve, tmp_path):
    s = serve(_ok([("80", 0.5), ("90", 0.5)]))
    j = _judge(s, cache_dir=tmp_path / "cache")
    assert j.score("q", "a", TRAIT_PROMPT) == pytest.approx(85.0)
    assert j.score("q", "a", TRAIT_PROMPT) == pytest.approx(85.0)
    assert len(s.requests) == 1
    j2 = _judge(s, cache_dir=tmp_path / "cache")  # a new judge, as in a re-run of extraction
    assert j2.score_many([("q", "a")], TRAIT_PROMPT) == [pytest.approx(85.0)]
    assert len(s.requests) == 1
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert len(files) == 1 and not files[0].name.startswith(".")
    assert [t for t, _ in json.loads(files[0].read_text())["top_logprobs"]] == ["80", "90"]
    other = OpenAIJudge(
        model="other-model", base_url=s.base_url, api_key="k", cache_dir=tmp_path / "cache"
    )
    other.score("q", "a", TRAIT_PROMPT)  # a different model is a different key
    assert len(s.requests) == 2


def test_openai_bad_arguments():
    from personacore.errors import InvalidInputError

    pytest.importorskip("openai")
    with pytest.raises(InvalidInputError, match="http"):
        OpenAIJudge(base_url="127.0.0.1:8000/v1", api_key="k")
    with pytest.raises(InvalidInputError, match="max_concurrency"):
        OpenAIJudge(base_url="http://127.0.0.1:1/v1", max_concurrency=0)


# ---------------------------------------------------------------------------------- LocalJudge


class _FakeTokenizer:
    def __init__(self, vocab):
        self.vocab = vocab

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)

    def encode(self, text, add_special_tokens=False):
        if text in self.vocab:
            return [self.vocab.index(text)]
        return [self.vocab.index(c) for c in text if c in self.vocab]


class _FakeModel:
    """Next-token distributions chosen by the test: ``dists[suffix]`` after the prompt ids [1, 2, 3]
    followed by the tokens ``suffix`` (a tuple of token texts)."""

    def __init__(self, dists):
        if not isinstance(next(iter(dists)), tuple):
            dists = {(): dists}
        self.vocab = sorted({t for d in dists.values() for t in d} | {t for k in dists for t in k})
        self.tokenizer = _FakeTokenizer(self.vocab)
        self.dists = dists
        self.seen, self.calls = [], 0

    def encode_chat(self, messages):
        self.seen.append(messages)
        return [1, 2, 3]

    def logits(self, ids):
        self.calls += 1
        d = self.dists[tuple(self.vocab[i] for i in ids[3:])]
        p = np.array([d.get(t, 0.0) for t in self.vocab]) + 1e-12
        return np.tile(np.log(p / p.sum()).astype(np.float32), (len(ids), 1))


def test_local_judge_scoring_on_a_synthetic_distribution():
    probs = {"80": 0.4, " 80": 0.1, "90": 0.2, "the": 0.2, "REF": 0.05}
    probs.update(
        {f"w{k}": 0.05 / 30 for k in range(30)}
    )  # more than 20 tokens: only the top 20 count
    m = _FakeModel(probs)
    j = LocalJudge(m)
    assert j._mode() == "token"  # no single-digit tokens: whole-number tokens
    assert j.score("q", "a", "{question} {answer}") == pytest.approx(
        (80 * 0.5 + 90 * 0.2) / 0.7, rel=1e-5
    )
    assert m.seen[0] == [{"role": "user", "content": "q a"}]
    top = j.top_logprobs("x")
    assert (
        len(top) == 20 and top[0][0] == "80" and top[0][1] == pytest.approx(math.log(0.4), rel=1e-5)
    )
    refusing = LocalJudge(_FakeModel({"REFUSAL": 0.6, "50": 0.4}))
    assert refusing.score("q", "a", TRAIT_PROMPT) is None
    assert refusing.score("q", "a", "{question}{answer}") == pytest.approx(50.0)


def test_local_judge_digit_tokenizer():
    digits = {str(d): 0.0 for d in range(10)}
    m = _FakeModel(
        {
            (): {**digits, "8": 0.6, "1": 0.3, "x": 0.1},
            ("8",): {**digits, "5": 0.5, "<eos>": 0.5},  # "8" then end, or "85"
            ("1",): {**digits, "0": 1.0},  # "10..."
            ("1", "0"): {**digits, "0": 0.5, "<eos>": 0.5},  # "10" or "100"
        }
    )
    j = LocalJudge(m)
    assert j._mode() == "digits"
    probs = dict(j.number_probs("{question}"))
    assert probs["8"] == pytest.approx(0.3) and probs["85"] == pytest.approx(0.3)
    assert probs["10"] == pytest.approx(0.15) and probs["100"] == pytest.approx(0.15)
    expected = (8 * 0.3 + 85 * 0.3 + 10 * 0.15 + 100 * 0.15) / 0.9
    assert j.score("q", "a", "{question} {answer}") == pytest.approx(expected, rel=1e-6)
    token_rule = LocalJudge(m, numbers="token").score("q", "a", "{question} {answer}")
    assert token_rule == pytest.approx(
        (8 * 0.6 + 1 * 0.3) / 0.9, rel=1e-6
    )  # what one token would say


def test_local_judge_on_default_model(default_model):
    template = "On a scale from 0 to 100, how coherent is this answer?\nQ: {question}\nA: {answer}\nJust the number."
    j = LocalJudge(default_model)
    assert j._mode() == "digits"  # SmolLM2 splits numbers into digits
    s = j.score("What is 2 + 2?", "2 + 2 = 4.", template)
    assert s is None or 0.0 <= s <= 100.0
    top = j.top_logprobs(render_prompt(template, "What is 2 + 2?", "4"))
    assert len(top) == 20 and all(isinstance(t, str) for t, _ in top)
    lps = [lp for _, lp in top]
    assert lps == sorted(lps, reverse=True) and sum(math.exp(lp) for lp in lps) <= 1.0 + 1e-6
    probs = j.number_probs(render_prompt(template, "What is 2 + 2?", "4"))
    assert sum(p for _, p in probs) <= 1.0 + 1e-6 and all(isinstance(p, float) for _, p in probs)


# ------------------------------------------------------------------------------ NoJudge, filtering


def test_no_judge():
    j = NoJudge()
    assert j.score("q", "a", TRAIT_PROMPT) is None
    assert j.score_many([("q", "a"), ("r", "b")], TRAIT_PROMPT) == [None, None]
    assert not judge_enabled(j) and not judge_enabled(None) and judge_enabled(LocalJudge(object()))


def test_filter_pairs():
    pos = [90, 40, 80, 70, None, 60]
    neg = [10, 10, 60, 20, 5, 49.9]
    pc = [80, 90, 90, 30, 90, 50]
    nc = [70, 90, 90, 90, 90, 50]
    mask, report = filter_pairs(pos, neg, pc, nc)
    assert mask.dtype == bool and mask.tolist() == [True, False, False, False, False, True]
    assert report == FilterReport(
        total=6,
        kept=2,
        unscored=1,
        pos_below_threshold=1,
        neg_at_or_above_threshold=1,
        incoherent=1,
    )
    assert str(report).startswith("2/6 pairs kept (33%)")
    mask, _ = filter_pairs(pos, neg, pc, nc, trait_threshold=30, coherence_threshold=20)
    assert mask.tolist() == [True, True, False, True, False, False]
    from personacore.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="same length"):
        filter_pairs([1], [1, 2], [1], [1])
