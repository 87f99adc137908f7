"""The docs name only tests that exist: every `tests/<file>.py::<name>` and every bare
`test_<name>` in README.md, cluster/README.md and docs/*.md is a test module or a test
function (of that file, when a file is named)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO_ROOT

DOCS = sorted([REPO_ROOT / "README.md", REPO_ROOT / "cluster" / "README.md"])
DOCS += sorted((REPO_ROOT / "docs").glob("*.md"))
CITED = re.compile(r"(tests/[\w/]+\.py)(?:::(\w+))?")
BARE = re.compile(r"(?<![\w/:.])(test_\w+)")


def code_names() -> set[str]:
    """`test_` names the project's code uses as strings (manifest columns such as
    test_duplicate_of, summary keys such as test_accuracy): the docs name those as data."""
    names = set()
    for folder in ("cleaner", "training", "jobs"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            names.update(re.findall(r"[\"'](test_\w+)[\"']", path.read_text(encoding="utf-8")))
    return names


def defined_tests(path: Path) -> set[str]:
    """Names of the test functions (and test methods, as Class::name) defined in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.update(
                f"{node.name}::{item.name}"
                for item in node.body
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
            )
    return {name for name in names if name.split("::")[-1].startswith("test_")}


def citations() -> list[tuple[str, str, str | None]]:
    """(doc, cited file or '', cited test name or None) for every citation in the docs."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        where = str(doc.relative_to(REPO_ROOT))
        for match in CITED.finditer(text):
            found.append((where, match.group(1), match.group(2)))
        for match in BARE.finditer(text):
            found.append((where, "", match.group(1)))
    return found


def test_every_test_the_docs_cite_exists():
    modules = {p.stem: p for p in (REPO_ROOT / "tests").glob("test_*.py")}
    defined = {stem: defined_tests(path) for stem, path in modules.items()}
    everywhere = set().union(*defined.values())
    data_names = code_names()
    missing = []
    for doc, cited_file, name in citations():
        if cited_file:
            path = REPO_ROOT / cited_file
            if not path.exists():
                missing.append(f"{doc}: {cited_file}")
            elif name and name not in defined_tests(path):
                missing.append(f"{doc}: {cited_file}::{name}")
        elif name not in modules and name not in everywhere and name not in data_names:
            missing.append(f"{doc}: {name}")
    assert not missing, "the docs cite tests that do not exist:\n" + "\n".join(missing)


def test_the_check_sees_the_citations_and_would_see_a_wrong_one(tmp_path):
    cited = citations()
    assert len({(f, n) for _, f, n in cited if f and n}) >= 30  # the docs cite many tests
    bare = {n for _, f, n in cited if not f}
    assert "test_tiny_and_tied_classes_are_numerically_safe_with_the_tiny_floor" in bare
    fake = tmp_path / "test_fake.py"
    fake.write_text(
        "def test_real():\n    pass\n\nclass TestGroup:\n    def test_inner(self):\n"
        "        pass\n\ndef helper():\n    pass\n"
    )
    assert defined_tests(fake) == {"test_real", "TestGroup::test_inner"}
    text = "see `tests/test_x.py::test_gone` and test_bare, not src/test_y.py or x.test_z"
    assert [m.groups() for m in CITED.finditer(text)] == [("tests/test_x.py", "test_gone")]
    assert [m.group(1) for m in BARE.finditer(text)] == ["test_bare"]
