"""The planner as a pure function: DP against brute force, errors, and sanity cases."""

from __future__ import annotations

import numpy as np
import pytest

from edge.errors import NoFitError, PlanError
from edge.planning.plan import MODES, Device
from edge.planning.planner import CostArrays, brute_force, evaluate, partition, stage_mode

MiB = float(1 << 20)


def _dev(name: str, memory_mb: float = 1e6, gflops: float = 1.0, bw: float = 1000.0,
         floor: float = 62.0) -> Device:
    return Device(name=name, address=f"{name}:50051", profile="test", memory_mb=memory_mb,
                  gflops=gflops, bandwidth_mbps=bw, runtime_floor_mb=floor)


def _random_case(rng: np.random.Generator):
    n = int(rng.integers(1, 9))
    d = int(rng.integers(1, min(4, n) + 1))
    m = int(rng.integers(0, 6))
    uses, tables = [], []
    for _ in range(m):
        u = np.sort(rng.choice(n, size=int(rng.integers(1, min(3, n) + 1)), replace=False))
        uses.append(u)
        tables.append(u[rng.random(len(u)) < 0.4])
    sizes = rng.uniform(0, 100, m) * MiB
    costs = CostArrays(flops=rng.uniform(0, 1e9, n), live_bytes=rng.uniform(0, 8, n) * MiB,
                       cut_bytes=rng.uniform(0, 5e6, n + 1), init_bytes=sizes,
                       init_uses=tuple(uses), init_table_uses=tuple(tables),
                       init_int8_bytes=sizes * rng.uniform(0.25, 1.0, m))
    devices = [_dev(f"d{k}", memory_mb=float(rng.uniform(80, 330)),
                    gflops=float(rng.uniform(1, 10)), bw=float(rng.uniform(10, 1000)))
               for k in range(d)]
    return costs, devices


def _solve(fn, costs, devices):
    try:
        return fn(costs, devices)
    except NoFitError as e:
        return e


def test_dp_matches_brute_force():
    """With modes, Gather tables and int8 sizes: DP and brute force agree, and each stage
    gets the first mode that fits."""
    rng = np.random.default_rng(4321)
    fits = nofits = 0
    seen = set()
    for _ in range(400):
        costs, devices = _random_case(rng)
        dp, bf = _solve(partition, costs, devices), _solve(brute_force, costs, devices)
        assert type(dp) is type(bf), (dp, bf)
        if isinstance(bf, NoFitError):
            nofits += 1
            assert dp.min_memory_mb == pytest.approx(bf.min_memory_mb, rel=1e-9)
            continue
        fits += 1
        assert abs(dp.bottleneck_ms - bf.bottleneck_ms) <= 1e-9 * max(1.0, bf.bottleneck_ms)
        assert dp.latency_ms == pytest.approx(bf.latency_ms, rel=1e-9)
        for dev, (i, j), mode, p in zip(devices, dp.ranges, dp.modes, dp.predictions):
            # the rule: the first mode that fits, and its time
            assert mode == stage_mode(costs, dev, i, j)
            assert all(evaluate(costs, dev, i, j, m).memory_mb > dev.memory_mb
                       for m in MODES[:MODES.index(mode)])
            assert p.memory_mb <= dev.memory_mb
            assert p == evaluate(costs, dev, i, j, mode)
            seen.add(mode)
    assert fits > 50 and nofits > 30
    # fp32 and int8 both chosen somewhere (fp32-lean wins only in a narrow window of the
    # fitted constants: large weights read whole, no tables)
    assert {"fp32", "int8"} <= seen


def test_no_fit_message_names_every_device():
    costs = CostArrays(flops=np.ones(4), live_bytes=np.full(4, 1 * MiB),
                       cut_bytes=np.zeros(5), init_bytes=np.full(4, 100 * MiB),
                       init_uses=tuple(np.array([k]) for k in range(4)))
    # 100 MiB: one weight (100 MiB) does not fit even in int8
    devices = [_dev("pi-1", memory_mb=100), _dev("pi-2", memory_mb=300),
               _dev("pi-3", memory_mb=100)]
    with pytest.raises(NoFitError) as ei:
        partition(costs, devices)
    e = ei.value
    msg = str(e)
    for name in ("pi-1", "pi-2", "pi-3"):
        assert name in msg
        assert f"needs {e.needs[name]:.0f} MiB, has {e.has[name]:.0f} MiB" in msg
    assert e.has == {"pi-1": 100, "pi-2": 300, "pi-3": 100}
    assert "every device would need at least" in msg
    assert f"{e.min_memory_mb:.0f} MiB" in msg
    # min memory: the best split puts 2 weights on one device, in its most frugal mode
    # (no int8 sizes given: int8 weighs what fp32 does)
    from edge.planning.memory import stage_memory_mb
    from edge.planning.plan import MODES
    assert e.min_memory_mb == pytest.approx(
        min(stage_memory_mb(200 * MiB, 1 * MiB, 62.0, mode=m) for m in MODES))
    # and it really is enough
    partition(costs, [_dev(f"x{k}", memory_mb=e.min_memory_mb) for k in range(3)])


def test_more_devices_than_nodes():
    with pytest.raises(PlanError, match="3 devices but the model has only 2 nodes"):
        partition(CostArrays(np.ones(2), np.ones(2), np.ones(3)), [_dev(f"d{k}") for k in range(3)])


def test_bandwidth_moves_the_cut():
    # Six equal nodes; the cut after node 3 carries a huge tensor, every other cut is tiny.
    n = 6
    cut = np.full(n + 1, 1e3)
    cut[3] = 50e6
    costs = CostArrays(flops=np.full(n, 1e9), live_bytes=np.ones(n), cut_bytes=cut)
    fast = [_dev("a", gflops=1.0, bw=1e6), _dev("b", gflops=1.0, bw=1e6)]
    slow = [_dev("a", gflops=1.0, bw=10.0), _dev("b", gflops=1.0, bw=10.0)]
    assert partition(costs, fast).ranges == ((0, 3), (3, 6))  # balanced compute
    r = partition(costs, slow).ranges
    assert r[0][1] != 3  # sending 50 MB over 10 Mbit/s (40 s) is worse than imbalance


def test_slow_device_gets_less_work():
    n = 40
    costs = CostArrays(flops=np.full(n, 1e9), live_bytes=np.ones(n), cut_bytes=np.zeros(n + 1))
    split = partition(costs, [_dev("slow", gflops=1.0), _dev("fast", gflops=3.0)])
    (a, b), (c, d) = split.ranges
    assert b - a == 10 and d - c == 30
    assert split.bottleneck_ms == pytest.approx(10_000.0)


def test_memory_limits_a_stage():
    # Equal speed would split 3/3, but the first device only holds one weight.
    costs = CostArrays(flops=np.ones(6), live_bytes=np.ones(6), cut_bytes=np.zeros(7),
                       init_bytes=np.full(6, 10 * MiB),
                       init_uses=tuple(np.array([k]) for k in range(6)))
    from edge.planning.memory import stage_memory_mb
    small = stage_memory_mb(10 * MiB, 1, 62.0) + 0.1
    split = partition(costs, [_dev("small", memory_mb=small), _dev("big")], modes=("fp32",))
    assert split.ranges == ((0, 1), (1, 6))
    assert split.modes == ("fp32", "fp32")


def _one_big_matmul():
    """Two nodes, the second a MatMul of a 96 MiB weight, on a 1 GiB device."""
    from edge.planning.memory import MiB

    w = 96 * MiB
    arrays = dict(flops=np.ones(2), live_bytes=np.array([MiB, MiB]),
                  cut_bytes=np.array([MiB, MiB, MiB]), init_bytes=np.array([w]),
                  init_uses=(np.array([1]),))
    dev = Device(name="d", address="d:1", profile="t", memory_mb=1024, gflops=1.0,
                 bandwidth_mbps=1000.0, runtime_floor_mb=72.0)
    return w, arrays, dev


def test_a_big_prepacked_weight_bounds_the_load():
    """One MatMul of a 96 MiB weight: at load its mapped pages and its packed copy are both
    resident, so the stage needs that much more than its weights while it loads."""
    from edge.spec import MODE_TABLE

    w, arrays, dev = _one_big_matmul()
    plain = evaluate(CostArrays(**arrays), dev, 0, 2, mode="fp32")
    packed = evaluate(CostArrays(**arrays, prepack_bytes=np.array([0.0, w])), dev, 0, 2,
                      mode="fp32")
    c = MODE_TABLE["fp32"].memory
    load = 72.0 + c.session_overhead_mb + c.weight_factor * 96 + 96
    assert packed.memory_mb == pytest.approx(max(plain.memory_mb, load))
    assert packed.memory_mb > plain.memory_mb + 80


def test_a_mode_that_does_not_prepack_has_no_load_peak():
    """fp32-lean turns prepacking off (``Mode.prepack``): the big weight stays in its mapped
    file, held once, so the load peak term is not added."""
    from edge.spec import MODE_TABLE

    assert not MODE_TABLE["fp32-lean"].prepack and MODE_TABLE["fp32"].prepack
    w, arrays, dev = _one_big_matmul()
    plain = evaluate(CostArrays(**arrays), dev, 0, 2, mode="fp32-lean")
    packed = evaluate(CostArrays(**arrays, prepack_bytes=np.array([0.0, w])), dev, 0, 2,
                      mode="fp32-lean")
    assert packed.memory_mb == pytest.approx(plain.memory_mb)
