"""The installed package is the one that runs, wherever it runs from.

- Nothing importable sits at the repository root: ``python -m ...`` puts the working directory first on
  ``sys.path``, so a root folder named like a PyPI package (a ``kernels/`` once shadowed Hugging Face's
  ``kernels``, which transformers imports) breaks every command run from a checkout.
- One checkout's modules are never mixed with another's (``convret.kernels`` and ``convret.bench`` come from the
  same tree as ``convret``).
- The wheel works outside the checkout: built with ``pip wheel``, installed into a new virtualenv, run from an
  empty directory (train, encode, the Triton sources, the native CPU extension).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    return result


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env.update(extra)
    return env


def test_nothing_importable_at_the_repository_root():
    importable = sorted(entry.name for entry in ROOT.iterdir()
                        if (entry.is_dir() and (entry / "__init__.py").exists())
                        or (entry.is_file() and entry.suffix == ".py" and entry.name != "setup.py"))
    assert importable == [], f"importable names at the repository root shadow installed packages: {importable}"


def test_transformers_model_code_and_the_cli_import_from_the_repository_root():
    """What ``python -m convret`` / ``python -m pytest`` / ``torchrun -m`` see from a checkout: the working
    directory first on sys.path."""
    probe = ("import importlib.util, sys; assert sys.path[0] in ('', '.'), sys.path[:2]; "
             "import transformers.modeling_utils, transformers.models.qwen2.modeling_qwen2; "
             "spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else '')")
    out = _run([sys.executable, "-c", probe], cwd=ROOT, env=_clean_env()).stdout.strip()
    assert not out or not Path(out).resolve().is_relative_to(ROOT), f"`kernels` resolves inside the checkout: {out}"
    _run([sys.executable, "-m", "convret", "--help"], cwd=ROOT, env=_clean_env())
    # the attention override registers itself with transformers from the root too
    _run([sys.executable, "-c", "import convret.hf, transformers; "
          "assert 'convret' in transformers.AttentionInterface._global_mapping"], cwd=ROOT, env=_clean_env())


def test_one_checkout_is_never_mixed_with_another(tmp_path):
    """``PYTHONPATH=<another tree>/src`` takes every convret module from that tree, the subpackages included."""
    other = tmp_path / "other" / "src"
    shutil.copytree(ROOT / "src", other, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    probe = ("import json, convret, convret.kernels, convret.bench, convret.ops.session_attention; "
             "print(json.dumps([m.__file__ for m in (convret, convret.kernels, convret.bench, "
             "convret.ops.session_attention)]))")
    files = json.loads(_run([sys.executable, "-c", probe], cwd=tmp_path,
                            env=_clean_env(PYTHONPATH=str(other))).stdout)
    assert all(Path(f).resolve().is_relative_to(other.resolve()) for f in files), files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel .`` against the installed torch (no build isolation, as the README says)."""
    dist = tmp_path_factory.mktemp("dist")
    egg_info = ROOT / "src" / "convret.egg-info"  # setuptools' in-tree build metadata: remove it if this made it
    existed = egg_info.exists()
    try:
        _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(dist),
              str(ROOT)], cwd=ROOT, timeout=900)
    finally:
        if not existed:
            shutil.rmtree(egg_info, ignore_errors=True)
    (built,) = dist.glob("convret-*.whl")
    return built


def test_the_wheel_holds_the_triton_sources_the_native_extension_and_the_resources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("convret/kernels/session_attention.py", "convret/kernels/info_nce.py",
                     "convret/kernels/linear_cross_entropy.py", "convret/bench/cli.py",
                     "convret/resources/configs/tiny.yaml", "convret/resources/tokenizer/tokenizer.json",
                     "convret/resources/sample_world/collection.jsonl"):
        assert required in names, required
    assert any(n.startswith("convret/_convret_cpu") and n.endswith(".so") for n in names), \
        "the wheel lacks the native CPU extension"
    assert not any(n.split("/")[0] in ("kernels", "bench", "tests", "src") for n in names)


def test_the_wheel_trains_and_encodes_outside_the_checkout(wheel, tmp_path):
    """A new virtualenv that sees this environment's dependencies (a path entry to its site-packages, whose own
    .pth files, an editable convret's among them, are not processed) and installs convret from the wheel only;
    every command runs from an empty directory."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).stdout.strip())
    (site / "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], cwd=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = _clean_env()
    probe = ("import json, convret, convret.kernels.session_attention as k, convret.bench.cli; "
             "print(json.dumps({'files': [convret.__file__, k.__file__], "
             "'cpu': convret.backend_info()['implementation']}))")
    info = json.loads(_run([str(python), "-c", probe], cwd=empty, env=env).stdout)
    assert all(Path(f).resolve().is_relative_to(site.resolve()) for f in info["files"]), info
    assert info["cpu"] == "native", info
    script = venv / "bin" / "convret"
    _run([str(script), "train", "--output_dir", "run", "--max_steps", "5", "--save_steps", "5",
          "--logging_steps", "5"], cwd=empty, env=env)
    (empty / "passages.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "text": f"passage number {i}"}) + "\n"
                                                  for i in range(8)))
    _run([str(script), "encode", "--model", "run/final", "--collection", "passages.jsonl", "--output", "emb"],
         cwd=empty, env=env)
    assert (empty / "emb").is_dir() and any((empty / "emb").iterdir())
    assert not (ROOT / "run").exists() and not (ROOT / "emb").exists()


def test_the_claimed_floors_are_the_versions_ci_tests():
    """Every floor in the package's requirements equals the pin in .ci/oldest.txt (CI's oldest environment),
    and every pinned package has that floor: the two are raised together."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = {}
    for line in (ROOT / ".ci" / "oldest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    floors: dict[str, set[Version]] = {}
    for text in requires("convret") or []:
        requirement = Requirement(text)
        for spec in requirement.specifier:
            if spec.operator == ">=":
                floors.setdefault(canonicalize_name(requirement.name), set()).add(Version(spec.version))
    for name, pin in pins.items():
        assert floors.get(name) == {pin}, f"{name}: floors {floors.get(name)} in setup.py, {pin} in .ci/oldest.txt"


def _convret_import_graph() -> dict[str, set[str]]:
    """module -> the convret modules it imports anywhere in its source (top level, inside functions, under
    TYPE_CHECKING), relative imports resolved, ``from package import name`` taken as the submodule when one
    exists."""
    import ast

    package_root = ROOT / "src" / "convret"
    modules: dict[str, tuple[Path, bool]] = {}
    for path in package_root.rglob("*.py"):
        parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names if alias.name.split(".")[0] == "convret")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    module = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.split(".")[0] == "convret":
                    targets.update(f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                                   for alias in node.names)
        graph[name] = {t for t in map(owner, targets) if t and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_in_convret():
    """Data flows one way: no module imports (at any depth, lazily or not) a module that imports it back."""
    graph = _convret_import_graph()
    assert len(graph) > 50 and "convret.train.main" in graph["convret.cli"] | {"convret.train.main"}
    assert _cycles(graph) == []
    # the checker finds a circle where there is one
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
