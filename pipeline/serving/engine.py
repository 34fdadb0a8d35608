"""The engine: one queue and one worker thread for all of the model's work, knowing nothing
of HTTP.

Work comes as jobs:

- `SampleJob` with a deadline (:anytime): rows sampled a chunk of codes per compiled call,
  retired at the deadline or max_codes, whichever comes first, never before min_codes.
- `SampleJob` without a deadline (:predict `sample`, min_codes = max_codes = k): rows that
  ride along in the same chunks, taking what deadline work leaves.
- `CallJob` (:predict `decode`, `encode`): one signature call between two chunks.

Continuous batching: the engine keeps one batch of rows (padded to the sizes in `BUCKETS`,
so that few programs are compiled); jobs join between chunks and leave when done, and a
job whose client has gone is dropped before the next chunk, freeing its rows. Each chunk's
length comes from `ordered_vqvae.budget.plan_chunk`, the same policy that
`ImageGenerator.sample_until` runs for one request.

Admission counts the work already admitted and queued ahead: `predicted_wait` plays the
batch forward (the chunk in flight, pending calls, rows freed as jobs ahead retire) with
the cost model's typical predictions, and a deadline job that cannot get min_codes decoded
in time is refused at once (`Overloaded`). Pacing uses the pessimistic predictions and the
learnt sending margin. Priorities, stated once:

- deadline jobs join first, in arrival order;
- work without a deadline holds at most `ServeConfig.fixed_rows` rows while deadline work
  could use them (one larger job runs when no deadline work is active or waiting); alone,
  it runs in chunks of up to `fixed_chunk_ms` (at least max_chunk codes), so a deadline
  job that arrives waits at most about that long for its first chunk;
- a pending call runs between chunks as soon as every active deadline job can still be
  answered after it; until then no new deadline job joins, so a call waits at most for the
  deadline jobs already active.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional

import numpy as np

from ordered_vqvae.budget import CostModel, plan_chunk
from pipeline.serving.jobs import CallJob, ClientGone, Job, Overloaded, SampleJob
from pipeline.serving.metrics import BUCKETS

__all__ = ["CallJob", "ClientGone", "Engine", "Overloaded", "SampleJob", "bucket_for"]


def bucket_for(rows: int) -> int:
    return next(b for b in BUCKETS if b >= rows)


def _seconds(fn, *args) -> float:
    start = time.monotonic()
    fn(*args)
    return time.monotonic() - start


def _resolve(future: Optional[asyncio.Future], value) -> None:
    """Results and errors alike are set as results: a future whose client left is never
    awaited, and an exception set on it would be logged as never retrieved."""
    if future is not None and not future.done():
        future.set_result(value)


class Engine:
    def __init__(self, model, config, metrics):
        self.model, self.config, self.metrics = model, config, metrics
        self.costs = CostModel(quantile=config.cost_quantile, max_age=config.cost_max_age_s)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ovqvae-model")
        self.waiting: List[SampleJob] = []   # Deadline jobs, in arrival order.
        self.fixed: List[SampleJob] = []     # Sampling without a deadline.
        self.calls: List[CallJob] = []
        self.active: List[SampleJob] = []
        self.state: Optional[dict] = None    # Rows of the active jobs, then padding.
        self.wakeup = asyncio.Event()
        self.chunk: Optional[tuple] = None   # (started, typical seconds) of the call in flight.
        self.task: Optional[asyncio.Task] = None
        self.overhead = collections.deque([0.0], maxlen=64)  # Seconds of bookkeeping a step.
        self.floor = config.deadline_margin_ms / 1e3
        # (when, seconds) from an answer being ready to its handler sending it: the event
        # loop's delay, which every deadline keeps free while pacing. It ages like the costs.
        self.send_delays = collections.deque(maxlen=256)
        self._margin = (self.floor, None)   # (seconds, when computed)

    # -- what the app calls

    def queued(self) -> int:
        return len(self.waiting) + len(self.fixed) + len(self.calls)

    def busy(self) -> int:
        return self.queued() + len(self.active)

    def submit(self, job: Job) -> None:
        """Queues a job or refuses it at once (`Overloaded`)."""
        now = time.monotonic()
        if self.queued() >= self.config.max_queue:
            self.metrics.refused.inc()
            raise Overloaded(f"the queue is full ({self.config.max_queue} requests); retry "
                             "later")
        if isinstance(job, SampleJob) and job.has_deadline:
            wait = self.predicted_wait(job, now)
            left = job.deadline - self.floor - now
            if wait is not None and wait > left:
                self.metrics.refused.inc()
                raise Overloaded(
                    f"min_codes={job.min_codes} cannot be sampled and decoded before the "
                    f"deadline: about {wait * 1e3:.0f} ms needed, {left * 1e3:.0f} ms left",
                    wait)
        loop = asyncio.get_running_loop()
        job.done = loop.create_future()
        if isinstance(job, CallJob):
            self.calls.append(job)
        else:
            job.started = loop.create_future()
            job.events = asyncio.Queue() if job.stream else None
            (self.waiting if job.has_deadline else self.fixed).append(job)
        self.metrics.queue_depth.set(self.queued())
        self.wakeup.set()

    def sent(self, job: SampleJob) -> None:
        """Called by the handler as it sends a final answer: learns the sending margin and
        counts a deadline miss."""
        now = time.monotonic()
        if job.answered is not None:
            self.send_delays.append((now, now - job.answered))
            self._margin = (self._margin[0], None)
        if now > job.deadline:
            self.metrics.misses.inc()

    def margin(self, now: float) -> float:
        """Seconds every deadline keeps free while pacing: the configured floor, or an upper
        quantile of the recent sending delays when larger (recomputed when a delay arrives
        and every 0.1 s, as delays age)."""
        value, computed = self._margin
        if computed is None or now - computed > 0.1:
            recent = [d for t, d in self.send_delays if now - t <= self.config.cost_max_age_s]
            value = max([self.floor] + ([float(np.quantile(recent, self.config.cost_quantile))]
                                        if recent else []))
            self._margin = (value, now)
        return value

    # -- predictions

    def _active_rows(self, fixed: Optional[bool] = None) -> int:
        return sum(j.num_samples for j in self.active
                   if fixed is None or j.has_deadline != fixed)

    def _call_seconds(self, call: CallJob) -> float:
        return self.costs.decode_seconds(("call", call.name, bucket_for(call.rows))) or 0.0

    def predicted_wait(self, job: SampleJob, now: float) -> Optional[float]:
        """Typical seconds until `job` could have min_codes decoded if it were queued now:
        the chunk in flight, pending calls, and the rows it needs freed as the jobs active
        and waiting ahead of it retire. None while the costs are unknown."""
        rows = self._active_rows() + sum(j.num_samples for j in self.waiting) + job.num_samples
        key = bucket_for(min(rows, self.config.max_batch))
        decode = self.costs.decode_seconds(key, pessimistic=False)
        if decode is None or self.costs.extend_seconds(key, 1) is None:
            return None

        def codes(n):
            return self.costs.extend_seconds(key, n, pessimistic=False)

        t = now
        if self.chunk is not None:
            started, seconds = self.chunk
            t += max(seconds - (now - started), 0.0)
        ends = []  # (when, rows) of jobs ahead, as they retire.
        for j in self.active:
            heapq.heappush(ends, (min(t + codes(j.max_codes - j.k) + decode,
                                      j.deadline - self.floor), j.num_samples))
        if self.calls:  # They run first, after the deadline work already active.
            t = max([t] + [end for end, _ in ends if not math.isinf(end)])
            t += sum(self._call_seconds(c) for c in self.calls)
        free = self.config.max_batch - self._active_rows()
        for j in self.waiting + [job]:
            while free < j.num_samples and ends:
                end, freed = heapq.heappop(ends)
                free, t = free + freed, max(t, end)
            if free < j.num_samples:
                return math.inf
            if j is job:
                return t + codes(job.min_codes) + decode - now
            free -= j.num_samples
            heapq.heappush(ends, (min(t + codes(j.max_codes) + decode,
                                      j.deadline - self.floor), j.num_samples))
        return None  # Not reached: `job` is last.

    # -- the loop

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _run(self):
        while True:
            if not self.busy():
                self.wakeup.clear()
                await self.wakeup.wait()
            try:
                await self._step()
            except Exception as e:  # A model failure fails its jobs, not the server.
                for job in self.active + self.waiting + self.fixed:
                    self._end(job, e)
                self.active, self.waiting, self.fixed, self.state = [], [], [], None
                self.metrics.active_rows.set(0)
                self.metrics.queue_depth.set(self.queued())

    def _end(self, job: Job, result) -> None:
        """Ends a job that will not be answered normally: its futures get `result`."""
        if isinstance(job, SampleJob):
            _resolve(job.started, result)
            if job.events is not None:
                job.events.put_nowait(None)
        _resolve(job.done, result)

    def _drop_gone(self) -> None:
        """Drops every job whose client has left; an active one's rows become free."""
        for name in ("waiting", "fixed", "calls", "active"):
            jobs = getattr(self, name)
            gone = [j for j in jobs if j.gone()]
            if gone:
                setattr(self, name, [j for j in jobs if j not in gone])
                for job in gone:
                    self._end(job, ClientGone("the client left"))
        self.metrics.queue_depth.set(self.queued())

    async def _step(self):
        now = time.monotonic()
        self._drop_gone()
        if self.calls and self._call_fits(now):
            await self._run_call(self.calls.pop(0))
            return
        await self._join_waiting(now)
        await self._shrink()
        if not self.active:
            return
        self.overhead.append(time.monotonic() - now)  # Joining and shrinking, per step.
        reserve = float(np.quantile(self.overhead, 0.9))
        margin = self.margin(now)
        key = len(self.state["position"])
        at = time.monotonic()
        retire, steps = plan_chunk(
            self.costs, key, [(j.deadline - margin - at - reserve, j.k, j.min_codes,
                               j.max_codes) for j in self.active], self.config.max_chunk)
        if retire:
            await self._retire([self.active[i] for i in retire])
            return
        if not self.waiting and not self._active_rows(fixed=False):
            # Only work without a deadline: chunks as long as fixed_chunk_ms allows (fewer
            # calls, each with its fixed cost), so that deadline work waits at most that.
            steps = max(steps, self.costs.codes_within(
                key, self.config.fixed_chunk_ms / 1e3,
                max(j.max_codes - j.k for j in self.active)))
        limits = np.zeros(key, np.int32)  # Free rows stay where they are.
        temperature = np.ones(key, np.float32)
        for j in self.active:
            limits[j.rows] = j.max_codes
            temperature[j.rows] = j.temperature
        started = time.monotonic()
        self.chunk = (started, self.costs.extend_seconds(key, steps, pessimistic=False) or 0.0)
        try:
            self.state = await self._call(self.model.extend, self.state, temperature, limits,
                                          steps)
        finally:
            self.chunk = None
        seconds = time.monotonic() - started
        self.costs.observe_extend(key, steps, seconds)
        self.metrics.chunk_seconds.observe(seconds)
        self.metrics.batch_rows.observe(self._active_rows())
        position = self.state["position"]
        refined = []
        for j in self.active:
            k = int(position[j.rows[0]])
            if k != j.k:
                j.k = k
                if j.stream:
                    refined.append(j)
        finished = [j for j in self.active if j.k >= j.max_codes]
        if finished:
            await self._retire(finished)
        refined = [j for j in refined if j not in finished and not j.gone()]
        if refined:
            await self._decode_and_send(refined, final=False)

    # -- calls

    def _call_fits(self, now: float) -> bool:
        """Whether the first pending call can run now: every active deadline job can still
        reach min_codes and be decoded after it."""
        jobs = [j for j in self.active if j.has_deadline]
        if not jobs:
            return True
        key, margin = len(self.state["position"]), self.margin(now)
        cost = self._call_seconds(self.calls[0])
        decode = self.costs.decode_seconds(key) or 0.0
        for j in jobs:
            codes = self.costs.extend_seconds(key, max(j.min_codes - j.k, 0)) or 0.0
            if j.deadline - margin - now - codes - decode < cost:
                return False
        return True

    async def _run_call(self, job: CallJob):
        self.metrics.queue_depth.set(self.queued())
        start = time.monotonic()
        try:
            result = await self._call(job.run)
        except Exception as e:  # The caller's to answer (a bad input, a model failure).
            result = e
        self.costs.observe_decode(("call", job.name, bucket_for(job.rows)),
                                  time.monotonic() - start)
        _resolve(job.done, result)

    # -- joining and leaving

    async def _join_waiting(self, now: float):
        joining = []
        capacity = self.config.max_batch - self._active_rows()
        if not self.calls:  # A pending call goes before new deadline work.
            while self.waiting and self.waiting[0].num_samples <= capacity:
                job = self.waiting.pop(0)
                key = bucket_for(self._active_rows() + job.num_samples
                                 + sum(j.num_samples for j in joining))
                need = self.costs.extend_seconds(key, job.min_codes, pessimistic=False)
                decode = self.costs.decode_seconds(key, pessimistic=False)
                if need is not None and decode is not None and \
                        now + need + decode > job.deadline - self.floor:
                    self.metrics.refused.inc()
                    self._end(job, Overloaded(
                        f"min_codes={job.min_codes} can no longer be sampled before the "
                        "deadline", need + decode))
                    continue
                capacity -= job.num_samples
                joining.append(job)
        deadline_work = bool(joining or self.waiting or self._active_rows(fixed=False))
        fixed_rows = self._active_rows(fixed=True)
        while self.fixed and self.fixed[0].num_samples <= capacity:
            rows = self.fixed[0].num_samples
            if fixed_rows + rows > self.config.fixed_rows and (fixed_rows or deadline_work):
                break
            job = self.fixed.pop(0)
            capacity, fixed_rows = capacity - rows, fixed_rows + rows
            joining.append(job)
        self.metrics.queue_depth.set(self.queued())
        if not joining:
            return
        taken = [i for j in self.active for i in j.rows]
        self.state = await self._call(self._place, self.state, taken, joining)
        self.active.extend(joining)
        for job in joining:
            _resolve(job.started, None)
        self.metrics.active_rows.set(self._active_rows())

    def _place(self, state: Optional[dict], taken: List[int], joining) -> dict:
        """(Worker thread.) Gives each joining job free rows of `state`, growing it to a
        larger bucket when too few are free, and starts them: no codes, position 0, the
        job's own random streams. Rows in use stay where they are, so joining copies no
        cache unless the batch grows."""
        size = 0 if state is None else len(state["position"])
        needed = len(taken) + sum(j.num_samples for j in joining)
        if needed > size:
            fresh = self.model.begin(bucket_for(needed) - size, 0)
            state = fresh if state is None else self.model.join([state, fresh])
        free = sorted(set(range(len(state["position"]))) - set(taken))
        for j in joining:
            j.rows, free = free[:j.num_samples], free[j.num_samples:]
            start = self.model.start(j.num_samples, j.seed)
            for part in ("codes", "position", "seeds"):
                state[part][j.rows] = start[part]
        return state

    async def _shrink(self):
        """Moves the active rows into the smallest bucket that holds them, when that is
        smaller than the batch and no job waits to join (it copies the cache, so not at
        every departure)."""
        if not self.active:
            self.state = None
            self.metrics.active_rows.set(0)
            return
        rows = [i for j in self.active for i in j.rows]
        size = bucket_for(len(rows))
        if self.waiting or self.fixed or size >= len(self.state["position"]):
            return
        padding = [rows[0]] * (size - len(rows))  # Free rows: they never advance.
        self.state = await self._call(self.model.take, self.state, rows + padding)
        start = 0
        for j in self.active:
            j.rows = list(range(start, start + j.num_samples))
            start += j.num_samples
        self.metrics.active_rows.set(start)

    def _finish(self, state, jobs, final: bool):
        """(Worker thread.) Decodes the jobs' rows at their k and renders what goes out.
        Its time is the decode cost the engine budgets for."""
        codes = state["codes"][[i for j in jobs for i in j.rows]]
        images = self.model.decode_at(codes, [j.k for j in jobs for _ in j.rows])
        out, at = [], 0
        for j in jobs:
            n = j.num_samples
            out.append(j.render(j, codes[at:at + n], images[at:at + n], final))
            at += n
        return out

    async def _decode_and_send(self, jobs, final: bool):
        start = time.monotonic()
        rendered = await self._call(self._finish, self.state, jobs, final)
        self.costs.observe_decode(bucket_for(sum(j.num_samples for j in jobs)),
                                  time.monotonic() - start)
        for j, (event, body) in zip(jobs, rendered):
            if event is not None:
                j.events.put_nowait(event)
            if final:
                if j.has_deadline:
                    self.metrics.codes.observe(j.k)
                j.answered = time.monotonic()
                _resolve(j.done, body)
                if j.events is not None:
                    j.events.put_nowait(None)

    async def _retire(self, jobs: List[SampleJob]):
        await self._decode_and_send(jobs, final=True)
        self.active = [j for j in self.active if j not in jobs]
        self.metrics.active_rows.set(self._active_rows())

    # -- warm-up

    def warm_up(self, render: Callable, log: Callable[[str], None] = print) -> None:
        """(Worker thread, before the port opens.) Compiles every batch bucket and times it,
        so that the first requests are admitted and paced on measured costs; the timings
        are the cost model's baseline. Each time kept is the best of 3: a stall while
        warming up is not a cost (the serving loop then learns the tail). `render` is
        what answers render (a `SampleJob.render`), timed with the decode."""
        model, costs = self.model, self.costs
        for rows in (b for b in BUCKETS if b <= bucket_for(self.config.max_batch)):
            start = time.monotonic()
            state = model.begin(rows, 0)
            ones, limit = np.ones(rows, np.float32), np.full(rows, model.code_length, np.int32)
            model.extend(state, ones, limit, 1)  # Compiles.
            for steps in (1, 1, self.config.max_chunk, self.config.max_chunk):
                costs.observe_extend(rows, steps, min(_seconds(
                    model.extend, model.begin(rows, 0), ones, limit, steps) for _ in range(3)))
            job = SampleJob(rows, 0, 1.0, 1, 1, render=render)
            job.rows, job.k = list(range(rows)), 1
            for _ in range(2):  # Decoding and rendering an answer, as _finish does.
                costs.observe_decode(rows, min(_seconds(self._finish, state, [job], True)
                                               for _ in range(3)))
            log(f"batch size {rows:3d} compiled and timed in {time.monotonic() - start:.1f} s")
        costs.keep_baseline()

