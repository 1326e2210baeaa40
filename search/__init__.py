"""search: the Ray Tune + Optuna layer over distil_core, and the CLI."""

MAIN = "main"  # every trial reports its task's main dev metric under this name too


class SearchInterrupted(Exception):
    """A search stopped before its planned trials finished; `distil-search resume` continues it."""
