"""Serving: :class:`Engine`, continuous batching for many concurrent callers, and its
:class:`RequestHandle`.

An :class:`Engine` owns one thread that steps the native scheduler (``personacore._core.Scheduler``)
with the GIL released. Requests join and leave the running batch between decode steps; each
carries its own steering, monitor, thresholds, stop strings, sampling settings and seed, and an
alert policy (``on_alert``). :meth:`Engine.submit` converts and checks the arguments in the caller's
thread (bad values raise :class:`~personacore.InvalidInputError` there) and returns a
:class:`RequestHandle`: iterate it (``for`` or ``async for``) for :class:`~personacore.Step`
objects as :meth:`Model.stream <personacore.Model.stream>` yields them, or call
:meth:`RequestHandle.result` for the :class:`~personacore.Generation`.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import os
import threading
from collections.abc import Mapping
from typing import Any, AsyncIterator, Deque, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from ..errors import InvalidInputError, PersonacoreError
from .convert import as_int
from .generation import Generation, Step, _generation, _prepare, _step, _thresholds

__all__ = ["ON_ALERT", "Engine", "RequestHandle"]

#: Alert policies: ``flag`` (events only), ``steer`` (switch on the request's conditional steering
#: when a monitor alert fires), ``stop`` (end the reply with finish reason ``content_filter``).
ON_ALERT = ("flag", "steer", "stop")

_request_ids = itertools.count()


def _resolve(futures: List["asyncio.Future[None]"]) -> None:
    """Wake the async readers waiting on ``futures`` (runs in their event loop)."""
    for fut in futures:
        if not fut.done():  # a reader cancelled while it waited has a cancelled future
            fut.set_result(None)


class _Wakes:
    """Async readers to wake, grouped by event loop: one ``call_soon_threadsafe`` per loop (a
    write to the loop's self-pipe and a wake-up of its thread), however many requests it reads."""

    def __init__(self) -> None:
        self._by_loop: Dict[asyncio.AbstractEventLoop, List["asyncio.Future[None]"]] = {}

    def add(self, waiters: List[Tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]]) -> None:
        """Queue ``(loop, future)`` pairs."""
        for loop, fut in waiters:
            self._by_loop.setdefault(loop, []).append(fut)

    def flush(self) -> None:
        """Wake every queued reader; each loop is called once."""
        by_loop, self._by_loop = self._by_loop, {}
        for loop, futures in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, futures)
            except RuntimeError:  # the reader's loop has closed: nobody is waiting any more
                pass


class RequestHandle:
    """One request submitted to an :class:`Engine`: its steps as they come, and its result.

    Iterating (``for step in handle`` or ``async for step in handle``) yields every
    :class:`~personacore.Step` from the first; each iteration starts from the beginning.
    :meth:`result` waits for the :class:`~personacore.Generation` (``finish_reason`` ``"eos"``,
    ``"stop"``, ``"length"``, ``"content_filter"`` or ``"cancelled"``) and raises the exception
    that failed the request, if one did. :meth:`cancel` ends it at the next step.
    """

    def __init__(self, engine: "Engine", request_id: str, prompt_ids: List[int]):
        """A handle for a request (made by :meth:`Engine.submit`)."""
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self._engine = engine
        self._cond = threading.Condition()
        self._steps: List[Step] = []
        self._layers: Dict[str, List[int]] = {}
        self._thresholds: Dict[str, float] = {}
        self._logprobs = False
        self._prompt_logprobs = False
        self._scored = 0
        self._result: Optional[Dict[str, Any]] = None  # the engine's result dict, once finished
        self._final: Optional[Generation] = None  # made from it when first asked for
        self._error: Optional[BaseException] = None
        self._waiters: List[Tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]] = []
        # async readers of the end only (aresult): woken once, not at every step
        self._end_waiters: List[Tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]] = []

    # ---- fed by the engine thread ----------------------------------------------------------
    def _wake(self, wakes: Optional["_Wakes"] = None) -> None:
        """Wake blocking and async readers (called with ``self._cond`` held); async readers
        through ``wakes`` when given (the engine thread wakes each event loop once per step)."""
        self._cond.notify_all()
        if not self._waiters:
            return
        waiters, self._waiters = self._waiters, []
        if wakes is not None:
            wakes.add(waiters)
            return
        own = _Wakes()
        own.add(waiters)
        own.flush()

    def _push(self, o: Dict[str, Any], wakes: Optional["_Wakes"] = None) -> None:
        step = _step(o, self._layers, self._scored)
        with self._cond:
            self._scored += len(step.positions)
            self._steps.append(step)
            self._wake(wakes)

    def _finish(
        self,
        result: Optional[Dict[str, Any]],
        error: Optional[BaseException],
        wakes: Optional["_Wakes"] = None,
    ) -> None:
        with self._cond:
            if self._result is not None or self._error is not None:
                return
            if error is not None:
                self._error = error
            else:
                assert result is not None
                # The Generation (token texts decoded one by one) is made by the first reader that
                # asks for it, not here: the engine thread holds the GIL between decode steps.
                self._result = result
            self._waiters += self._end_waiters
            self._end_waiters = []
            self._wake(wakes)

    def _generation(self) -> Generation:
        """The request's Generation (called with ``self._cond`` held, once it has finished)."""
        if self._final is None:
            assert self._result is not None
            self._final = _generation(
                self._result,
                self.prompt_ids,
                self._layers,
                self._engine.model.tokenizer,
                self._thresholds,
                self._logprobs,
                self._prompt_logprobs,
            )
        return self._final

    # ---- read by callers ---------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """True once the request has finished, failed or been cancelled."""
        with self._cond:
            return self._result is not None or self._error is not None

    def _next(self, i: int) -> Optional[Step]:
        """Step ``i`` if it has arrived; raises StopIteration/the error once there are no more."""
        with self._cond:
            if i < len(self._steps):
                return self._steps[i]
            if self._error is not None:
                raise self._error
            if self._result is not None:
                raise StopIteration
            return None

    def _ready(self, i: int) -> bool:
        """Whether step ``i`` or the end has arrived (called with ``self._cond`` held)."""
        return i < len(self._steps) or self._result is not None or self._error is not None

    def __iter__(self) -> Iterator[Step]:
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(functools.partial(self._ready, i))
            try:
                step = self._next(i)
            except StopIteration:
                return
            if step is not None:
                i += 1
                yield step

    async def _aiter(self) -> AsyncIterator[Step]:
        loop = asyncio.get_running_loop()
        i = 0
        while True:
            with self._cond:
                if i < len(self._steps):
                    step: Optional[Step] = self._steps[i]
                elif self._error is not None:
                    raise self._error
                elif self._result is not None:
                    return
                else:
                    step = None
                    fut: "asyncio.Future[None]" = loop.create_future()
                    self._waiters.append((loop, fut))
            if step is None:
                await fut
                continue
            i += 1
            yield step

    def __aiter__(self) -> AsyncIterator[Step]:
        return self._aiter()

    def result(self, timeout: Optional[float] = None) -> Generation:
        """Wait for the request to end and return its :class:`~personacore.Generation`.

        Raises the exception that failed the request, or ``TimeoutError`` after ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._result is not None or self._error is not None, timeout
            ):
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
            if self._error is not None:
                raise self._error
            return self._generation()

    async def aresult(self) -> Generation:
        """:meth:`result` for asyncio: waits without blocking the event loop, which is woken once,
        when the request ends (not at every step, as an ``async for`` over the steps is)."""
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._result is not None or self._error is not None:
                    break
                fut: "asyncio.Future[None]" = loop.create_future()
                self._end_waiters.append((loop, fut))
            await fut
        with self._cond:
            ready = self._final is not None or self._error is not None
        if ready:
            return self.result(timeout=0)
        # making the Generation decodes each token's text: in a worker thread, not in the loop
        return await asyncio.get_running_loop().run_in_executor(None, self.result, 0)

    def cancel(self) -> None:
        """End the request at the next step (finish reason ``"cancelled"``); frees its slot."""
        self._engine._cancel(self)

    def __repr__(self) -> str:
        return f"RequestHandle({self.request_id!r}, steps={len(self._steps)}, done={self.done})"


def _policy(on_alert: Any) -> str:
    if not isinstance(on_alert, str) or on_alert not in ON_ALERT:
        raise InvalidInputError(
            f"on_alert must be one of {', '.join(map(repr, ON_ALERT))}, got {on_alert!r}"
        )
    return on_alert


class Engine:
    """Continuous batching over one model, in a thread of its own (started on construction).

    ``max_batch`` sequences decode together; ``max_tokens_in_flight`` bounds the KV cache (prompt +
    ``max_new_tokens`` positions reserved per running request; default: ``max_batch`` times the
    model's context, capped by the engine); a request that does not fit waits in the queue.
    ``prefill_chunk`` is how many prompt tokens one step prefills, so that a long prompt does not
    stall the replies in progress. Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        model: Any,
        max_batch: int = 16,
        max_tokens_in_flight: Optional[int] = None,
        prefill_chunk: int = 256,
    ):
        """Start the engine thread for ``model`` (a :class:`~personacore.Model`)."""
        self.model = model
        self._scheduler = model._core.scheduler(
            {
                "max_batch": as_int(max_batch, "max_batch"),
                "max_tokens_in_flight": None
                if max_tokens_in_flight is None
                else as_int(max_tokens_in_flight, "max_tokens_in_flight"),
                "prefill_chunk": as_int(prefill_chunk, "prefill_chunk"),
            }
        )
        self._stats: Dict[str, int] = dict(self._scheduler.stats())
        self._budget = self._stats["max_tokens_in_flight"]
        self._lock = threading.Condition()
        self._inbox: Deque[Tuple[str, Any]] = collections.deque()
        self._handles: Dict[int, RequestHandle] = {}
        self._closed = False
        self._counts = {"submitted": 0, "finished": 0, "failed": 0, "cancelled": 0}
        self._thread = threading.Thread(target=self._run, name="personacore-engine", daemon=True)
        self._thread.start()

    def submit(
        self,
        prompt: Any,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop: Union[str, Sequence[str], None] = None,
        ignore_eos: bool = False,
        steer: Any = None,
        monitor: Any = None,
        on_alert: str = "flag",
        audit_log: Union[str, os.PathLike, None] = None,
        request_id: Optional[str] = None,
        audit_fsync: str = "request",
        logprobs: Optional[int] = None,
        logit_bias: Optional[Mapping[int, float]] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        prompt_logprobs: Optional[int] = None,
    ) -> RequestHandle:
        """Queue one prompt; returns its :class:`RequestHandle` at once.

        Arguments as :meth:`Model.stream <personacore.Model.stream>` (one prompt: a str, a list
        of message dicts or token ids), plus ``on_alert`` (see :data:`ON_ALERT`) and
        ``request_id`` (a str written with every audit-log line; default ``"req-N"``). Every
        value is checked here: a bad one raises :class:`~personacore.InvalidInputError` in the
        caller's thread and nothing is queued.
        """
        policy = _policy(on_alert)
        if request_id is None:
            request_id = f"req-{next(_request_ids)}"
        elif not isinstance(request_id, str) or not request_id:
            raise InvalidInputError(f"request_id must be a non-empty str, got {request_id!r}")
        plan, ids, _ = _prepare(
            self.model,
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
            steer=steer,
            monitor=monitor,
            audit_log=audit_log,
            audit_fsync=audit_fsync,
            single=True,
            logprobs=logprobs,
            logit_bias=logit_bias,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            prompt_logprobs=prompt_logprobs,
        )
        need = min(len(ids[0]) + int(max_new_tokens), self.model.max_position_embeddings) + 1
        if need > self._budget:
            raise InvalidInputError(
                f"the prompt ({len(ids[0])} tokens) plus max_new_tokens ({max_new_tokens}) needs {need} "
                f"KV-cache positions, more than this engine's max_tokens_in_flight ({self._budget})"
            )
        handle = RequestHandle(self, request_id, ids[0])
        handle._layers = {name: list(ls) for name, ls in plan.score_layers}
        handle._thresholds = _thresholds(monitor)
        handle._logprobs = logprobs is not None
        handle._prompt_logprobs = prompt_logprobs is not None
        with self._lock:
            if self._closed:
                raise PersonacoreError("the engine is closed: submit to a new Engine")
            self._counts["submitted"] += 1
            self._inbox.append(("add", (handle, plan, policy)))
            self._lock.notify_all()
        return handle

    def _cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            self._inbox.append(("cancel", handle))
            self._lock.notify_all()

    def stats(self) -> Dict[str, int]:
        """Counters for monitoring: ``queued``, ``running``, ``batch_size`` (of the last step),
        ``tokens_generated``, ``alerts``, ``steer_switches``, ``steps``, ``submitted``, ``finished``,
        ``failed``, ``cancelled``, ``tokens_in_flight`` and ``max_tokens_in_flight``."""
        with self._lock:
            out = dict(self._counts)
            native = dict(self._stats)
            waiting = sum(1 for kind, _ in self._inbox if kind == "add")
        out.update(native)
        out["queued"] += waiting
        return out

    # ---- the engine thread -----------------------------------------------------------------------
    def _drain(self, wakes: _Wakes) -> None:
        """Apply submissions and cancellations (engine thread)."""
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
        for kind, item in items:
            if kind == "add":
                handle, plan, policy = item
                try:
                    rid = self._scheduler.add(plan, policy, handle.request_id)
                except BaseException as e:  # noqa: BLE001 - the request fails, the engine lives on
                    self._fail(handle, e, wakes)
                    continue
                self._handles[rid] = handle
            else:
                for rid, h in list(self._handles.items()):
                    if h is item:
                        self._deliver(rid, self._scheduler.cancel(rid), wakes)

    def _fail(self, handle: RequestHandle, e: BaseException, wakes: _Wakes) -> None:
        with self._lock:
            self._counts["failed"] += 1
        handle._finish(None, e, wakes)

    def _deliver(self, rid: int, o: Optional[Dict[str, Any]], wakes: _Wakes) -> None:
        handle = self._handles.get(rid)
        if handle is None or o is None:
            return
        if o.get("error") is not None:
            del self._handles[rid]
            self._fail(handle, o["error"], wakes)
            return
        step = o.get("step")
        if step is not None:
            handle._push(step, wakes)
        result = o.get("result")
        if result is not None:
            del self._handles[rid]
            reason = "cancelled" if result.get("finish_reason") == "cancelled" else "finished"
            with self._lock:
                self._counts[reason] += 1
            handle._finish(result, None, wakes)

    def _run(self) -> None:
        # Async readers are woken once per event loop per step, as the last thing before the
        # next step releases the GIL: a woken loop then finds the GIL free instead of waking only
        # to wait for it while this thread finishes its hand-off.
        wakes = _Wakes()
        while True:
            if not self._handles:
                wakes.flush()  # nothing is running: wake the readers before waiting for work
            with self._lock:
                self._lock.wait_for(
                    lambda: self._closed or bool(self._inbox) or bool(self._handles)
                )
                if self._closed:
                    break
            self._drain(wakes)
            if not self._handles:  # cancellations emptied the engine: no step will refresh these
                with self._lock:
                    self._stats = self._scheduler.stats()
                continue
            wakes.flush()
            try:
                outs = self._scheduler.step()
            except BaseException as e:  # noqa: BLE001 - a failed step fails its requests only
                outs = [{"id": rid, "error": e} for rid in self._handles]
            for o in outs:
                self._deliver(o["id"], o, wakes)
            with self._lock:
                self._stats = self._scheduler.stats()
        wakes.flush()
        closed = PersonacoreError("the engine was closed before this request finished")
        for h in self._handles.values():
            h._finish(None, closed)
        with self._lock:
            for kind, item in self._inbox:
                if kind == "add":
                    item[0]._finish(None, closed)
            self._inbox.clear()

    def close(self) -> None:
        """Stop the engine thread; requests still running fail with a :class:`PersonacoreError`."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.stats()
        return f"Engine(running={s.get('running', 0)}, queued={s.get('queued', 0)}, closed={self._closed})"
