"""README.md is the front door and docs/*.md the evidence: the README stays short, its first lines get a newcomer
training, every relative link resolves, and the Layout tree names the files that exist (and every one that does)."""
import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
INSTALL = "pip install -r requirements.txt && python data/tokenizer.py"
FIRST_TRAIN = "python train_gpt2.py --preset shakespeare"

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.S | re.M)  # fenced code blocks
CODE_SPAN = re.compile(r"(`+).+?\1", re.S)  # inline code
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title")


def prose(text):
    """text without code blocks and code spans, where [x](y) is code, not a link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading):
    """GitHub's anchor for a heading: lowercase, punctuation dropped except - and _, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(md_path):
    """The anchors of md_path's headings, with GitHub's -1, -2 suffixes for repeated headings."""
    seen, out = {}, set()
    for line in FENCE.sub("", md_path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def bad_links(md_path):
    """'file: target (why)' for each relative link in md_path that does not resolve."""
    bad = []
    for target in LINK.findall(prose(md_path.read_text(encoding="utf-8"))):
        if not target or re.match(r"^(https?:|mailto:)", target, re.I):
            continue
        path, _, anchor = target.partition("#")
        dest = (md_path.parent / unquote(path)).resolve() if path else md_path
        name = f"{md_path.relative_to(ROOT)}: ({target})"
        if not dest.exists():
            bad.append(f"{name} -> no such file {dest.relative_to(ROOT) if ROOT in dest.parents else dest}")
        elif anchor and dest.suffix == ".md" and unquote(anchor).lower() not in anchors(dest):
            bad.append(f"{name} -> no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    return bad


def layout_tree():
    """The names in the first code block after README's '## Layout' heading: the first word of each line that
    does not start with a space (a continued description)."""
    text = README.read_text(encoding="utf-8")
    m = re.search(r"^## Layout\b.*?^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    assert m, "README.md: no code block under a '## Layout' heading"
    return [line.split()[0] for line in m.group(1).splitlines() if line.strip() and not line[0].isspace()]


def test_readme_is_at_most_25000_bytes():
    size = README.stat().st_size
    assert size <= 25_000, f"README.md is {size:,} bytes (limit 25,000): move evidence to docs/"


def test_every_relative_link_resolves():
    assert DOCS, "docs/ holds no .md files"
    bad = [b for md in [README, *DOCS] for b in bad_links(md)]
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_install_and_first_training_command_are_in_the_first_80_lines():
    head = README.read_text(encoding="utf-8").splitlines()[:80]
    for needed in (INSTALL, FIRST_TRAIN):
        assert any(needed in line for line in head), f"README.md: {needed!r} is not within the first 80 lines"


def test_the_test_command_ci_greps_for_is_there():
    lines = README.read_text(encoding="utf-8").splitlines()
    command = "python -m pytest -p randomly -n 2 --dist loadfile tests"
    assert command in lines, f"README.md: no line {command!r}"
    assert "pip install -r requirements-dev.txt && python data/tokenizer.py" in lines, "README.md: no dev install line"


def test_layout_tree_names_only_what_exists():
    missing = [name for name in layout_tree() if not (ROOT / name).exists()
               or (name.endswith("/") and not (ROOT / name).is_dir())]
    assert not missing, f"README.md's Layout tree names {missing}, which do not exist"


def test_layout_tree_names_every_module_and_doc():
    named = set(layout_tree())
    files = [p.relative_to(ROOT).as_posix() for p in
             [*ROOT.glob("*.py"), *(ROOT / "data").glob("*.py"), *DOCS]]
    unnamed = sorted(f for f in files if f not in named)
    assert not unnamed, f"README.md's Layout tree does not name {unnamed}"
