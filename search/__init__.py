"""search: the Ray Tune + Optuna layer over distil_core, and the CLI."""


class SearchInterrupted(Exception):
    """A search stopped before its planned trials finished; `distil-search resume` continues it."""
