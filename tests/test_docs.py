"""The documentation's links: every relative link in the repository's
Markdown files points at a file or folder that exists."""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def markdown_files():
    out = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        return [os.path.join(ROOT, f) for f in out.stdout.split()]
    return [os.path.join(d, f) for d, _, files in os.walk(ROOT) for f in files
            if f.endswith(".md") and not any(p in d for p in (".venv", "build", ".git"))]


def test_every_relative_link_in_the_docs_resolves():
    files = markdown_files()
    assert any(f.endswith("README.md") for f in files)
    broken = []
    for path in files:
        for target in LINK.findall(open(path, encoding="utf-8").read()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), target))):
                broken.append(f"{os.path.relpath(path, ROOT)} -> {target}")
    assert not broken, broken


def test_the_readme_is_a_front_page():
    # Detail lives in docs/ and benchmarks/README.md, one link away.
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(readme.splitlines()) <= 130
    for page in ("docs/api.md", "docs/fused-linear.md", "docs/vocab-parallel.md", "docs/trainer.md",
                 "docs/building.md", "benchmarks/README.md"):
        assert f"]({page})" in readme, page
