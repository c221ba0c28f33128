"""What the command line tells the user besides its results: notes and progress bars on
stderr (none with --quiet). The maths never prints: the bars here are the solvers'
callbacks.

Only the standard library at module level (``main`` reports the parser's notes before
any command loads); tqdm is imported when a bar is made."""
from __future__ import annotations

import sys


class Reporter:
    """Notes and progress bars on stderr (none with --quiet); results go to stdout."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def note(self, text: str) -> None:
        if not self.quiet:
            print(f"note: {text}", file=sys.stderr, flush=True)

    def bar(self, desc: str, total: int, unit: str):
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, leave=False, disable=self.quiet, unit=unit,
                    file=sys.stderr)


class StepProgress:
    """A progress bar over the serial sampler's steps (``sample_serial``'s callback)."""

    def __init__(self, reporter: Reporter, desc: str, steps: int):
        self.bar = reporter.bar(desc, steps, "step")

    def __call__(self, info: dict) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class RoundProgress:
    """A progress bar over the parallel solve's rounds (``solve``'s callback): the bar
    counts rounds; the postfix says how many steps are final (frozen) so far."""

    def __init__(self, reporter: Reporter, desc: str, steps: int):
        self.bar = reporter.bar(desc, steps, "round")

    def __call__(self, info: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix(frozen=info["window"][0], evals=info["nfe"])

    def close(self) -> None:
        self.bar.close()
