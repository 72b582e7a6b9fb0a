"""The package's import graph, read from the source (imports inside functions included): inference
reaches no optimizer, data pipeline or TFDS; training reaches no evaluation or inference module;
the bundle's light path reaches neither flax nor transformers at import time."""

import ast
import os

import pytest

from tests.support import REPO

PACKAGE = os.path.join(REPO, "jaxmm")
# What the commands that use a trained model import (prediction, export, the bundle reader).
INFERENCE = ("jaxmm.predict", "jaxmm.export", "jaxmm.trained.classify",
             "jaxmm.trained.classifier", "jaxmm.trained.bundle", "jaxmm.trained.workdir",
             "jaxmm.trained.model", "jaxmm.evaluation.explain", "jaxmm.serve",
             "jaxmm.serving.app", "jaxmm.serving.server")
TRAINING_ONLY = ("optax", "grain", "tensorflow_datasets", "jaxmm.training.optim",
                 "jaxmm.data.pipeline", "jaxmm.data.builder", "jaxmm.data.prepared",
                 "jaxmm.training.setup", "jaxmm.training.steps", "jaxmm.training.checkpointing",
                 "jaxmm.training.loop")
# Training shares the split evaluator and the calibration fit (jaxmm.evaluation.scoring,
# .calibration) with evaluation; it must not reach evaluation's reports or inference.
EVALUATION_AND_INFERENCE = ("jaxmm.evaluation.report", "jaxmm.evaluation.explain",
                            "jaxmm.trained.classify", "jaxmm.trained.classifier",
                            "jaxmm.trained.bundle", "jaxmm.predict", "jaxmm.evaluate",
                            "jaxmm.export")


def _modules() -> dict[str, str]:
    out = {}
    for root, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, name), REPO)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(root, name)
    return out


def _imports(path: str, module: str, known: dict, top_level: bool = False) -> set[str]:
    """Every module an import statement anywhere in the file names (``from a import b`` is
    ``a.b`` when that is a module of the package, else ``a``); with ``top_level``, only the
    statements that run when the module is imported."""
    found = set()
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in (tree.body if top_level else ast.walk(tree)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """Module -> the modules it imports; "<package>@init" -> what importing a module inside
    the package runs (the package's top-level imports; ``jaxmm.Classifier`` is imported only
    when that attribute is used)."""
    known = _modules()
    packages = {m for m, p in known.items() if p.endswith("__init__.py")}
    # Importing a package (``from jaxmm import __version__``) runs its top level only.
    at_init = lambda names: {f"{n}@init" if n in packages else n for n in names}  # noqa: E731
    out = {m: at_init(_imports(p, m, known)) for m, p in known.items()}
    out.update({f"{m}@init": at_init(_imports(p, m, known, top_level=True))
                for m, p in known.items() if m in packages})
    return out


def _reach(graph, start) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parents = [".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)]
        todo += [f"{p}@init" for p in parents if f"{p}@init" in graph]
        todo += list(graph.get(m, ()))
    return {m for m in seen if not m.endswith("@init")}


def _hits(reached: set[str], forbidden) -> list[str]:
    return sorted(m for m in reached for f in forbidden if m == f or m.startswith(f + "."))


def test_inference_imports_no_optimizer_grain_or_tfds(graph):
    assert _hits(_reach(graph, INFERENCE), TRAINING_ONLY) == []


def test_training_imports_no_evaluation_or_inference(graph):
    reached = _reach(graph, ["jaxmm.training.loop", "jaxmm.train"])
    assert _hits(reached, EVALUATION_AND_INFERENCE) == []


def test_the_graph_sees_lazy_imports(graph):
    """A negative control: the reader finds imports inside functions (the evaluation command
    imports the report module only in ``main``), so the checks above could fail."""
    assert "jaxmm.evaluation.report" in graph["jaxmm.evaluate"]
    assert _hits(_reach(graph, ["jaxmm.evaluate"]), TRAINING_ONLY)
