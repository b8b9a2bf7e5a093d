"""Ahead-of-time compile check of every Triton kernel for A100 (sm_80) and H100 (sm_90), without a GPU.

Each kernel module exposes ``aot_specs()``: dicts with ``name``, ``fn`` (a ``triton.jit`` function),
``signature`` ({arg: "*fp16" | "*i32" | "i32" | "fp32" | "constexpr" ...}), ``constexprs``, ``num_warps`` and
``num_stages``. The check mirrors what Triton's launcher specialises at run time on contiguous tensors:
innermost strides (``stride_*d``) equal to 1 become constants, and pointers and the other ``stride_*``
arguments are marked divisible by 16. ``cuobjdump --dump-resource-usage`` (shipped in the triton wheel) then
reads registers, shared memory and stack / local memory (spills) off the cubin.

Run ``python -m convret.aot`` for the report. Session attention is checked at a representative set of head
dims (``AOT_HEAD_DIMS``: every padded power of two, with and without masked columns); ``--all-head-dims``
compiles every multiple of 8 up to 256 (about 6x the builds).
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from ._args import parse

TARGETS = (80, 90)
KERNEL_MODULES = ("convret.kernels.session_attention", "convret.kernels.info_nce",
                  "convret.kernels.linear_cross_entropy")


@dataclass
class ResourceUsage:
    name: str
    capability: int
    registers: int
    shared_bytes: int
    stack_bytes: int
    local_bytes: int

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0


def kernel_specs(head_dims: tuple[int, ...] | None = None) -> list[dict]:
    """Every kernel module's specs; ``head_dims`` replaces session attention's default set of head dims."""
    specs = []
    for module_name in KERNEL_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue  # that kernel family is not part of this build
            raise
        if head_dims is not None and hasattr(module, "ALL_HEAD_DIMS"):
            specs.extend(module.aot_specs(tuple(head_dims)))
        else:
            specs.extend(module.aot_specs())
    return specs


def cuobjdump_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_spec(spec: dict, capability: int) -> ResourceUsage:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec["fn"]
    signature = dict(spec["signature"])
    constexprs = dict(spec["constexprs"])
    for arg in fn.arg_names:
        if re.fullmatch(r"stride_\w*d", arg) and signature.get(arg) == "i32":
            signature[arg] = "constexpr"
            constexprs[arg] = 1
    attrs = {
        (index,): [["tt.divisibility", 16]]
        for index, arg in enumerate(fn.arg_names)
        if signature[arg].startswith("*") or (arg.startswith("stride_") and signature[arg] == "i32")
    }
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs, attrs),
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([cuobjdump_path(), "--dump-resource-usage", cubin.name],
                              capture_output=True, text=True, check=True).stdout

    def field(key: str) -> int:
        match = re.search(rf"\b{key}:(\d+)", dump)
        return int(match.group(1)) if match else 0

    # the cubin's SHARED is static shared memory; Triton's is dynamic, reported in its metadata
    return ResourceUsage(spec["name"], capability, field("REG"), compiled.metadata.shared + field("SHARED"),
                         field("STACK"), field("LOCAL"))


def _compiler_process() -> None:
    # a compile worker must see real triton.jit functions, not the interpreter's (tests set TRITON_INTERPRET=1)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _compile_job(job: tuple[int, int, tuple[int, ...] | None]) -> ResourceUsage:
    index, capability, head_dims = job
    return compile_spec(kernel_specs(head_dims)[index], capability)


def check_all(max_workers: int = 2, head_dims: tuple[int, ...] | None = None):
    """Compile every spec for every target in worker processes; yields ResourceUsage in order."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    # counting needs no compiler: the specs list is the same whether or not this process runs the interpreter
    jobs = [(index, capability, head_dims) for index in range(len(kernel_specs(head_dims)))
            for capability in TARGETS]
    with ProcessPoolExecutor(max_workers, mp_context=context, initializer=_compiler_process) as pool:
        yield from pool.map(_compile_job, jobs)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m convret.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--all-head-dims", action="store_true",
                        help="compile session attention at every head dim (multiples of 8 up to 256), not a "
                             "representative subset")
    parser.add_argument("--workers", type=int, default=2, help="compiler processes (default 2)")
    args = parse(parser, argv)
    rows = []
    print("| kernel | target | registers | shared memory | stack | local | spills |")
    print("|---|---|---|---|---|---|---|")
    head_dims = None
    if args.all_head_dims:
        from convret.kernels.session_attention import ALL_HEAD_DIMS

        head_dims = ALL_HEAD_DIMS
    for usage in check_all(args.workers, head_dims):
        rows.append(usage)
        print(f"| {usage.name} | sm_{usage.capability} | {usage.registers} | {usage.shared_bytes} B | "
              f"{usage.stack_bytes} B | {usage.local_bytes} B | {'YES' if usage.spills else 'no'} |", flush=True)
    spilling = [usage for usage in rows if usage.spills]
    print(f"\n{len(rows)} kernel builds, {len(spilling)} with spills")
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
