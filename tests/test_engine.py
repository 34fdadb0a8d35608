"""The serving engine (continuous batching, deadlines, admission that counts queued work,
work without deadlines, calls, departed clients, costs that age) against a fake model whose
cost per chunk is known, so that timing and batching can be asserted."""

import asyncio
import json
import time

import numpy as np
import pytest

from pipeline.serving.config import ServeConfig
from pipeline.serving.engine import CallJob, ClientGone, Engine, Overloaded, SampleJob
from pipeline.serving.metrics import Metrics

K = 32


class FakeModel:
    """begin/extend/decode_at on NumPy: code i of row r is (seed + i) % 7; a chunk costs
    `fixed + per_code * steps` seconds of sleep. Records the rows of every extend call."""

    code_length = K

    def __init__(self, fixed=0.002, per_code=0.004):
        self.fixed, self.per_code = fixed, per_code
        self.calls = []  # (rows, steps, active rows)

    def begin(self, num_samples, seed):
        return {"codes": np.zeros((num_samples, K), np.int32),
                "cache": np.zeros((1, 2, num_samples, 1), np.float32),
                "position": np.zeros(num_samples, np.int32),
                "seeds": np.full(num_samples, seed, np.int32)}

    def start(self, num_samples, seed):
        return {k: v for k, v in self.begin(num_samples, seed).items() if k != "cache"}

    def extend(self, state, temperature, limit, steps):
        time.sleep(self.fixed + self.per_code * steps)
        codes, position = state["codes"].copy(), state["position"].copy()
        self.calls.append((len(position), steps, int((position < limit).sum())))
        for _ in range(steps):
            active = position < limit
            rows = np.nonzero(active)[0]
            codes[rows, position[rows]] = (state["seeds"][rows] + position[rows]) % 7
            position = position + active
        return {**state, "codes": codes, "position": position}

    def decode_at(self, codes, num_codes):
        time.sleep(0.001)
        return np.asarray(num_codes, np.float32)[:, None, None, None] * np.ones((len(codes), 2, 2, 1))

    def take(self, state, rows):
        return {"codes": state["codes"][rows], "cache": state["cache"][:, :, rows],
                "position": state["position"][rows], "seeds": state["seeds"][rows]}

    def join(self, states):
        return {"codes": np.concatenate([s["codes"] for s in states]),
                "cache": np.concatenate([s["cache"] for s in states], axis=2),
                "position": np.concatenate([s["position"] for s in states]),
                "seeds": np.concatenate([s["seeds"] for s in states])}


def _render(job, codes, images, final):
    """JSON of k, the codes and the images' first pixels; an event per refinement."""
    body = json.dumps({"num_codes": job.k, "codes": codes.tolist(),
                       "pixels": images[:, 0, 0, 0].tolist()}).encode()
    return (b"data: " + body + b"\n\n" if job.stream else None), (body if final else None)


def _job(deadline_s=None, n=2, seed=1, min_codes=1, max_codes=K, stream=False, gone=None):
    now = time.monotonic()
    return SampleJob(n, seed, 1.0, min_codes, max_codes, render=_render,
                     deadline=now + deadline_s if deadline_s is not None else float("inf"),
                     stream=stream, arrived=now, **({"gone": gone} if gone else {}))


async def _engine(model, **config):
    config = ServeConfig(saved_model="unused", **{"max_chunk": 4, "max_batch": 16,
                                                 "max_samples": 8, **config})
    engine = Engine(model, config, Metrics())
    for steps in (1, 1, 2, 4, 4, 4):  # Teach the cost model, as the server's warm-up does.
        for rows in (1, 2, 4, 8, 16):
            start = time.monotonic()
            model.extend(model.begin(rows, 0), None, np.full(rows, K), steps)
            engine.costs.observe_extend(rows, steps, time.monotonic() - start)
            start = time.monotonic()
            model.decode_at(np.zeros((rows, K)), np.ones(rows))
            engine.costs.observe_decode(rows, time.monotonic() - start)
    engine.costs.keep_baseline()
    model.calls.clear()
    engine.start()
    return engine


def _run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


async def _answer(job):
    result = await job.done
    assert not isinstance(result, Exception), result
    return json.loads(result)


def test_full_length_when_the_deadline_allows_and_codes_are_the_rows_own():
    async def main():
        model = FakeModel()
        engine = await _engine(model)
        job = _job(5.0, n=3, seed=2)
        engine.submit(job)
        answer = await _answer(job)
        assert answer["num_codes"] == K
        assert answer["codes"] == [[(2 + i) % 7 for i in range(K)]] * 3
        assert [steps for _, steps, _ in model.calls] == [4] * (K // 4)

    _run(main())


def test_a_deadline_stops_sampling_early_and_in_time():
    async def main():
        model = FakeModel(fixed=0.002, per_code=0.004)
        engine = await _engine(model)
        job = _job(0.100, n=2)  # 32 codes would take ~0.15 s.
        start = time.monotonic()
        engine.submit(job)
        answer = await _answer(job)
        elapsed = time.monotonic() - start
        assert 8 <= answer["num_codes"] < K, answer["num_codes"]
        assert elapsed <= 1.25 * 0.100 + 0.010, elapsed  # The bound, at the caller.
        assert answer["codes"][0][answer["num_codes"]:] == [0] * (K - answer["num_codes"])

    _run(main())


def test_jobs_join_between_chunks_and_share_calls():
    async def main():
        model = FakeModel()
        engine = await _engine(model)
        first = _job(5.0, n=2, seed=1)
        engine.submit(first)
        await asyncio.sleep(0.03)  # The first is a few chunks in when the second arrives.
        second = _job(5.0, n=3, seed=4, max_codes=12)
        engine.submit(second)
        a, b = await _answer(first), await _answer(second)
        assert a["num_codes"] == K and b["num_codes"] == 12
        assert b["codes"][0][:12] == [(4 + i) % 7 for i in range(12)]
        assert a["codes"][0] == [(1 + i) % 7 for i in range(K)]
        active = [n for _, _, n in model.calls]
        assert 5 in active  # Both jobs' rows advanced in one call ...
        assert active[0] == 2 and active[-1] == 2  # ... after the first ran alone, and after
        rows = [r for r, _, _ in model.calls]  # the second left; rows padded to buckets.
        assert set(rows) <= {2, 8} and rows[-1] == 2

    _run(main())


def test_a_departed_client_costs_nothing():
    """Jobs whose clients left are dropped before the next chunk: queued ones never reach
    the model, an active one frees its rows, and a job behind them is answered in time."""
    async def main():
        model = FakeModel(per_code=0.01)
        engine = await _engine(model, max_queue=300)
        left = {"now": False}
        stays, leaves = _job(5.0, n=1, seed=1), _job(5.0, n=4, seed=2, gone=lambda: left["now"])
        engine.submit(stays)
        engine.submit(leaves)
        crowd = [_job(60.0, n=8, gone=lambda: left["now"]) for _ in range(200)]
        for job in crowd:  # Queued behind: the batch has 16 rows.
            engine.submit(job)
        while not model.calls:
            await asyncio.sleep(0.005)
        left["now"] = True  # Every client but one resets its connection.
        answer = await _answer(stays)
        assert answer["num_codes"] == K
        assert model.calls[0][2] == 5 + 8 and model.calls[-1][2] == 1
        assert model.calls[-1][0] == 1  # The batch shrank to the smallest bucket.
        assert len(model.calls) <= K // 4 + 2  # Nobody else's chunks were computed.
        assert all(isinstance(j.done.result(), ClientGone) for j in crowd + [leaves])
        assert engine.metrics.active_rows._value.get() == 0 and engine.queued() == 0
        start = time.monotonic()
        after = _job(0.2, n=2)
        engine.submit(after)
        await _answer(after)
        assert time.monotonic() - start < 0.2

    _run(main())


def test_admission_refuses_what_cannot_reach_min_codes_in_time():
    async def main():
        model = FakeModel(per_code=0.01)
        engine = await _engine(model)
        start = time.monotonic()
        with pytest.raises(Overloaded, match=r"min_codes=16 cannot be sampled .* ms left") as e:
            engine.submit(_job(0.05, min_codes=16))  # 16 codes need ~0.17 s.
        assert e.value.retry_after > 0.1 and time.monotonic() - start < 0.01
        ok = _job(0.5, min_codes=16)
        engine.submit(ok)
        assert (await _answer(ok))["num_codes"] >= 16
        full = await _engine(model, max_queue=1)
        full.waiting.append(_job(9.0))  # Someone is already waiting.
        with pytest.raises(Overloaded, match="queue is full"):
            full.submit(_job(9.0))
        assert full.metrics.refused._value.get() == 1

    _run(main())


def test_admission_counts_the_work_queued_ahead():
    """Behind 20 queued 8-row jobs with long deadlines (two fit the batch at a time, each
    ~0.13 s for 32 codes), a 200 ms job is refused at once; one that allows for the queue
    is admitted and answered in time."""
    async def main():
        model = FakeModel(fixed=0.002, per_code=0.004)
        engine = await _engine(model)
        ahead = [_job(60.0, n=8, seed=i) for i in range(20)]
        for job in ahead:
            engine.submit(job)
        start = time.monotonic()
        with pytest.raises(Overloaded, match="cannot be sampled") as e:
            engine.submit(_job(0.2, n=2))
        assert time.monotonic() - start < 0.01
        assert e.value.retry_after > 1.0  # About ten rounds of two jobs.
        patient = _job(6.0, n=2)
        engine.submit(patient)
        await _answer(patient)
        assert time.monotonic() - start < 6.0
        assert [(await _answer(j))["num_codes"] for j in ahead] == [K] * 20

    _run(main())


def test_work_without_a_deadline_rides_along_and_deadlines_hold():
    """Fixed-k jobs (:predict sample) take chunks with the deadline jobs, never more rows
    than fixed_rows while deadline work waits, and get every code they asked for."""
    async def main():
        model = FakeModel(fixed=0.002, per_code=0.004)
        engine = await _engine(model)  # max_batch 16, max_samples 8: fixed_rows 8.
        fixed = [_job(None, n=8, seed=i, min_codes=K, max_codes=K) for i in range(3)]
        for job in fixed:
            engine.submit(job)
        await asyncio.sleep(0.02)
        assert engine._active_rows(fixed=True) == 8  # One at a time: 8 rows stay free.
        while not model.calls:
            await asyncio.sleep(0.002)
        # Alone, it runs in chunks of up to fixed_chunk_ms (50 ms: ~12 codes), not max_chunk.
        assert 8 <= model.calls[0][1] <= 14
        # A deadline job may first wait out the fixed chunk in flight (up to fixed_chunk_ms,
        # 50 ms): its deadline leaves room for that and for its own chunk and decode.
        late, deadline = 0, 0.1
        for i in range(5):
            job = _job(deadline, n=4, seed=10 + i)
            start = time.monotonic()
            engine.submit(job)
            answer = await _answer(job)
            late += time.monotonic() - start > 1.25 * deadline + 0.01
            assert answer["num_codes"] >= 1
        assert late == 0
        for i, job in enumerate(fixed):
            answer = await _answer(job)
            assert answer["num_codes"] == K
            assert answer["codes"][0] == [(i + c) % 7 for c in range(K)]
        assert any(active == 8 + 4 for _, _, active in model.calls)  # Shared chunks.

    _run(main())


def test_calls_run_between_chunks_after_the_deadline_work_allows():
    async def main():
        model = FakeModel(per_code=0.01)
        engine = await _engine(model)
        order = []

        def decode():
            order.append(("call", len(model.calls)))
            time.sleep(0.02)
            return b'{"outputs": {}}'

        sampled = _job(0.5, n=2, max_codes=8)
        engine.submit(sampled)
        while not model.calls:
            await asyncio.sleep(0.002)
        call = CallJob("decode", 4, run=decode)
        engine.submit(call)
        assert await call.done == b'{"outputs": {}}'
        answer = await _answer(sampled)
        assert answer["num_codes"] == 8
        assert 1 <= order[0][1] < 8 // 4 + 1  # Between two chunks, not after the job.

        def broken():
            raise ValueError("input 'codes' holds 99")

        failing = CallJob("decode", 1, run=broken)
        engine.submit(failing)
        assert isinstance(await failing.done, ValueError)  # Returned for the caller.

    _run(main())


def test_stream_events_refine_up_to_the_final_answer():
    async def main():
        model = FakeModel()
        engine = await _engine(model, max_chunk=8)
        job = _job(5.0, n=2, max_codes=20, stream=True)
        engine.submit(job)
        assert await job.started is None
        events = []
        while (event := await job.events.get()) is not None:
            assert event.startswith(b"data: ") and event.endswith(b"\n\n")
            events.append(json.loads(event[len("data: "):]))
        assert [e["num_codes"] for e in events] == [8, 16, 20]
        assert all(len(e["codes"]) == 2 for e in events)
        assert (await _answer(job))["num_codes"] == 20

    _run(main())


def test_the_sending_margin_paces_and_decays():
    async def main():
        model = FakeModel()
        engine = await _engine(model, cost_max_age_s=0.3)
        assert engine.margin(time.monotonic()) == 0.005  # The floor before anything is sent.
        job = _job(0.030, n=1, max_codes=4)
        engine.submit(job)
        await job.done
        await asyncio.sleep(0.040)  # The handler sends it late: 40 ms after it was ready.
        engine.sent(job)
        assert 0.035 < engine.margin(time.monotonic()) < 0.045
        assert engine.metrics.misses._value.get() == 1
        paced = _job(0.060, n=1)  # Admitted (the typical costs fit), paced by the margin:
        engine.submit(paced)
        start = time.monotonic()
        await paced.done
        assert time.monotonic() - start < 0.060 - 0.035 + 0.010
        await asyncio.sleep(0.3)  # Unused for max_age: back to the floor.
        assert engine.margin(time.monotonic()) == 0.005

    _run(main())


def test_costs_learnt_under_load_age_back_to_the_baseline():
    from ordered_vqvae.budget import CostModel

    now = [0.0]
    costs = CostModel(quantile=0.9, max_age=2.0, clock=lambda: now[0])
    costs.observe_extend(1, 1, 9.0)  # Compiles: not kept.
    for c in (1, 4, 1, 4):
        costs.observe_extend(1, c, 0.001 * c)
    costs.keep_baseline()
    assert costs.extend_seconds(1, 4) == pytest.approx(0.004, abs=1e-6)
    now[0] += 2.5
    for _ in range(20):  # Overload: every call three times slower.
        now[0] += 0.05
        costs.observe_extend(1, 4, 0.012)
    assert costs.extend_seconds(1, 4) == pytest.approx(0.012, abs=1e-6)
    assert costs.affordable_codes(1, 0.010, 8, decode_key=1) is None  # No decode yet.
    now[0] += 2.5  # Nothing admitted since: the burst's timings age out.
    assert costs.extend_seconds(1, 4) == pytest.approx(0.004, abs=1e-6)
    assert costs.extend_seconds(1, 4, pessimistic=False) <= costs.extend_seconds(1, 4)


def test_plan_chunk_retires_at_the_deadline_and_sizes_chunks_by_the_tightest():
    from ordered_vqvae.budget import CostModel, plan_chunk

    costs = CostModel(quantile=0.5)
    for c in (1, 1, 2, 4, 8, 1, 2, 4, 8):
        costs.observe_extend("b", c, 0.001 + 0.001 * c)
    costs.observe_decode("b", 0.0)
    for _ in range(3):
        costs.observe_decode("b", 0.002)
    # (left, k, min, max): 0.0065 s affords 3 codes (0.001 + 0.003 + decode 0.002).
    retire, steps = plan_chunk(costs, "b", [(0.0065, 2, 1, 16), (float("inf"), 0, 16, 16)], 8)
    assert retire == [] and steps == 3
    retire, steps = plan_chunk(costs, "b", [(0.001, 2, 1, 16), (0.0065, 5, 6, 16)], 8)
    assert retire == [0] and steps == 3
    retire, steps = plan_chunk(costs, "b", [(0.0, 0, 4, 16)], 8)
    assert retire == [] and steps == 4  # min_codes before any deadline.
    retire, steps = plan_chunk(costs, "b", [(float("inf"), 16, 16, 16)], 8)
    assert retire == [0]
