#!/usr/bin/env python3
"""Edit the patches in patches/ as git commits, then write them back.

    python tools/patch_workspace.py open DIR     # DIR: a git repo of the pinned sources the patches touch,
                                                 # one commit per patch (its message: the patch's path)
    ... edit files in DIR; fold each change into the commit of the patch it belongs to, e.g.
        git -C DIR commit -a --fixup=:/0004-kv-eviction-policy && \\
        GIT_SEQUENCE_EDITOR=true git -C DIR rebase -i --autosquash --root
    python tools/patch_workspace.py save DIR     # rewrite patches/ from the commits (git diff of each)

Only the files some patch touches are in DIR (from tools/build_llama.py's unpacked pristine sources, so
run that once first). Each patch is written as `git diff` prints it, with a/ and b/ prefixes relative to
the directory it applies to (vendor/llama.cpp for patches/llama.cpp, the package root for the others).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_llama as bl  # noqa: E402


def git(d: Path, *args: str, capture: bool = False) -> str:
    r = subprocess.run(["git", "-C", str(d), *args], check=True, text=True,
                       capture_output=capture, env={**os.environ, "GIT_AUTHOR_NAME": "patches",
                                                    "GIT_AUTHOR_EMAIL": "patches@localhost",
                                                    "GIT_COMMITTER_NAME": "patches",
                                                    "GIT_COMMITTER_EMAIL": "patches@localhost"})
    return r.stdout if capture else ""


def cmd_open(d: Path) -> None:
    pristine = bl.cache_root() / "pristine" / f"llama_cpp_python-{bl.VERSION}"
    if not pristine.is_dir():
        sys.exit(f"{pristine} missing: run tools/build_llama.py --prepare-only first")
    if d.exists():
        sys.exit(f"{d} exists; give a new directory")
    d.mkdir(parents=True)
    patches = bl.list_patches(bl.REPO / "patches")
    files = sorted({str(Path(t) / f) for p, t in patches for f in bl.patched_files(p)})
    for rel in files:
        if (pristine / rel).exists():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(pristine / rel, d / rel)
    git(d, "init", "-q")
    git(d, "add", "-A")
    git(d, "commit", "-q", "-m", "pristine")
    for patch, target in patches:
        (d / target).mkdir(parents=True, exist_ok=True)
        bl.apply_patch(patch, d / target)
        git(d, "add", "-A")
        git(d, "commit", "-q", "--allow-empty", "-m", str(patch.relative_to(bl.REPO)))
    print(f"{d}: {len(patches)} patch commits over the pristine sources")


def _body(patch: str) -> str:
    return "\n".join(line for line in patch.splitlines() if not line.startswith("index "))


def cmd_save(d: Path) -> None:
    log = git(d, "log", "--reverse", "--format=%H %s", capture=True).split("\n")
    commits = [line.split(" ", 1) for line in log if line.strip()][1:]
    targets = {f"patches/{p.parent.name}/{p.name}": t for p, t in bl.list_patches(bl.REPO / "patches")}
    for sha, subject in commits:
        if subject not in targets:
            sys.exit(f"commit {sha[:10]} '{subject}' names no patch of patches/")
        target = targets[subject]
        rel = [] if target == "." else [f"--relative={target}"]
        diff = git(d, "diff", "--no-color", *rel, f"{sha}~1", sha, capture=True)
        out = bl.REPO / subject
        if _body(out.read_text()) != _body(diff):     # blob ids alone changing is no change
            out.write_text(diff)
            print(f"rewrote {subject}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("open", "save"))
    ap.add_argument("dir", type=Path)
    a = ap.parse_args()
    (cmd_open if a.action == "open" else cmd_save)(a.dir.resolve())


if __name__ == "__main__":
    main()
