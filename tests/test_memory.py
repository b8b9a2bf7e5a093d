"""convret.tune_cpu_malloc: glibc's mmap threshold is fixed, so freed activations leave the heap."""
import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

import convret
from convret.memory import ENV_VARIABLE, MAX_MMAP_THRESHOLD, _glibc_mallopt

glibc_only = pytest.mark.skipif(_glibc_mallopt() is None or not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"),
                                reason="needs glibc >= 2.33 (mallopt, mallinfo2)")

# Free an 18 MiB block (mmapped at first), then allocate 8 MiB and report whether glibc mapped it. With glibc's
# defaults the free raised the dynamic threshold to 18 MiB, so the 8 MiB block comes from the heap.
PROBE = textwrap.dedent("""
    import ctypes, json, sys
    import torch
    import convret

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    applied = None if sys.argv[1] == "default" else convret.tune_cpu_malloc(2**20, override_env=sys.argv[1] == "override")
    first = torch.rand(18 * 2**18)  # 18 MiB of fp32, random: never test on zeros
    del first
    mapped_before = libc.mallinfo2().hblkhd
    second = torch.rand(8 * 2**18)
    mapped_growth = libc.mallinfo2().hblkhd - mapped_before
    print(json.dumps({"applied": applied, "mapped_growth": mapped_growth, "sum": float(second.sum())}))
""")


def run_probe(mode: str, **env_extra: str) -> dict:
    import json

    env = {k: v for k, v in os.environ.items() if k != ENV_VARIABLE}
    env.update(env_extra)
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@glibc_only
def test_default_glibc_keeps_mid_size_blocks_in_the_heap():
    """The premise: without the setting, an 8 MiB tensor allocated after an 18 MiB one was freed is not mapped."""
    out = run_probe("default")
    assert out["mapped_growth"] < 8 * 2**20


@glibc_only
def test_tuned_malloc_maps_blocks_above_the_threshold():
    out = run_probe("tuned")
    assert out["applied"] is True
    assert out["mapped_growth"] >= 8 * 2**20


@glibc_only
def test_environment_variable_wins_unless_overridden():
    env = {ENV_VARIABLE: str(16 * 2**20)}  # a fixed 16 MiB threshold: the 8 MiB block comes from the heap
    kept = run_probe("tuned", **env)
    assert kept["applied"] is False and kept["mapped_growth"] < 8 * 2**20
    overridden = run_probe("override", **env)
    assert overridden["applied"] is True and overridden["mapped_growth"] >= 8 * 2**20


@pytest.mark.parametrize("bad", [0, -1, MAX_MMAP_THRESHOLD + 1])
def test_rejects_thresholds_glibc_would_refuse(bad):
    with pytest.raises(ValueError, match="mmap_threshold"):
        convret.tune_cpu_malloc(bad)


@pytest.mark.parametrize("bad", [1.5, "1M", True])
def test_rejects_non_integer_thresholds(bad):
    with pytest.raises(TypeError, match="mmap_threshold"):
        convret.tune_cpu_malloc(bad)


# ------------------------------------------------------------------------------ caching allocator
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from convret.ops.session_attention.cpu import native_available  # noqa: E402
from convret.memory import (  # noqa: E402
    cpu_caching_allocator_stats, disable_cpu_caching_allocator, empty_cpu_cache, enable_cpu_caching_allocator,
)

native_only = pytest.mark.skipif(not native_available(), reason="the caching allocator is in the native extension")
MiB = 2**20


def size_class(nbytes: int) -> int:
    """The allocator's rounding, restated: 8 classes per power of two, at least one page."""
    step = max(4096, 1 << max(0, nbytes.bit_length() - 1 - 3))
    return -(-nbytes // step) * step


@pytest.fixture
def caching_allocator():
    """Installs the allocator for one test and puts torch's default back afterwards (blocks still held by
    tensors stay valid and are unmapped when freed)."""
    def enable(min_block_bytes=MiB, slack_bytes=0):
        enable_cpu_caching_allocator(min_block_bytes, slack_bytes)
        empty_cpu_cache()  # also restarts the peak
        return cpu_caching_allocator_stats()

    yield enable
    disable_cpu_caching_allocator()


def filled(nbytes: int, seed: int) -> torch.Tensor:
    """A fresh float32 tensor of nbytes, random and never zero."""
    t = torch.empty(nbytes // 4)
    t.uniform_(1.0, 2.0, generator=torch.Generator().manual_seed(seed))
    return t


@native_only
def test_a_repeating_step_reuses_its_blocks(caching_allocator):
    before = caching_allocator(slack_bytes=0)
    for step in range(5):
        held = [filled(3 * MiB, seed=step * 10 + i) for i in range(10)]
        assert all(bool((t >= 1.0).all()) for t in held)
        del held
    stats = cpu_caching_allocator_stats()
    assert stats.misses - before.misses == 10  # the first step maps, the other four reuse
    assert stats.hits - before.hits == 40
    assert stats.peak_mapped_bytes - before.peak_mapped_bytes == 10 * size_class(3 * MiB)  # no growth after step 1
    assert stats.live_bytes == before.live_bytes
    assert empty_cpu_cache() == stats.cached_bytes
    assert cpu_caching_allocator_stats().cached_bytes == 0


@native_only
def test_small_requests_bypass_the_cache(caching_allocator):
    before = caching_allocator(min_block_bytes=MiB)
    small = [filled(64 * 1024, seed=i) for i in range(20)]
    stats = cpu_caching_allocator_stats()
    assert (stats.hits, stats.misses, stats.live_bytes) == (before.hits, before.misses, before.live_bytes)
    assert all(bool((t >= 1.0).all()) for t in small)


@native_only
def test_disable_gives_blocks_back_as_their_tensors_die(caching_allocator):
    caching_allocator()
    kept = filled(5 * MiB, seed=1)
    checksum = float(kept.double().sum())
    disable_cpu_caching_allocator()
    stats = cpu_caching_allocator_stats()
    assert not stats.active and stats.cached_bytes == 0 and stats.live_bytes >= size_class(5 * MiB)
    after = filled(5 * MiB, seed=2)  # served by torch's default allocator now
    assert cpu_caching_allocator_stats().misses == stats.misses
    assert float(kept.double().sum()) == checksum  # the block outlived the switch intact
    live = stats.live_bytes
    del kept, after
    assert cpu_caching_allocator_stats().live_bytes == live - size_class(5 * MiB)
    assert cpu_caching_allocator_stats().cached_bytes == 0


@native_only
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(st.tuples(st.booleans(), st.sampled_from([512 * 1024, MiB, MiB + 4, 3 * MiB - 8, 3 * MiB, 5 * MiB,
                                                            9 * MiB, 17 * MiB]), st.integers(0, 7)),
                 min_size=5, max_size=40),
    slack_mib=st.sampled_from([0, 4, 64]),
)
def test_random_alloc_free_sequences_keep_every_tensor_intact(caching_allocator, ops, slack_mib):
    """Model check: live tensors never alias each other or a freed block (each keeps its own random fill),
    live bytes are accounted by size class, and mapped memory stays within the slack of the live peak."""
    base = caching_allocator(slack_bytes=slack_mib * MiB)
    slots: dict[int, tuple[torch.Tensor, float, int]] = {}
    live_peak = mapped_base = base.live_bytes + base.cached_bytes
    for step, (allocate, nbytes, slot) in enumerate(ops):
        slots.pop(slot, None)  # freed before the new tensor exists: live_peak below sees every live block
        if allocate:
            fresh = filled(nbytes, seed=step)
            slots[slot] = (fresh, float(fresh.double().sum()), nbytes)
            del fresh
        for held, checksum, _ in slots.values():
            assert float(held.double().sum()) == checksum
        held = None  # no loop variable may keep a freed slot's tensor alive
        stats = cpu_caching_allocator_stats()
        big = [n for _, _, n in slots.values() if n >= MiB]
        own_live = stats.live_bytes - base.live_bytes
        # best fit lends at most one class up: a block is no more than 1/8 larger than its request's class
        assert sum(map(size_class, big)) <= own_live <= sum(size_class(n) * 9 // 8 for n in big)
        live_peak = max(live_peak, base.live_bytes + own_live)
    stats = cpu_caching_allocator_stats()
    checksum_temporary = size_class(2 * 17 * MiB)  # the float64 copy a checksum makes of the largest tensor
    assert stats.peak_mapped_bytes <= max(mapped_base, live_peak + slack_mib * MiB) + checksum_temporary


@native_only
def test_training_step_is_bitwise_identical_with_the_cache(caching_allocator):
    """A small model's loss and gradients do not depend on where their buffers came from."""
    def step():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
        x = torch.randn(512, 256)
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss.detach().clone(), [p.grad.clone() for p in model.parameters()]

    want_loss, want_grads = step()
    before = caching_allocator(min_block_bytes=4096)
    for _ in range(2):  # the second run reuses the first one's blocks
        loss, grads = step()
        assert torch.equal(loss, want_loss)
        assert all(torch.equal(g, w) for g, w in zip(grads, want_grads))
    assert cpu_caching_allocator_stats().hits > before.hits


FORK_PROBE = textwrap.dedent("""
    import os, sys
    import torch
    import convret
    from convret.memory import cpu_caching_allocator_stats
    convret.enable_cpu_caching_allocator(2**20, 0)
    kept = torch.rand(2**20) + 1.0
    pid = os.fork()
    if pid == 0:  # the child allocates and frees through its copy of the allocator
        torch.set_num_threads(1)  # as DataLoader workers do: torch's OpenMP pool does not survive a fork
        for i in range(5):
            t = torch.rand(3 * 2**18) + 1.0
            assert bool((t >= 1.0).all())
        os._exit(0 if cpu_caching_allocator_stats().hits >= 4 else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    print("ok", float(kept.sum()) > 0)
""")


@native_only
def test_fork_with_the_allocator_active():
    result = subprocess.run([sys.executable, "-c", FORK_PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok True")


@native_only
def test_bad_allocator_arguments_raise():
    with pytest.raises(ValueError, match="min_block_bytes"):
        enable_cpu_caching_allocator(0)
    with pytest.raises(ValueError, match="slack_bytes"):
        enable_cpu_caching_allocator(MiB, -1)
    with pytest.raises(TypeError, match="slack_bytes"):
        enable_cpu_caching_allocator(MiB, 1.5)


# ------------------------------------------------------------------------------ against the OS, and threads
# Each round frees a block of 2S and then asks for S: lending the cached 2S block (what the allocator did
# before) keeps 2S mapped per S held, so after n rounds the RSS is ~2nS while the live bytes never exceeded
# (n + 1)S. The bound to hold: RSS growth <= 1.27 * peak live bytes + slack (0 here) + noise.
RSS_PROBE = textwrap.dedent("""
    import json, torch, convret
    from convret.memory import cpu_caching_allocator_stats

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    torch.set_num_threads(1)
    convret.enable_cpu_caching_allocator(2**20, 0)
    S, rounds = 4 * 2**20, 24
    base = rss()
    held, live, peak_live = [], 0, 0
    for i in range(rounds):
        big = torch.empty(2 * S // 4).fill_(i + 1.0)  # every page touched
        peak_live = max(peak_live, live + 2 * S)
        del big
        small = torch.empty(S // 4).fill_(i + 2.0)
        held.append(small)
        live += S
        peak_live = max(peak_live, live)
    growth = rss() - base
    assert all(bool((t == i + 2.0).all()) for i, t in enumerate(held))
    stats = cpu_caching_allocator_stats()
    print(json.dumps({"growth": growth, "peak_live": peak_live, "mapped_peak": stats.peak_mapped_bytes,
                      "live": stats.live_bytes}))
""")


@native_only
def test_resident_memory_stays_within_the_stated_bound_of_the_live_bytes():
    """Checked against the OS (the process's RSS), not the allocator's own counters."""
    import json

    result = subprocess.run([sys.executable, "-c", RSS_PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    noise = 16 * MiB  # torch's own small allocations, page tables, the interpreter
    assert out["growth"] <= 1.27 * out["peak_live"] + noise, out
    assert out["growth"] >= out["live"] - noise, out  # the probe is live: its blocks are resident
    assert out["mapped_peak"] <= 1.27 * out["peak_live"], out


CYCLES_PROBE = textwrap.dedent("""
    import torch, convret
    from convret.memory import cpu_caching_allocator_stats, disable_cpu_caching_allocator

    for cycle in range(300):  # c10's priority is a uint8: a counter wraps after 128 enable / disable cycles
        assert convret.enable_cpu_caching_allocator(2**20, 0)
        before = cpu_caching_allocator_stats()
        t = torch.empty(2**20).fill_(1.0)  # 4 MiB: served by the cache allocator
        after = cpu_caching_allocator_stats()
        assert after.hits + after.misses == before.hits + before.misses + 1, (cycle, before, after)
        del t
        disable_cpu_caching_allocator()
        t = torch.empty(2**20).fill_(2.0)  # torch's default allocator again
        assert cpu_caching_allocator_stats().hits + cpu_caching_allocator_stats().misses == \
            after.hits + after.misses, cycle
        del t
    print("ok")
""")


@native_only
def test_hundreds_of_enable_disable_cycles():
    result = subprocess.run([sys.executable, "-c", CYCLES_PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


@native_only
def test_threads_allocating_and_freeing_at_once(caching_allocator):
    """Four threads allocate, fill, check and free tensors of mixed sizes concurrently (torch releases the GIL
    inside its ops, so the allocator's lock is contended): no tensor is ever corrupted, every block comes
    back, and every request is counted once."""
    import random
    import threading

    before = caching_allocator(slack_bytes=8 * MiB)
    sizes = [MiB, 2 * MiB - 4, 3 * MiB, 5 * MiB]
    errors: list[str] = []
    requests = [0] * 4

    def worker(index: int) -> None:
        rng = random.Random(index)
        held: list[tuple[torch.Tensor, float]] = []
        try:
            for step in range(150):
                if held and (len(held) > 6 or rng.random() < 0.4):
                    t, value = held.pop(rng.randrange(len(held)))
                    if not (t.min().item() == value == t.max().item()):  # no large temporaries
                        errors.append(f"thread {index}: a block changed under its tensor at step {step}")
                    del t
                else:
                    value = float(index * 1000 + step + 1)
                    held.append((torch.empty(rng.choice(sizes) // 4).fill_(value), value))
                    requests[index] += 1
            for t, value in held:
                if not (t.min().item() == value == t.max().item()):
                    errors.append(f"thread {index}: corrupted at the end")
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:5]
    stats = cpu_caching_allocator_stats()
    assert (stats.hits + stats.misses) - (before.hits + before.misses) == sum(requests)
    assert stats.live_bytes == before.live_bytes  # every block came back
    assert stats.hits - before.hits > sum(requests) // 2  # and was reused
