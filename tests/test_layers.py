"""The layering is what the imports say: every module of the installed package, parsed (not imported),
against the documented order (docs/architecture.md, LAYERS below). A module imports its own layer or a
lower one; imports form no cycle (one inside a function counts); no module imports another's private
(`_name`); an import inside a function is for an optional heavy library (LAZY_OK) or has its reason in
LAZY_MODULES."""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import janusflow_trt

PKG = "janusflow_trt"
# bottom to top; a module's layer is that of its longest listed prefix
LAYERS: list[tuple[str, ...]] = [
    ("janusflow_trt", "janusflow_trt.errors", "janusflow_trt.files", "janusflow_trt.fingerprint",
     "janusflow_trt.images", "janusflow_trt.latents_io", "janusflow_trt.precision",
     "janusflow_trt.validation"),  # 0 base
    ("janusflow_trt.janusflow_ref",),  # 1 the reference model
    ("janusflow_trt.calibration",),  # 2 handed samples; runs no pipeline
    ("janusflow_trt.export",),  # 3 specs -> ONNX -> FP16 / INT8 -> engines
    ("janusflow_trt.runtime",),  # 4 pipelines over one seam
    ("janusflow_trt.api", "janusflow_trt.engines", "janusflow_trt.quality", "janusflow_trt.batch",
     "janusflow_trt.recording", "janusflow_trt.tiny", "janusflow_trt.tokenizer_factory",
     "janusflow_trt.export_job", "janusflow_trt.export_commands",
     "janusflow_trt.image_batch", "janusflow_trt.quality_gate"),  # 5 api: runs pipelines, orchestrates
    ("janusflow_trt.serve", "janusflow_trt.triton"),  # 6 the HTTP server; the Triton repository, its models and
    # client (uses the api and runtime); imported by nothing but the CLI
    ("janusflow_trt.benchmarks",),  # 7 never imported by the above
    ("janusflow_trt.cli",),  # 8 the entry point: registers every layer's subcommands, imported by nothing
]
# The package's front door: `from janusflow_trt import Pipeline` resolves the API lazily (PEP 562
# __getattr__), so that importing janusflow_trt.errors does not load it. Not a dependency of the base.
FACADE = {("janusflow_trt", "janusflow_trt.api")}
# Upward or cyclic imports in files being rewritten in the same change (issue 21): (module, imported).
# Empty this as they are fixed; nothing new goes in (test_known_violations_still_exist drops fixed ones).
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()
# Libraries that may be imported inside a function: optional and absent from the CPU install (tensorrt,
# CUDA bindings) or living in another environment (modelopt: its own interpreter).
LAZY_OK = {"tensorrt", "modelopt", "cuda", "pycuda", "cupy"}
# Modules that import inside functions on purpose, and why (exact module names).
LAZY_MODULES = {
    "janusflow_trt": "the facade resolves Pipeline on first use (see FACADE)",
    "janusflow_trt.export_commands": "the CLI registers every subcommand on every call: a command loads the "
                                     "exporter (torch, ~5 s) only when it runs",
    "janusflow_trt.calibration.record": "the ModelOpt worker imports it in ModelOpt's own environment to read "
                                        "sets; the config parser (transformers) loads only for recording_key",
    "janusflow_trt.cli": "`janusflow --help` and a bad flag answer without loading torch (~2 s): each command "
                         "imports what it runs",
    "janusflow_trt.benchmarks.commands": "registered by the CLI on every call (as export_commands): the bench "
                                         "loads the model stack only when it runs",
    "janusflow_trt.serve.commands": "registered by the CLI on every call: the web stack (FastAPI, uvicorn) and "
                                    "the model load only when `serve` runs",
    "janusflow_trt.triton.commands": "registered by the CLI on every call: the repository writer, the model "
                                     "stack and the server's environment load only when a triton command runs",
    "janusflow_trt.runtime.gpu_check": "registered by the CLI on every call: CUDA checks load only when it runs",
    "janusflow_trt.runtime.factory": "a torch backend's module loads the model code (transformers' modeling, "
                                     "diffusers), torch-cuda CUDA, trt TensorRT: only the one asked for",
    "janusflow_trt.engines": "the model code loads only for the backends that run the checkpoint's weights, "
                             "never on the ort / trt path (test_api: test_ort_path_imports_no_model_code)",
    "janusflow_trt.runtime.trt_backend": "trt_engine binds TensorRT at import: after the checks that need none",
}
# Modules being rewritten in the same change (issue 21) whose function-level imports are not yet gone
# over (prefixes); empty this as they are.
KNOWN_LAZY: set[str] = set()


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module (a name imported from a module counts as that module)
    names: tuple[str, ...]  # names taken from it (from X import a, b)
    line: int
    in_function: bool
    type_only: bool  # under `if TYPE_CHECKING:` (annotations; never run)


def layer(module: str) -> int:
    """The layer of the longest LAYERS entry naming `module` or a package above it; the bare package
    entry (janusflow_trt: its __init__) names itself only, so a new top-level module must be placed."""
    best = max(((len(p), i) for i, ps in enumerate(LAYERS) for p in ps
                if module == p or (module.startswith(p + ".") and p != "janusflow_trt")), default=None)
    assert best is not None, f"{module} has no layer: add it to LAYERS (and to docs/architecture.md)"
    return best[1]


def modules() -> dict[str, Path]:
    """Every module of the installed package -> its source file (found, not imported)."""
    names = [PKG] + [m.name for m in pkgutil.walk_packages(janusflow_trt.__path__, PKG + ".")]
    return {n: Path(importlib.util.find_spec(n).origin) for n in names}


def imports(name: str, path: Path, known: set[str]) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[Import] = []

    def visit(node: ast.AST, in_function: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            fn = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            tc = type_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, ast.Import):
                for a in child.names:
                    out.append(Import(name, a.name, (), child.lineno, fn, tc))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - child.level + 1] + ([base] if base else []))
                for a in child.names:  # `from pkg import mod` imports the module pkg.mod
                    sub = f"{base}.{a.name}"
                    target, names = (sub, ()) if sub in known else (base, (a.name,))
                    out.append(Import(name, target, names, child.lineno, fn, tc))
            visit(child, fn, tc)

    visit(tree, False, False)
    return out


def owner(target: str, known: set[str]) -> str | None:
    """The package module a dotted import name refers to (None: outside the package)."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


@cache
def all_imports() -> tuple[set[str], list[Import]]:
    mods = modules()
    known = set(mods)
    found = [i for n, p in mods.items() for i in imports(n, p, known)]
    return known, found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                on.discard(w)
                comp.append(w)
            on.discard(v)
            if comp:
                out.append(sorted([v, *comp]))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles():
    """Imports inside functions count: one placed there to dodge a cycle is still a cycle."""
    known, found = all_imports()
    edges: dict[tuple[str, str], bool] = {}  # (module, imported) -> only inside functions
    for i in found:
        t = owner(i.target, known)
        if not i.type_only and t and t != i.module and (i.module, t) not in KNOWN_VIOLATIONS | FACADE:
            edges[i.module, t] = edges.get((i.module, t), True) and i.in_function
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    bad = ["\n  ".join(f"{a} -> {b}{' [in a function]' * edges[a, b]}" for a, b in sorted(edges)
                      if a in comp and b in comp) for comp in cycles(graph)]
    assert not bad, "import cycles (the edges inside each):\n  " + "\n\n  ".join(bad)


def test_imports_run_downward():
    known, found = all_imports()
    bad = sorted({f"{i.module} (layer {layer(i.module)}) -> {t} (layer {layer(t)}){' [in a function]' * i.in_function}"
                  for i in found if (t := owner(i.target, known)) and layer(t) > layer(i.module)
                  and (i.module, t) not in KNOWN_VIOLATIONS | FACADE})
    assert not bad, "imports against the layer order (bottom 0 .. top 8):\n" + "\n".join(bad)


def test_no_private_imports_across_modules():
    known, found = all_imports()
    bad = sorted({f"{i.module}:{i.line} imports {n} from {i.target}" for i in found
                  for n in i.names if n.startswith("_") and not n.startswith("__") and owner(i.target, known)
                  and owner(i.target, known) != i.module})
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


def test_known_violations_still_exist():
    """An entry that no longer occurs is removed, so the set only shrinks."""
    known, found = all_imports()
    seen = {(i.module, owner(i.target, known)) for i in found}
    assert not KNOWN_VIOLATIONS - seen, f"fixed, remove from KNOWN_VIOLATIONS: {sorted(KNOWN_VIOLATIONS - seen)}"


def test_imports_at_module_top():
    """An import inside a function is for an optional heavy library (LAZY_OK), or in a module whose reason
    is stated in LAZY_MODULES; KNOWN_LAZY lists modules not yet gone over."""
    _, found = all_imports()
    bad = sorted({f"{i.module}:{i.line} {i.target}" for i in found
                  if i.in_function and i.target.split(".")[0] not in LAZY_OK
                  and i.module not in LAZY_MODULES
                  and not any(i.module == m or i.module.startswith(m + ".") for m in KNOWN_LAZY)})
    assert not bad, "imports inside functions (move them to the module's top):\n" + "\n".join(bad)
