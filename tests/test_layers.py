"""The package is layered (README "Module map"): a module imports only from its own layer or below, and only
the integrations write into other packages' namespaces. Read from the source with ``ast``: nothing is run."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ns_plugin"

#: module-name prefix -> layer (the longest matching prefix wins); bottom first
LAYERS = {
    "ns_plugin.errors": 0, "ns_plugin._registry": 0, "ns_plugin.io": 0, "ns_plugin._lazy": 0, "ns_plugin.validation": 0,
    "ns_plugin.models": 1, "ns_plugin.checkpoint": 1, "ns_plugin.data": 1, "ns_plugin.anatomy": 1,
    "ns_plugin.embedded": 1, "ns_plugin.weights": 1,
    "ns_plugin.nullspace": 2,
    "ns_plugin.attacks": 3,
    "ns_plugin.evaluation": 4,
    "ns_plugin.training": 5,
    "ns_plugin.applications": 6, "ns_plugin.analysis": 6,
    "ns_plugin.integrations": 7,
    "ns_plugin.evaluation.harness": 8, "ns_plugin.evaluation.preflight": 8, "ns_plugin.evaluation.seeds": 8,
    "ns_plugin.cli": 8, "ns_plugin.commands": 8, "ns_plugin.__main__": 8,
    "ns_plugin": 8,  # the package's lazy table of public names
}


def layer(mod: str) -> int:
    best = max((p for p in LAYERS if mod == p or mod.startswith(p + ".")), key=len)
    return LAYERS[best]


def imports():
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        mod = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        pkg = mod if f.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for n in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(n, ast.ImportFrom):
                if n.level:
                    base = pkg.split(".")[:len(pkg.split(".")) - (n.level - 1)]
                    tgt = ".".join(base + ([n.module] if n.module else []))
                else:
                    tgt = n.module or ""
                targets = [tgt] if n.module else [f"{tgt}.{a.name}" for a in n.names]
            elif isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            else:
                continue
            for t in targets:
                if t == "ns_plugin" or t.startswith("ns_plugin."):
                    yield mod, t, n.lineno


def test_no_module_imports_from_a_layer_above_it():
    bad = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)}) at line {ln}"
           for m, t, ln in imports() if layer(t) > layer(m)]
    assert not bad, "\n".join(bad)


def test_the_layer_check_sees_imports():
    """The walk finds the imports it judges (a broken walk would pass the test above vacuously)."""
    found = {(m, t) for m, t, _ in imports()}
    assert ("ns_plugin.integrations.timm", "ns_plugin.models") in found
    assert ("ns_plugin.training.loop", "ns_plugin.training.state") in found
    assert layer("ns_plugin.evaluation.harness") > layer("ns_plugin.integrations.timm") > layer("ns_plugin.training.loop")


def test_only_integrations_write_into_other_packages():
    """``setattr(torchattacks, ...)`` / timm ``register_model`` appear only under ns_plugin/integrations."""
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        if "integrations" in f.parts:
            continue
        text = f.read_text(encoding="utf-8")
        for needle in ("setattr(torchattacks", "register_model(", "torchattacks.__all__.append", "sys.modules["):
            if needle in text:
                bad.append(f"{f.relative_to(PKG.parent)}: {needle}")
    assert not bad, bad


def test_readme_module_map_matches_the_tree():
    """Every module is in the README's module map (by path, or by its folder for attacks/, applications/...),
    and every path the map names exists."""
    import re
    readme = (PKG.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Module map"):]
    section = section[:section.index("\n## ")]
    named = set(re.findall(r"`([\w/]+(?:\.py|/))`", section))
    assert named, "no module map found"
    named = {p for p in named if not p.startswith("tests/")}
    for path in named:
        assert (PKG / path).exists(), f"README module map names {path}, which does not exist"
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG).as_posix()
        if rel in ("__init__.py", "__main__.py") or (f.name == "__init__.py" and rel != "integrations/__init__.py"):
            continue
        assert rel in named or rel.split("/")[0] + "/" in named, f"{rel} is missing from the README module map"
