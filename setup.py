"""convret: session-masked attention and fused contrastive losses for conversational dense retrievers.

Install (CPU machine): ``pip install torch==2.13.0 && pip install --no-build-isolation -e ".[test]"``.
A GPU user keeps the CUDA build of torch they already have: convret never pins torch itself.

The native CPU backend (csrc/, built by the top-level CMakeLists.txt) is compiled here against the installed
torch, hence ``--no-build-isolation``. If it cannot be built (no compiler or cmake, no torch at build time,
``CONVRET_SKIP_NATIVE=1``), the package still installs and ``backend="cpu"`` uses its PyTorch fallback;
``convret.backend_info()`` says which path is active.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

# the oldest versions CI tests (.ci/oldest.txt pins exactly these)
TRANSFORMERS = "transformers>=5.13"
PEFT = "peft>=0.18"
ACCELERATE = "accelerate>=1.3"
SENTENCE_TRANSFORMERS = "sentence-transformers>=6.1"
DATASETS = "datasets>=3.0"
FAISS = "faiss-cpu>=1.9"
PYTREC_EVAL = "pytrec-eval-terrier>=0.5.6"
BM25S = "bm25s>=0.3.14"
AIOHTTP = "aiohttp>=3.9"
DEEPSPEED = "deepspeed>=0.19.8"
SERVE = ["fastapi>=0.110", "uvicorn[standard]>=0.29", "prometheus-client>=0.20", "httpx>=0.27"]


class CMakeExtension(Extension):
    """A library produced by CMakeLists.txt rather than by setuptools' own compiler calls."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Runs cmake with torch's CMake prefix; a failed build warns instead of failing the install."""

    def build_extension(self, ext: Extension) -> None:
        if os.environ.get("CONVRET_SKIP_NATIVE", "0") == "1":
            self._warn("CONVRET_SKIP_NATIVE=1")
            return
        try:
            self._cmake_build(ext)
        except Exception as error:  # no cmake / compiler / torch: the PyTorch fallback serves backend="cpu"
            self._warn(str(error))

    def _cmake_build(self, ext: Extension) -> None:
        import torch.utils  # the installed torch: pip must not build in an isolated environment

        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        stem, suffix = target.name.split(".", 1)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={target.parent}",
            f"-DCONVRET_OUTPUT_NAME={stem}",
            f"-DCONVRET_OUTPUT_SUFFIX=.{suffix}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if "CONVRET_CPU_ARCH" in os.environ:
            configure.append(f"-DCONVRET_CPU_ARCH={os.environ['CONVRET_CPU_ARCH']}")
        for command in (configure, ["cmake", "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)]):
            result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if result.returncode != 0:
                tail = "\n".join(result.stdout.splitlines()[-30:])
                raise RuntimeError(f"`{' '.join(command[:2])} ...` failed:\n{tail}")

    def copy_extensions_to_source(self) -> None:
        # in-place / editable builds copy each library from the build tree next to the sources: copy only what
        # was built (the build-tree path is what get_ext_fullpath gives with inplace off)
        inplace, self.inplace = self.inplace, 0
        built = [ext for ext in self.extensions if Path(self.get_ext_fullpath(ext.name)).exists()]
        self.inplace = inplace
        self.extensions = built
        super().copy_extensions_to_source()

    def get_outputs(self) -> list[str]:
        return [path for path in super().get_outputs() if Path(path).exists()]

    def _warn(self, why: str) -> None:
        message = (
            "convret: the native CPU backend was NOT built; backend='cpu' will use the PyTorch fallback "
            f"(see convret.backend_info()). Reason: {why}"
        )
        print(f"WARNING: {message}", file=sys.stderr)


setup(
    name="convret",
    version="0.1.0",
    description="Kernels and pipeline for LLM-based conversational dense retrievers (CSIT / UniConv)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # src layout: nothing importable sits at the repository root, so `python -m ...` run from a checkout never
    # shadows an installed package (the PyPI `kernels`, which transformers imports, was shadowed by a root
    # kernels/ once) and never mixes this checkout's modules with an installed one's.
    packages=find_packages(where="src", include=["convret", "convret.*"]),
    package_dir={"": "src"},
    # the bundled sample world, its tokenizer and the tiny model configs (convret.data.sample_world)
    package_data={"convret": ["resources/sample_world/*", "resources/tokenizer/*", "resources/models/*.json",
                              "resources/configs/*.yaml"]},
    ext_modules=[CMakeExtension("convret._convret_cpu")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=["torch>=2.5", "triton>=3.2", "numpy"],
    # Floors are the versions CI tests (.ci/oldest.txt, the second virtualenv of .ci/run); raise both together.
    extras_require={
        "hf": [TRANSFORMERS, PEFT, "safetensors", "tokenizers"],
        "data": [DATASETS],
        "train": [TRANSFORMERS, PEFT, "safetensors", "tokenizers", ACCELERATE, "pyyaml", "tqdm"],
        # the DeepSpeed ZeRO engines of `convret train` (docs/train.md, "Engines"): a pure-Python install, no
        # compiler needed (DeepSpeed compiles its ops at first use)
        "deepspeed": [DEEPSPEED],
        "retrieval": [FAISS, PYTREC_EVAL, SENTENCE_TRANSFORMERS, "rouge-score", BM25S],
        "bench": ["matplotlib", "tqdm", AIOHTTP],
        "serve": SERVE,
        "test": ["pytest", "hypothesis", "pytest-benchmark", TRANSFORMERS, PEFT, "safetensors", "tokenizers",
                 ACCELERATE, "pyyaml", "tqdm", DATASETS, FAISS, PYTREC_EVAL, SENTENCE_TRANSFORMERS, "rouge-score",
                 "matplotlib", BM25S, AIOHTTP, "schemathesis>=4.0", DEEPSPEED] + SERVE,
    },
    entry_points={"console_scripts": ["convret=convret.cli:main"]},
)
