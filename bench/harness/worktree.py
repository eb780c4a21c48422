"""A git worktree of another commit, to measure its code side by side with this checkout's."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.servers import ROOT


class WorktreeError(RuntimeError):
    """The ref cannot be checked out, or its checkout would not be the code that runs."""


@dataclass(frozen=True, slots=True)
class Baseline:
    """A detached worktree of `ref` (at `commit`) whose `python -m proxy` imports `proxy_file`."""

    ref: str
    commit: str
    path: Path
    proxy_file: str

    @property
    def label(self) -> str:
        return f"single@{self.ref}"


def _git(*args: str, cwd: Path = ROOT) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise WorktreeError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def imported_proxy(cwd: Path) -> str:
    """Where `python -m proxy` run in `cwd` takes the proxy package from (sys.path[0] is cwd
    for both -m and -c, ahead of the venv's editable install of this checkout)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import proxy; print(proxy.__file__)"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise WorktreeError(f"import proxy in {cwd} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


@contextlib.contextmanager
def baseline_worktree(ref: str) -> Iterator[Baseline]:
    """`git worktree add --detach` of `ref` in a temporary directory, removed afterwards."""
    commit = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    with tempfile.TemporaryDirectory(prefix="mlproxy-baseline-") as tmp:
        path = Path(tmp) / "worktree"
        _git("worktree", "add", "--detach", str(path), commit)
        try:
            proxy_file = imported_proxy(path)
            if not Path(proxy_file).resolve().is_relative_to(path.resolve()):
                raise WorktreeError(
                    f"python -m proxy in {path} imports {proxy_file}, not the worktree's code"
                )
            yield Baseline(ref=ref, commit=commit, path=path, proxy_file=proxy_file)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(path)],
                cwd=ROOT,
                capture_output=True,
                check=False,
            )
            subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True, check=False)
