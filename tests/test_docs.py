"""The documentation points at things that exist: every file path, link and config it names, and
one row in docs/compat.md per adaptation resim_d2/compat.py can apply. The README stays short and
keeps the markers where the demo's output and the test counts go."""

import glob
import os
import re

import pytest

from resim_d2 import compat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/docs/*.md"))]
# files whose text names repository paths for users: the docs and the tools' usage docstrings
NAMING = DOCS + sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/tools/*.py"))
PATH = re.compile(
    r"(?<![\w./-])((?:configs|tools|benchmarks|docs|datasets)/[\w./{},\[\]-]*\.(?:yaml|py|sh|md))"
)


def _read(rel):
    with open(os.path.join(REPO, rel), encoding="utf-8") as f:
        return f.read()


def _expand(path):
    """``a_{x,y}[_z].yaml`` -> every spelling it stands for (the README's shorthand)."""
    m = re.search(r"\{([^}]*)\}|\[([^\]]*)\]", path)
    if m is None:
        return [path]
    options = m.group(1).split(",") if m.group(1) is not None else ["", m.group(2)]
    return [e for o in options for e in _expand(path[: m.start()] + o + path[m.end() :])]


def test_docs_exist_and_readme_is_short():
    assert {"docs/pretraining.md", "docs/transfer.md", "docs/reliability.md"} <= set(DOCS)
    assert {"docs/benchmarks.md", "docs/compat.md", "docs/design.md"} <= set(DOCS)
    readme = _read("README.md")
    assert len(readme.splitlines()) <= 250
    for marker in ("<!-- DEMO-OUTPUT -->", "<!-- TEST-COUNTS -->"):
        assert readme.splitlines().count(marker) == 1, marker


@pytest.mark.parametrize("rel", NAMING)
def test_named_paths_exist(rel):
    names = set(PATH.findall(_read(rel)))
    missing = [p for n in names for p in _expand(n) if not os.path.exists(os.path.join(REPO, p))]
    assert not missing, f"{rel} names paths that do not exist: {missing}"


@pytest.mark.parametrize("rel", DOCS)
def test_relative_links_resolve(rel):
    text = _read(rel)
    base = os.path.dirname(os.path.join(REPO, rel))
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(base, path)) if path else os.path.join(REPO, rel)
        if not os.path.exists(full):
            bad.append(target)
        elif anchor and full.endswith(".md"):
            with open(full, encoding="utf-8") as f:
                heads = re.findall(r"^#+ (.+)$", f.read(), flags=re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}
            if anchor not in slugs:
                bad.append(target)
    assert not bad, f"{rel} links to what does not exist: {bad}"


def test_compat_table_lists_every_adaptation():
    rows = set(re.findall(r"^\| `(\w+)` \|", _read("docs/compat.md"), flags=re.M))
    assert rows == set(compat._ADAPTATIONS)


def test_config_tree_names_existing_configs():
    readme = _read("README.md")
    start = readme.index("```\nconfigs/") + 4
    tree = readme[start : readme.index("```", start)]
    folder, missing, checked = "", [], 0
    for line in tree.splitlines()[1:]:
        stripped = line.strip()
        if stripped.endswith("/") and " " not in stripped:
            folder = stripped
            continue
        for name in re.findall(r"[\w\-{},\[\]/]+\.yaml", stripped.split("   ")[0]):
            for p in _expand(name):
                checked += 1
                if not os.path.exists(os.path.join(REPO, "configs", folder, p)):
                    missing.append(f"{folder}{p}")
    assert checked > 20  # the tree was found and read
    assert not missing, f"README's config tree names missing configs: {missing}"
