"""A progress bar from tqdm when it is installed, else one line per step (tqdm is optional)."""
from __future__ import annotations

import sys

_MISSING = ("c2c-bench: tqdm is not installed, so progress is printed line by line "
            "(pip install 'c2c-kernels[bench]' for a progress bar)")


class _Lines:
    def __init__(self, total: int):
        self.total, self.done = total, 0
        print(_MISSING, file=sys.stderr)

    def set_description(self, text: str) -> None:
        print(f"[{self.done + 1}/{self.total}] {text}", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.done += n

    def close(self) -> None:
        pass


class _Silent(_Lines):
    def __init__(self, total: int):
        self.total, self.done = total, 0

    def set_description(self, text: str) -> None:
        pass


def progress(total: int, enabled: bool = True):
    if not enabled:
        return _Silent(total)
    try:
        from tqdm import tqdm
    except ImportError:
        return _Lines(total)
    return tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True, leave=False)
