"""Writing benchmark results into a markdown doc (the benchmark scripts import this)."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, heading: str, body: str, keep: str) -> None:
    """Rewrite the `heading` section (up to the next `## ` heading) of a markdown file, or append it.
    A hand-written `keep` subsection already in it (up to its next `### `) is carried over."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\nResults of the scripts in `benchmarks/`.\n"
    section = f"{heading}\n\n{body.strip()}\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + len(heading))
        old = text[start:nxt if nxt >= 0 else len(text)]
        if (k := old.find(keep + "\n")) >= 0:
            end = old.find("\n### ", k + len(keep))
            section += "\n" + old[k:end if end >= 0 else len(old)].strip() + "\n"
        text = text[:start] + section + ("\n" + text[nxt + 1:] if nxt >= 0 else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
