"""The documentation: the README stays a short map with its sections in order, and every relative link of the
README, docs/, tests/README.md and bench/results/README.md resolves (to a file, and to a heading where it names
one in a Markdown file)."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "tests/README.md", "bench/results/README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target); text may span lines


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def without_code(text):
    """The text with fenced code blocks and inline code removed (a link inside code is not a link)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(text):
    """GitHub's heading anchors: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", without_code_blocks(text), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower())
        out.add(slug.replace(" ", "-"))
    return out | set(re.findall(r'<a (?:id|name)="([^"]+)"', text))


def without_code_blocks(text):
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def links(rel):
    for target in LINK.findall(without_code(read(rel))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # http(s), mailto; same-page anchors
            continue
        yield target


def test_readme_is_at_most_250_lines():
    n = len(read("README.md").splitlines())
    assert n <= 250, f"README.md has {n} lines: move reference next to what it describes (docs/, tests/README.md)"


def test_the_checked_files_exist():
    assert "docs/config.md" in DOCS and "docs/resume.md" in DOCS
    for rel in DOCS:
        assert os.path.isfile(os.path.join(ROOT, rel)), rel


@pytest.mark.parametrize("rel", DOCS)
def test_every_relative_link_resolves(rel):
    bad = []
    for target in links(rel):
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(rel), path))
        if not os.path.exists(full):
            bad.append(f"{target}: no such file")
        elif anchor and full.endswith(".md") and anchor not in anchors(open(full, encoding="utf-8").read()):
            bad.append(f"{target}: no heading with anchor #{anchor}")
    assert not bad, f"{rel}: " + "; ".join(bad)


def test_the_link_checker_sees_links_and_flags_a_missing_file(tmp_path):
    """The checker's pieces on a constructed page: links found (also across a line break and in an image), code
    and web links skipped, a heading's anchor as GitHub writes it."""
    text = ("See [a](docs/a.md), ![plot](x/y.png) and [two\nlines](b.md#sec-one), `[not](code.md)`,\n"
            "[web](https://example.com), [here](#top).\n\n```\n[fenced](no.md)\n```\n")
    found = [t for t in LINK.findall(without_code(text)) if not t.startswith(("http", "#"))]
    assert found == ["docs/a.md", "x/y.png", "b.md#sec-one"]
    assert anchors("# Top\n## Stop tokens (`rollout.stop_at_im_end`)\n### Sec one: two\n") == {
        "top", "stop-tokens-rolloutstop_at_im_end", "sec-one-two"}


def test_readme_sections_in_the_issue_order():
    """What CurES is, quick start, the paper in the code, the testbeds' findings, the paper's runs (with what a step
    costs), deviations, status and limits, tests, licences: in that order."""
    headings = re.findall(r"^##+ (.+)$", without_code_blocks(read("README.md")), flags=re.M)
    order = ["Quick start", "The paper in the code", "What the tiny testbeds found", "The paper's runs",
             "Performance: what a step costs", "Deviations from the paper and the release", "Status and limits",
             "Tests", "Data and licences"]
    missing = [h for h in order if h not in headings]
    assert not missing, f"README.md lacks the sections {missing}; it has {headings}"
    assert [h for h in headings if h in order] == order
    assert read("README.md").startswith("# CurES"), "the README opens with what CurES is"


def test_gpu_figures_in_the_readme_are_labelled():
    """The README's table of what a step costs says, row by row, measured (GPU, date, file) or predicted."""
    text = read("README.md")
    section = text[text.index("### Performance: what a step costs"):text.index("## Deviations")]
    rows = [r for r in section.splitlines() if r.startswith("|") and not r.startswith(("| what", "|---"))]
    assert rows
    for row in rows:
        label = row.rstrip(" |").rsplit("|", 1)[-1]
        assert re.search(r"measured, H200, \d{4}-\d\d-\d\d, `[^`]+`", label) or "predicted" in label, row
