"""search: the Ray Tune + Optuna layer over distil_core, and the CLI."""
