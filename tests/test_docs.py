"""README.md and docs/*.md: every Python snippet runs as written, every relative link points at a
file of the repository, every page is linked from the README, and no page points outside the
repository. (Tests of each feature check what its snippet prints: test_walk, test_torch_ops,
test_torch_lce, test_diagnostics.)"""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
SNIPPETS = [(page, i, code) for page in PAGES
            for i, code in enumerate(re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, page),
                                                                            encoding="utf-8").read(), re.S))]


def _text(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def test_every_page_has_its_snippets_found():
    assert len(PAGES) >= 10 and {page for page, _, _ in SNIPPETS} >= {
        "README.md", "docs/training.md", "docs/memory.md", "docs/pytorch.md", "docs/lm-head.md"}


def _under_torchrun(code):
    """A snippet whose first line says it runs under torchrun (one process per rank): its page's
    own test runs it that way (tests/test_torch_parallel.py: test_docs_torchrun_example)."""
    return "torchrun" in code.splitlines()[0]


def test_torchrun_snippets_are_run_by_their_test():
    pages = {page for page, _, code in SNIPPETS if _under_torchrun(code)}
    with open(os.path.join(ROOT, "tests", "test_torch_parallel.py"), encoding="utf-8") as f:
        runner = f.read()
    assert pages == {"docs/vocab-parallel.md"} and all(os.path.basename(p) in runner for p in pages), pages


@pytest.mark.parametrize("page,index,code", [s for s in SNIPPETS if not _under_torchrun(s[2])],
                         ids=[f"{p}:{i}" for p, i, c in SNIPPETS if not _under_torchrun(c)])
def test_python_snippet_runs(page, index, code, capsys):
    if "import torch" in code:
        pytest.importorskip("torch")
    exec(compile(code, f"{page} snippet {index}", "exec"), {})


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve_and_stay_inside(page):
    text = _text(page)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "#")):
            continue
        path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), target.split("#")[0]))
        assert path.startswith(ROOT + os.sep) and os.path.exists(path), f"{page}: broken link {target}"
    assert not re.search(r"DESIGN\.md|/work/|\.\./shared", text), page


def test_readme_links_every_page():
    readme = _text("README.md")
    for page in PAGES[1:]:
        assert f"]({page})" in readme, f"README.md does not link {page}"
