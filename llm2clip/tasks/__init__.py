"""One module per job: build components from a config, run."""
from __future__ import annotations

import sys
from typing import Any, Callable


def run_cli(fn: Callable[[Any], Any], cfg: Any) -> Any:
    """Run a training entry point `fn(cfg)` for a tool's main(): a preflight problem or a locked run
    directory is printed once (rank 0), without a traceback, and exits with status 2; the message names
    what to fix, so a traceback would only bury it."""
    from llm2clip import distributed as D
    from llm2clip.checkpoint import RunDirLockedError
    from llm2clip.preflight import PreflightError

    try:
        return fn(cfg)
    except (PreflightError, RunDirLockedError) as e:
        if D.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
