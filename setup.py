"""convret: session-masked attention and fused contrastive losses for conversational dense retrievers.

Install (CPU machine): ``pip install torch==2.13.0 && pip install --no-build-isolation -e ".[test]"``.
A GPU user keeps the CUDA build of torch they already have: convret never pins torch itself.
"""
from setuptools import find_packages, setup

setup(
    name="convret",
    version="0.1.0",
    description="Kernels and pipeline for LLM-based conversational dense retrievers (CSIT / UniConv)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ sits at the top of the repository (design card) but is installed as convret.kernels:
    # a top-level package named `kernels` would shadow the PyPI package of that name, which transformers probes.
    packages=find_packages(include=["convret", "convret.*"]) + ["convret.kernels"],
    package_dir={"convret.kernels": "kernels"},
    install_requires=["torch>=2.4", "triton>=3.2", "numpy"],
    extras_require={"test": ["pytest", "hypothesis", "pytest-benchmark"]},
    entry_points={"console_scripts": ["convret=convret.cli:main"]},
)
