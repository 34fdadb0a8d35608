"""The anytime scheduler (continuous batching, deadlines, admission, cancellation) against a
fake model whose cost per chunk is known, so that timing and batching can be asserted."""

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pipeline.serve import AnytimeRequest, Metrics, RequestError, Scheduler, ServeConfig

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


def _request(deadline_s, n=2, seed=1, min_codes=1, max_codes=K, stream=False):
    now = time.monotonic()
    return AnytimeRequest(num_samples=n, deadline=now + deadline_s, seed=seed, temperature=1.0,
                          min_codes=min_codes, max_codes=max_codes, stream=stream, arrived=now)


async def _scheduler(model, **config):
    config = ServeConfig(saved_model="unused", **{"max_chunk": 4, **config})
    scheduler = Scheduler(model, config, Metrics(), ThreadPoolExecutor(1))
    for steps in (1, 1, 2, 4, 4, 4):  # Teach the cost model, as the server's warm-up does.
        for rows in (1, 2, 4, 8):
            start = time.monotonic()
            model.extend(model.begin(rows, 0), None, np.full(rows, K), steps)
            scheduler.costs.observe_extend(rows, steps, time.monotonic() - start)
            start = time.monotonic()
            model.decode_at(np.zeros((rows, K)), np.ones(rows))
            scheduler.costs.observe_decode(rows, time.monotonic() - start)
    model.calls.clear()
    scheduler.start()
    return scheduler


def _run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def test_full_length_when_the_deadline_allows_and_codes_are_the_rows_own():
    async def main():
        model = FakeModel()
        scheduler = await _scheduler(model)
        request = _request(5.0, n=3, seed=2)
        scheduler.admit(request)
        answer = json.loads(await request.done)
        assert answer["num_codes"] == K
        expected = [[(2 + i) % 7 for i in range(K)]] * 3
        assert answer["codes"] == expected
        assert [steps for _, steps, _ in model.calls] == [4] * (K // 4)

    _run(main())


def test_a_deadline_stops_sampling_early_and_in_time():
    async def main():
        model = FakeModel(fixed=0.002, per_code=0.004)
        scheduler = await _scheduler(model)
        request = _request(0.100, n=2)  # 32 codes would take ~0.15 s.
        start = time.monotonic()
        scheduler.admit(request)
        answer = json.loads(await request.done)
        elapsed = time.monotonic() - start
        assert 8 <= answer["num_codes"] < K, answer["num_codes"]
        assert elapsed <= 1.25 * 0.100 + 0.010, elapsed  # The bound, at the caller.
        assert answer["codes"][0][answer["num_codes"]:] == [0] * (K - answer["num_codes"])

    _run(main())


def test_requests_join_between_chunks_and_share_calls():
    async def main():
        model = FakeModel()
        scheduler = await _scheduler(model)
        first = _request(5.0, n=2, seed=1)
        scheduler.admit(first)
        await asyncio.sleep(0.03)  # The first is a few chunks in when the second arrives.
        second = _request(5.0, n=3, seed=4, max_codes=12)
        scheduler.admit(second)
        a, b = json.loads(await first.done), json.loads(await second.done)
        assert a["num_codes"] == K and b["num_codes"] == 12
        assert b["codes"][0][:12] == [(4 + i) % 7 for i in range(12)]
        assert a["codes"][0] == [(1 + i) % 7 for i in range(K)]
        active = [n for _, _, n in model.calls]
        assert 5 in active  # Both requests' rows advanced in one call ...
        assert active[0] == 2 and active[-1] == 2  # ... after the first ran alone, and after
        rows = [r for r, _, _ in model.calls]  # the second left; rows padded to buckets.
        assert set(rows) <= {2, 8} and rows[-1] == 2

    _run(main())


def test_a_cancelled_request_frees_its_rows_at_the_next_chunk():
    async def main():
        model = FakeModel(per_code=0.01)
        scheduler = await _scheduler(model)
        stays, leaves = _request(5.0, n=1, seed=1), _request(5.0, n=4, seed=2)
        scheduler.admit(stays)
        scheduler.admit(leaves)
        while not model.calls:
            await asyncio.sleep(0.005)
        leaves.cancelled = True  # The client went away.
        answer = json.loads(await stays.done)
        assert answer["num_codes"] == K
        assert model.calls[0][2] == 5 and model.calls[-1][2] == 1
        assert model.calls[-1][0] == 1  # The batch shrank to the smallest bucket.
        assert scheduler.metrics.active_rows._value.get() == 0

    _run(main())


def test_admission_refuses_what_cannot_reach_min_codes_in_time():
    async def main():
        model = FakeModel(per_code=0.01)
        scheduler = await _scheduler(model)
        with pytest.raises(RequestError, match=r"min_codes=16 cannot be sampled .* ms left") as e:
            scheduler.admit(_request(0.05, min_codes=16))  # 16 codes need ~0.17 s.
        assert e.value.status == 503 and int(e.value.headers["Retry-After"]) >= 1
        ok = _request(0.5, min_codes=16)
        scheduler.admit(ok)
        assert json.loads(await ok.done)["num_codes"] >= 16
        full = await _scheduler(model, max_queue=1)
        full.queue.append(_request(9.0))  # Someone is already waiting.
        with pytest.raises(RequestError, match="queue is full") as e:
            full.admit(_request(9.0))
        assert e.value.status == 503

    _run(main())


def test_stream_events_refine_up_to_the_final_answer():
    async def main():
        model = FakeModel()
        scheduler = await _scheduler(model, max_chunk=8)
        request = _request(5.0, n=2, max_codes=20, stream=True)
        scheduler.admit(request)
        events = []
        while (event := await request.events.get()) is not None:
            assert event.startswith(b"data: ") and event.endswith(b"\n\n")
            events.append(json.loads(event[len("data: "):]))
        ks = [e["num_codes"] for e in events]
        assert ks == [8, 16, 20] and [e["final"] for e in events] == [False, False, True]
        assert all(len(e["images"]) == 2 for e in events)
        assert json.loads(await request.done)["num_codes"] == 20

    _run(main())


def test_the_sending_margin_is_learnt_and_late_answers_are_counted():
    async def main():
        model = FakeModel()
        scheduler = await _scheduler(model)
        assert scheduler.margin == 0.005  # The configured floor before anything is sent.
        request = _request(0.030, n=1, max_codes=4)
        scheduler.admit(request)
        await request.done
        await asyncio.sleep(0.040)  # The handler sends it late: 40 ms after it was ready.
        scheduler.sent(request)
        assert 0.035 < scheduler.margin < 0.045
        assert scheduler.metrics.misses._value.get() == 1
        with pytest.raises(RequestError, match="ms left"):  # 30 ms no longer leave room.
            scheduler.admit(_request(0.030, n=1))

    _run(main())
