#!/usr/bin/env python3
"""Print one of the README's two set-up commands: `main` or `test`.

The README marks each with an HTML comment (<!-- main-command --> / <!-- test-command -->)
followed by a fenced block holding the command on one line; .ci/run runs the test one,
so the README and CI cannot drift apart."""

import sys
from pathlib import Path


def readme_command(which: str, readme: Path = Path(__file__).resolve().parent.parent / "README.md") -> str:
    lines = readme.read_text().splitlines()
    marker = f"<!-- {which}-command -->"
    i = next(i for i, line in enumerate(lines) if line.strip() == marker)
    body = []
    for line in lines[i + 1:]:
        if line.startswith("```"):
            if body:
                break
            continue
        body.append(line)
    cmd = " ".join(b.strip() for b in body).strip()
    if not cmd:
        raise SystemExit(f"README.md: no command after {marker}")
    return cmd


if __name__ == "__main__":
    print(readme_command(sys.argv[1] if len(sys.argv) > 1 else "test"))
