"""The house rules of the layout: imports run one way, and the store format has one owner.

Layers, lowest first (a module imports its own layer and the ones below it; the three apps do
not import one another, except that train imports evaluate):
  ground    xlab.version, xlab.config, xlab.errors, xlab.fsio, xlab.pathcheck, xlab.device, xlab.distributed,
            xlab.progress
  core      xlab.tokenizer, xlab.store, xlab.attention, xlab.model, xlab.loss, xlab.checkpoint, xlab.export
  apps      xlab.evaluate, xlab.train, xlab.generate, xlab.hf (the Hugging Face export; train may import evaluate),
            xlab.plot (it reads run folders, it imports no other app)
  commands  xlab.commands and the entry modules (xlab.__main__, xlab.cli), and the package root
            ``xlab`` (the public face: it re-exports; nothing inside XLab imports it)
``pipelines`` (the data side) may import the ground floor, the tokenizer and the store only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GROUND = {"xlab.version", "xlab.config", "xlab.errors", "xlab.fsio", "xlab.pathcheck", "xlab.device", "xlab.distributed",
          "xlab.progress"}  # fmt: skip
CORE = {"xlab.tokenizer", "xlab.store", "xlab.attention", "xlab.model", "xlab.loss", "xlab.checkpoint", "xlab.export"}
APPS = {"xlab.evaluate", "xlab.train", "xlab.generate", "xlab.plot", "xlab.hf"}
COMMANDS = {"xlab", "xlab.commands", "xlab.__main__", "xlab.cli"}
PIPELINES_MAY_USE = GROUND | {"xlab.tokenizer", "xlab.store"}
APPS_LAYER = 2  # its rooms are independent of one another (train -> evaluate aside)


def room(module: str) -> str:
    """The room of a dotted module name: ``xlab.store.reader`` -> ``xlab.store``."""
    parts = module.split(".")
    if parts[0] == "pipelines":
        return "pipelines"
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def layer(r: str) -> int:
    for i, group in enumerate((GROUND, CORE, APPS, COMMANDS)):
        if r in group:
            return i
    raise AssertionError(f"{r} is in no layer: add it to tests/test_layout.py")


def imports(path: Path, module: str) -> set[str]:
    """Every xlab/pipelines module ``path`` imports, at any depth (function-local imports count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names}
            out |= subs
            if not all(_exists(m) for m in subs):  # a name from the module itself, not a submodule
                out.add(node.module)
    return {m for m in out if m.split(".")[0] in ("xlab", "pipelines") and _exists(m)}


def _exists(module: str) -> bool:
    p = ROOT.joinpath(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def modules(package: str) -> list[tuple[Path, str]]:
    found = []
    for p in sorted((ROOT / package).rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        found.append((p, ".".join(parts)))
    return found


def violations(module: str, targets: set[str]) -> list[str]:
    """The imports of ``module`` that break the rules above."""
    bad = []
    mine = room(module)
    if module == "xlab":  # the package facade: __version__ and load_model (the Python API of docs/training.md)
        return [
            f"xlab -> {t} (the facade reaches the core only)" for t in sorted(targets) if room(t) not in GROUND | CORE
        ]
    if "xlab" in targets:
        bad.append(f"{module} -> xlab (import xlab.version or the room itself, never the public face)")
    for t in sorted(targets):
        theirs = room(t)
        if mine == "pipelines":
            if theirs != "pipelines" and theirs not in PIPELINES_MAY_USE:
                bad.append(f"{module} -> {t} (the data side uses only the ground floor, tokenizer and store)")
        elif theirs == "pipelines":
            if mine not in COMMANDS:
                bad.append(f"{module} -> {t} (only xlab.commands imports pipelines)")
        elif theirs != mine and (
            layer(theirs) > layer(mine)
            or (layer(mine) == layer(theirs) == APPS_LAYER and (mine, theirs) != ("xlab.train", "xlab.evaluate"))
        ):
            bad.append(f"{module} -> {t} (a {mine} module imports {theirs}, above it or beside it)")
    return bad


@pytest.mark.parametrize("package", ["xlab", "pipelines"])
def test_imports_run_one_way(package):
    bad = [v for path, module in modules(package) for v in violations(module, imports(path, module))]
    assert bad == []


def test_the_rule_catches_an_import_the_wrong_way():
    assert violations("xlab.store.reader", {"xlab.train.trainer"})  # core -> apps
    assert violations("xlab.model", {"pipelines.encode"})  # library -> data stages
    assert violations("pipelines.stats", {"xlab.model"})  # data side -> model
    assert violations("xlab.generate.text", {"xlab.train"})  # apps sideways
    assert violations("xlab.plot", {"xlab.train.logger"})  # the plot reads files, not the trainer
    assert violations("xlab.store.reader", {"xlab.plot"})  # core -> apps
    assert not violations("xlab.commands.app", {"pipelines.encode", "xlab.train"})
    assert violations("pipelines.stage", {"xlab"})  # the package root is the public face only
    assert not violations("xlab.train.trainer", {"xlab.evaluate", "xlab.store.loader"})


def test_the_manifest_has_one_owner():
    """Only the store format spells the manifest's format name: encode, merge, write_store, the test
    helper and the benchmarks build it through StoreManifest. (Tests of the parser may write broken
    manifests by hand; the shared helper may not.)"""
    files = [(p, m) for pkg in ("xlab", "pipelines", "bench") for p, m in modules(pkg)]
    files.append((ROOT / "tests" / "train_helpers.py", "tests.train_helpers"))
    owners = [m for p, m in files if '"xlab-shards"' in p.read_text(encoding="utf-8") and m != "xlab.store.format"]
    assert owners == []


def test_a_store_written_by_the_test_helper_validates(tmp_path, cli):
    """The helper's store goes through `xlab data validate` like one from `xlab data encode`."""
    from train_helpers import make_store

    store = make_store(tmp_path)
    r = cli(["data", "validate", "--shards", store], cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
