"""The one copy of the timing, memory and reporting helpers that every benchmark (and ``convret demo``) uses.

- time: :func:`median_ms` (median after warm-up) and :func:`interleaved_ms` (several methods side by side in
  one process, alternating, so that a neighbour's load hits all of them alike); CUDA work is synchronised;
- ceiling: :func:`gemm_ceiling` (best of several warmed-up square matmuls of the same device and dtype,
  measured in the same run);
- memory: :func:`reset_peak_rss` / :func:`peak_rss_bytes` (``VmHWM`` of ``/proc/self/status``, reset through
  ``/proc/self/clear_refs``), CUDA peaks, and :func:`run_isolated` (one measurement in a fresh process, so
  that its peak is its own; a child that runs out of memory, or is killed for it, comes back as ``"oom"``);
- report: :func:`environment` (device, versions, CPU flags), :func:`markdown_table`, :func:`write_json`
  (atomic), :func:`plot_lines` (matplotlib, Agg), :func:`progress` (tqdm on stderr).

This module imports nothing from convret beyond the package itself, so that ``convret.demo`` may use it.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

#: result status of one measurement
OK, OOM, SKIPPED, ERROR = "ok", "oom", "skipped", "error"


# ------------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued CUDA work (a no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], reps: int = 5, warmup: int = 2,
              device: torch.device | str | None = None) -> float:
    """Median wall time in ms of ``reps`` calls of ``fn`` after ``warmup`` untimed calls."""
    return statistics.median(timed_ms(fn, reps, warmup, device))


def timed_ms(fn: Callable[[], object], reps: int = 5, warmup: int = 2,
             device: torch.device | str | None = None) -> list[float]:
    """Every timed run (ms) of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_ms(fns: Mapping[str, Callable[[], object]], reps: int = 5, warmup: int = 1,
                   device: torch.device | str | None = None) -> dict[str, list[float]]:
    """Time several methods side by side: ``warmup`` rounds, then ``reps`` rounds each calling every method
    once in turn. Returns every timed run per method (take the median)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(warmup + reps):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_index >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def gemm_ceiling(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", size: int = 2048,
                 reps: int = 6) -> dict[str, Any]:
    """Best rate of ``reps`` warmed-up ``size``^3 matmuls, in GFLOP/s (fp32 on CUDA as torch runs it, so TF32
    only when ``torch.backends.cuda.matmul.allow_tf32`` is on).

    The best run, not the median: on a shared machine the fastest run is the closest to what the hardware
    can do, which makes every share reported against it conservative."""
    device = torch.device(device)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):
        torch.matmul(a, b)
    synchronize(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return {"dtype": str(dtype).replace("torch.", ""), "device": str(device), "size": size,
            "gflops": 2 * size**3 / best / 1e9}


# ------------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size (``VmHWM``) of this process since it started or since :func:`reset_peak_rss`."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Set ``VmHWM`` back to the current RSS (Linux >= 4.0), so earlier set-up spikes do not count.
    Returns False where the kernel does not allow it (the peak then includes the set-up)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of the code inside ``with PeakMemory(device) as peak:``, above what was allocated when it
    began: ``VmHWM`` on CPU (meaningful in a fresh process only), ``max_memory_allocated`` on CUDA.

    After the block: ``peak.above_start_bytes``, ``peak.peak_bytes`` (whole process / all allocations)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.start_bytes = self.peak_bytes = self.above_start_bytes = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            reset_peak_rss()
            self.start_bytes = rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_bytes = peak_rss_bytes()
        self.above_start_bytes = self.peak_bytes - self.start_bytes


def is_oom(error: BaseException) -> bool:
    """True for torch's CUDA / CPU out-of-memory errors and Python's MemoryError."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                                or "failed to allocate" in text)


def available_memory_bytes() -> int:
    """``MemAvailable`` of /proc/meminfo (what a new process can use without swapping)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_guard_bytes(max_memory_gib: float | None, device: torch.device | str = "cpu") -> int:
    """The byte budget a single measurement may plan to use: ``max_memory_gib`` when given, else 80 % of the
    available host memory (CPU) or of the free device memory (CUDA)."""
    if max_memory_gib is not None:
        return int(max_memory_gib * 2**30)
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    return int(0.8 * available_memory_bytes())


def oom_result(needed_bytes: float, guard_bytes: int) -> dict[str, Any]:
    """The record of a measurement not run because its estimated need exceeds the memory guard."""
    return {"status": OOM, "reason": f"needs ~{needed_bytes / 2**30:.2f} GiB, over the memory guard of "
                                     f"{guard_bytes / 2**30:.2f} GiB", "estimated_bytes": int(needed_bytes)}


def run_isolated(target: str, kwargs: Mapping[str, Any], timeout_s: float | None = None,
                 env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``module:function(**kwargs)`` in a fresh Python process and return its dict, with ``status``.

    The function returns a JSON-serialisable dict. An out-of-memory error inside it, or the child being
    killed by the kernel's OOM killer (SIGKILL), gives ``{"status": "oom"}``; any other failure
    ``{"status": "error", "error": <tail of stderr>}``."""
    command = [sys.executable, "-m", "convret.bench.harness", "--child", target, json.dumps(dict(kwargs))]
    child_env = dict(os.environ if env is None else env)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=child_env)
    except subprocess.TimeoutExpired:
        return {"status": ERROR, "error": f"timed out after {timeout_s} s"}
    lines = [line for line in result.stdout.strip().splitlines() if line.startswith("{")]
    if result.returncode == 0 and lines:
        return json.loads(lines[-1])
    if result.returncode in (-9, 137):
        return {"status": OOM, "reason": "killed (SIGKILL: the kernel's OOM killer)"}
    if lines:
        return json.loads(lines[-1])
    return {"status": ERROR, "error": result.stderr[-2000:], "returncode": result.returncode}


def _child_main(target: str, kwargs_json: str) -> int:
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    try:
        out = dict(function(**json.loads(kwargs_json)))
        out.setdefault("status", OK)
    except BaseException as error:  # noqa: BLE001 - reported to the parent, never swallowed silently
        if not is_oom(error):
            raise
        out = {"status": OOM, "reason": f"{type(error).__name__}: {str(error)[:300]}"}
    print(json.dumps(out), flush=True)
    return 0


# ------------------------------------------------------------------------------------------- environment
def cpu_flags() -> list[str]:
    """The SIMD / matrix flags of this CPU that matter for the kernels (read from /proc/cpuinfo)."""
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16",
              "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile", "amx_int8")
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in wanted if flag in present]
    except OSError:
        pass
    return []


def cpu_has_bf16_units() -> bool:
    """True on a CPU with bf16 dot-product units (AVX512-BF16 or AMX-BF16), where bf16 runs at least at the
    fp32 rate instead of through conversions."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001 - absent or broken: report it as absent
        return None


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Device, versions, CPU model and flags, threads and load: recorded in every results file."""
    device = torch.device(device)
    import convret

    info: dict[str, Any] = {
        "device": str(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in
                     ("torch", "triton", "transformers", "peft", "numpy", "flash_attn", "liger_kernel",
                      "cut_cross_entropy", "inf_cl")},
        "convret": convret.__version__,
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "cuda": torch.cuda.is_available(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }
    try:
        info["cpu_backend"] = convret.backend_info()
    except Exception as error:  # noqa: BLE001
        info["cpu_backend"] = {"error": str(error)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "capability": f"sm_{props.major}{props.minor}",
                       "memory_gib": props.total_memory / 2**30, "sms": props.multi_processor_count,
                       "cuda": torch.version.cuda}
    return info


def environment_line(env: Mapping[str, Any]) -> str:
    """One markdown line describing the machine a table was measured on."""
    if env.get("gpu"):
        where = f"{env['gpu']['name']} ({env['gpu']['capability']}, CUDA {env['gpu']['cuda']})"
    else:
        where = f"{env['cpu']} ({', '.join(env['cpu_flags']) or 'no SIMD flags read'}), {env['torch_threads']} threads"
    load = ", ".join(f"{x:.1f}" for x in env["load_average"])
    return f"{where}; torch {env['versions']['torch']}; load average {load}"


# ---------------------------------------------------------------------------------------------- reporting
def progress(iterable: Iterable, desc: str, total: int | None = None, disable: bool = False):
    """A tqdm progress bar on stderr (plain iteration when tqdm is missing)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False, disable=disable,
                dynamic_ncols=True)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.0f} ms" if value >= 100 else f"{value:.1f} ms" if value >= 1 else f"{value:.3f} ms"


def fmt_mib(value_bytes: float | None) -> str:
    return "n/a" if value_bytes is None else f"{value_bytes / 2**20:.0f} MiB"


def cell(record: Mapping[str, Any] | None, key: str, fmt: Callable[[Any], str]) -> str:
    """A table cell for ``record[key]``, or the reason it has no value (OOM, skipped, error)."""
    if record is None:
        return "n/a"
    status = record.get("status", OK)
    if status == OOM:
        return "OOM"
    if status == SKIPPED:
        return "skipped"
    if status == ERROR:
        return "error"
    value = record.get(key)
    return "n/a" if value is None else fmt(value)


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write JSON atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as out:
        json.dump(payload, out, indent=1, default=str)
        out.write("\n")
    os.replace(tmp, path)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def plot_lines(path: str | os.PathLike, series: Mapping[str, Sequence[tuple[float, float | None]]], xlabel: str,
               ylabel: str, title: str, logx: bool = True, logy: bool = True) -> Path:
    """One line per peer (``name -> [(x, y or None)]``, None = OOM / not run, marked with an x on the axis
    floor). Written atomically as PNG with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    finite = [y for points in series.values() for _, y in points if y is not None and y > 0]
    floor = min(finite) / 2 if finite else 1.0
    for name, points in series.items():
        xs = [x for x, y in points if y is not None and y > 0]
        ys = [y for x, y in points if y is not None and y > 0]
        line, = ax.plot(xs, ys, marker="o", label=name)
        missing = [x for x, y in points if y is None]
        if missing:
            ax.plot(missing, [floor] * len(missing), marker="x", linestyle="none", color=line.get_color(),
                    markersize=9, label=f"{name}: OOM / not run")
    if logx:
        ax.set_xscale("log", base=2)
    if logy and finite:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def finish(out_dir: str | os.PathLike, name: str, payload: Mapping[str, Any], report: str) -> None:
    """Print the markdown report on stdout and write ``NAME.json`` and ``NAME.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    json_path = write_json(out_dir / f"{name}.json", payload)
    md_path = write_text(out_dir / f"{name}.md", report + "\n")
    print(report)
    print(f"\nwrote {json_path}, {md_path}" + "".join(f", {p}" for p in payload.get("plots", [])), flush=True)


def report_header(payload: Mapping[str, Any]) -> list[str]:
    """The first lines of a report: the command, the machine, the load average after the run."""
    after = ", ".join(f"{x:.2f}" for x in payload["load_average_after"])
    return [f"Command: `{payload['command']}`", "", environment_line(payload["environment"]),
            f"load average after the run: {after}", ""]


def command_line(prog: str, argv: Sequence[str]) -> str:
    """The exact command, as it goes beside a table."""
    return " ".join([prog, *argv]).strip()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        sys.exit(_child_main(sys.argv[2], sys.argv[3]))
    print("internal: python -m convret.bench.harness --child module:function '{json kwargs}'", file=sys.stderr)
    sys.exit(2)
