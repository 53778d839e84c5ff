"""The documentation holds together: every relative link in README.md and docs/*.md reaches a file
that exists (and, with `#anchor`, a heading of that page), every "methods.md §N" citation in the
repository names a section that docs/methods.md has, and the README stays short."""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
METHODS = DOCS / "methods.md"
README_MAX_LINES = 300

# where citations are looked for: the repository's own text files, not environments or outputs
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", ".pytest_cache",
             "demo_output", "logs", "results", "build", "dist"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".cfg", ".ini", ".txt"}

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\]\n]|\n(?!\n))*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
SECTION = re.compile(r"^#{2,6}[ \t]+(\d+(?:\.\d+)*)\.?[ \t]")
CITATION = re.compile(r"§\s?([0-9][0-9A-Za-z.]*)(?:\s*[-–]\s*§?([0-9][0-9A-Za-z.]*))?")


def pages():
    return [README] + sorted(DOCS.glob("*.md"))


def without_code(text):
    """The text with fenced code blocks and inline code spans blanked: no links there."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return INLINE_CODE.sub("", text)


def slug(heading):
    """GitHub's anchor for a heading: its text lower-cased, links reduced to their text, every
    character but letters, digits, '_', '-' and spaces dropped, spaces turned into '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    """Every heading anchor of a page, duplicates numbered as GitHub does (x, x-1, x-2, ...)."""
    seen, out = {}, set()
    for m in HEADING.finditer(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path):
    """(line, target) of every link that is not to another site."""
    text = without_code(path.read_text(encoding="utf-8"))
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:, ...
            continue
        yield text.count("\n", 0, m.start()) + 1, target


def dead_links(path):
    problems = []
    for line, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{line}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no file {dest}")
        elif anchor:
            if dest.suffix != ".md" or dest.is_dir():
                problems.append(f"{where}: an anchor into a file that is not a page")
            elif anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.name}")
    return problems


def methods_sections():
    """The numbers of docs/methods.md's numbered headings: '1', '1.2', ..."""
    out = set()
    for line in METHODS.read_text(encoding="utf-8").splitlines():
        m = SECTION.match(line)
        if m:
            out.add(m.group(1))
    return out


def repository_text_files():
    """The repository's text files, this one left out (its examples cite on purpose)."""
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            if path.suffix in TEXT_SUFFIXES and path != Path(__file__).resolve():
                yield path


def citation_problems(path, sections):
    """Every '§N' in a file that cites methods.md (and in docs/methods.md itself) must be a
    section of docs/methods.md; outside docs/, a citation must name docs/methods.md."""
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return []
    if "methods.md" not in text and path != METHODS:
        return []
    rel = path.relative_to(ROOT)
    problems = []
    for m in CITATION.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        for ref in filter(None, m.groups()):
            ref = ref.rstrip(".")
            if ref not in sections:
                problems.append(f"{rel}:{line}: §{ref} is not a section of docs/methods.md")
    if path.parent != DOCS:
        for m in re.finditer(r"(\S*)methods\.md\s*§", text):
            if not m.group(1).endswith("docs/"):
                line = text.count("\n", 0, m.start()) + 1
                problems.append(f"{rel}:{line}: cite it as 'docs/methods.md §N', "
                                f"not {m.group(0)!r}")
    return problems


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_heading(page):
    assert dead_links(page) == []


def test_a_dead_link_is_found(tmp_path):
    (tmp_path / "a.md").write_text("# A\n\n## Some heading\n\n[ok](a.md#some-heading) [self](#a)\n"
                                   "[gone](b.md) [no anchor](a.md#nope) `[code](c.md)`\n"
                                   "```\n[fenced](d.md)\n```\n[web](https://example.com/x.md)\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = dead_links(tmp_path / "a.md")
    finally:
        ROOT = saved
    assert len(found) == 2, found
    assert "b.md" in found[0] and "#nope" in found[1]


@pytest.mark.parametrize("heading, anchor", [
    ("## 8.2 The toolbox's ViT (`--vit-style`)", "82-the-toolboxs-vit---vit-style"),
    ("### Benchmark: `bench/train_throughput.py`", "benchmark-benchtrain_throughputpy"),
    ("## Length bucketing across batches (`--length-bucketing N`, off by default)",
     "length-bucketing-across-batches---length-bucketing-n-off-by-default"),
    ("### Rejected, with the reason", "rejected-with-the-reason"),
])
def test_anchors_are_githubs(heading, anchor):
    assert slug(heading.lstrip("#").strip()) == anchor


def test_methods_md_has_a_numbered_section_per_method():
    sections = methods_sections()
    titles = {m.group(1): m.group(0) for m in re.finditer(
        r"^## (\d+)\. (.+)$", METHODS.read_text(encoding="utf-8"), re.M)}
    for n, name in enumerate(["ALIP", "CLIP", "SLIP", "DeCLIP", "FILIP", "DeFILIP", "CLIPS"], 1):
        assert str(n) in sections
        assert titles[str(n)].split(". ", 1)[1].startswith(name), titles[str(n)]


def test_every_methods_md_citation_names_a_section():
    sections = methods_sections()
    problems = [p for path in repository_text_files() for p in citation_problems(path, sections)]
    assert problems == []


def test_a_stale_citation_is_found(tmp_path):
    sections = {"1", "1.6", "5"}
    code = tmp_path / "x.py"
    code.write_text('"""See docs/methods.md §1.6 and §5; old: docs/methods.md §2b, '
                    'methods.md §5."""\n')
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = citation_problems(code, sections)
    finally:
        ROOT = saved
    assert any("§2b" in p for p in found), found
    assert any("cite it as" in p for p in found), found
    assert not any("§1.6 " in p or "§5 " in p for p in found), found


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES})"


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_each_page_opens_with_what_it_is_for(page):
    lines = [ln for ln in page.read_text(encoding="utf-8").splitlines() if ln.strip()]
    assert lines[0].startswith("# "), f"{page.name} starts with its title"
    assert not lines[1].startswith(("#", "|", "```", "- ")), \
        f"{page.name}: a sentence on what the page is for comes right after the title"
