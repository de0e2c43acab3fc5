"""The source revision the exporter was built from: `--version`, `build_info`, the landing page.

Where it comes from, first found:

1. REVISION_FILE in the package, written when the wheel is built (setup.py: the
   CONNTRACK_EXPORTER_REVISION environment variable, as the Dockerfile sets it from its REVISION
   build argument, or else the checkout's git HEAD);
2. the git checkout the package is imported from (an editable install, `python -m` in a
   checkout): its HEAD, read from the files under .git, without running git;
3. "unknown".

Standard library only, and no import of the package: setup.py loads this file by its path.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

REVISION_FILE = "REVISION"
UNKNOWN = "unknown"
# A commit id (SHA-1, or SHA-256 in repositories that use it).
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
# What a revision given at build time may be: a commit id, a tag, a describe string.
VALID_REVISION = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+-]{0,79}")
PACKAGE = Path(__file__).resolve().parent


@functools.cache
def revision() -> str:
    """This package's source revision, or "unknown"."""
    try:
        built = (PACKAGE / REVISION_FILE).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        built = ""
    if VALID_REVISION.fullmatch(built):
        return built
    return git_revision(PACKAGE.parent) or UNKNOWN


def git_revision(root: Path) -> str | None:
    """The commit checked out in `root`, a git work tree (a linked worktree too), or None."""
    try:
        git_dir = _git_dir(root)
        if git_dir is None:
            return None
        head = (git_dir / "HEAD").read_text(encoding="utf-8").strip()
        if _COMMIT.fullmatch(head):  # detached
            return head
        if not head.startswith("ref: "):
            return None
        return _resolve(head.removeprefix("ref: "), git_dir)
    except (OSError, UnicodeDecodeError):
        return None


def _git_dir(root: Path) -> Path | None:
    dot_git = root / ".git"
    if dot_git.is_dir():
        return dot_git
    if dot_git.is_file():  # a linked worktree or a submodule: "gitdir: PATH"
        pointer = dot_git.read_text(encoding="utf-8").strip()
        if pointer.startswith("gitdir: "):
            return (root / pointer.removeprefix("gitdir: ")).resolve()
    return None


def _resolve(ref: str, git_dir: Path) -> str | None:
    """A branch's commit: its loose ref file, or its line in packed-refs. A linked worktree
    keeps its HEAD in its own directory and the refs in the common one."""
    common = git_dir
    if (git_dir / "commondir").is_file():
        common = (git_dir / (git_dir / "commondir").read_text(encoding="utf-8").strip()).resolve()
    for base in dict.fromkeys((git_dir, common)):
        loose = base / ref
        if loose.is_file():
            commit = loose.read_text(encoding="utf-8").strip()
            return commit if _COMMIT.fullmatch(commit) else None
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text(encoding="utf-8").splitlines():
            commit, _, name = line.partition(" ")
            if name == ref and _COMMIT.fullmatch(commit):
                return commit
    return None
