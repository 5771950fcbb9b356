"""How the coordinator should size the batches of Infer requests that wait: a model.

A discrete-event model of a closed loop (issue 16): C clients, each sending its next
request as soon as its last one is answered, a coordinator with ``slots`` batches in
flight (two per stage, as ``edge.coordinator.infer_batch``), and N stages, each a queue
in front of one server that takes ``rows x T`` per batch (+-10% jitter), with a hop
delay ``d`` between them. Batching here gains nothing per request on purpose: the model
shows only how the batches' sizes spread the work over the stages.

Two ways for a request that gets a slot to form its batch:

- ``all``: take every request that waits (up to ``max_batch``);
- ``even``: take an even share, the requests at the coordinator over the slots, rounded
  up (what ``edge.coordinator.infer_batch`` does).

It prints, per case, the throughput relative to the stages' capacity, the busiest
stage's share of time busy, and the mean batch. Run::

    python benchmarks/batch_share_model.py

Modelled, not measured: BENCHMARKS.md labels it so.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random


def run(stages: int, clients: int, slots: int, max_batch: int, even: bool, t: float = 1.0,
        hop: float = 0.05, jitter: float = 0.1, horizon: float = 2000.0, seed: int = 0
        ) -> dict:
    """One closed loop; throughput in requests per ``t`` (1.0: every stage always busy)."""
    rnd = random.Random(seed)
    events: list = []
    n = [0]

    def at(when: float, kind: str, data) -> None:
        n[0] += 1
        heapq.heappush(events, (when, n[0], kind, data))

    queues: list[list[int]] = [[] for _ in range(stages)]
    busy = [False] * stages
    busy_time = [0.0] * stages
    waiting = [0]            # requests waiting for a slot
    used = [0]               # slots taken
    sent = [0]               # requests in batches in flight
    done = [0]
    sizes: list[int] = []

    def send(rows: int, now: float) -> None:
        sizes.append(rows)
        sent[0] += rows
        at(now + hop, "arrive", (0, rows))

    def submit(now: float) -> None:
        if used[0] < slots and not waiting[0]:
            used[0] += 1
            send(1, now)
        else:
            waiting[0] += 1

    def start(k: int, now: float) -> None:
        if busy[k] or not queues[k]:
            return
        rows = queues[k].pop(0)
        busy[k] = True
        took = rows * t * (1 + rnd.uniform(-jitter, jitter))
        busy_time[k] += took
        at(now + took, "finish", (k, rows))

    for _ in range(clients):
        submit(0.0)
    now = 0.0
    while events:
        now, _, kind, data = heapq.heappop(events)
        if now > horizon:
            break
        if kind == "arrive":
            k, rows = data
            queues[k].append(rows)
            start(k, now)
        elif kind == "finish":
            k, rows = data
            busy[k] = False
            start(k, now)
            at(now + hop, "arrive" if k + 1 < stages else "result",
               (k + 1, rows) if k + 1 < stages else rows)
        elif kind == "result":
            done[0] += data
            used[0] -= 1
            sent[0] -= data
            while waiting[0] and used[0] < slots:
                share = -(-(waiting[0] + sent[0]) // slots) if even else max_batch
                take = min(waiting[0], max_batch, share)
                waiting[0] -= take
                used[0] += 1
                send(take, now)
            for _ in range(data):
                at(now + hop, "client", None)
        else:
            submit(now)
    return {"throughput": round(done[0] * t / now, 3),
            "busiest_stage_busy": round(max(busy_time) / now, 3),
            "mean_batch": round(sum(sizes) / len(sizes), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="4,8")
    ap.add_argument("--per-stage", default="2,3,4,6,8", help="clients per stage")
    ap.add_argument("--max-batch", type=int, default=8)
    args = ap.parse_args()
    rows = []
    for s in (int(x) for x in args.stages.split(",")):
        for per in (int(x) for x in args.per_stage.split(",")):
            case = {"stages": s, "in_flight": per * s, "slots": 2 * s}
            for name, mb, even in (("alone", 1, False), ("all", args.max_batch, False),
                                   ("even", args.max_batch, True)):
                case[name] = run(s, per * s, 2 * s, mb, even)
            rows.append(case)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
