"""What a run prints, kept line by line for its markdown results file."""

from __future__ import annotations

import sys
from pathlib import Path

WARNING_BAR = "!" * 78


class Transcript:
    """Progress to stderr, the report to stdout, warnings to both; every line kept, so the
    markdown results file holds what a terminal showed."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
        self._lines.append(msg)

    def out(self, msg: str = "") -> None:
        print(msg, flush=True)
        self._lines.append(msg)

    def warn(self, msg: str) -> None:
        text = f"{WARNING_BAR}\n!!! WARNING: {msg}\n{WARNING_BAR}"
        print(text, file=sys.stderr, flush=True)
        print(text, flush=True)
        self._lines.append(text)

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.text())
