"""TensorBoard for a search: one HParams table with every trial and every column, and curves per trial.

Ray Tune's TBX logger writes an hparams "experiment" into every trial, so the HParams dashboard shows
one arbitrary trial's columns; run.py turns it off. Instead the driver writes one experiment config
(every searched parameter, every metric) at the experiment root, and each trial writes its session
(its hparams and static metrics) into its own run folder, where distil_core's trainer writes the loss
terms, lr, examples/s and dev metrics. Trial folders reach the experiment's storage with Tune's artifact
sync, so `tensorboard --logdir EXPERIMENT` sees trials that ran on other nodes too. An experiment on
object storage is served from a local mirror of its event files, refreshed in the background.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensorboard.plugins.hparams import summary_v2 as hp
from torch.utils.tensorboard.writer import FileWriter

from .space import SearchSpace

if TYPE_CHECKING:
    from .storage import Experiment

log = logging.getLogger(__name__)

# Per-trial values known before training, logged once as scalars at step 0 in the session's own run.
STATIC_METRICS = ("search/params", "search/params_ratio", "search/latency_ms", "search/speedup")
# The trainer's run, relative to the trial folder (the session's run): output.dir is trial/run, and
# distil_core writes TensorBoard to output.dir/tb.
TRAINER_RUN = "run/tb"


def _domain(spec) -> hp.Domain | None:
    if spec.kind in ("uniform", "log_uniform"):
        return hp.RealInterval(float(spec.low), float(spec.high))
    if spec.kind == "int":
        return hp.IntInterval(int(spec.low), int(spec.high))
    if spec.kind == "choice" and len({type(c) for c in spec.choices}) == 1:
        return hp.Discrete(list(spec.choices))
    return None  # derived keys and mixed-type choices: TensorBoard infers the values it sees


def metrics(dev_metrics: list[str]) -> list[hp.Metric]:
    """Every metric column of the HParams table: dev metrics and train loss (last logged), size and speed."""
    trained = [f"dev/{m}" for m in dev_metrics] + ["loss/total"]
    return ([hp.Metric(tag, group=TRAINER_RUN, display_name=tag) for tag in trained]
            + [hp.Metric(tag, display_name=tag) for tag in STATIC_METRICS])


def write_experiment_config(exp: Path, space: SearchSpace, dev_metrics: list[str]) -> None:
    """The root hparams config: TensorBoard's HParams columns for the whole experiment."""
    hparams = [hp.HParam(key, _domain(spec)) for key, spec in space.params.items()]
    writer = FileWriter(str(exp))
    writer.add_summary(hp.hparams_config_pb(hparams, metrics(dev_metrics), time_created_secs=time.time()))
    writer.close()


def write_trial_session(trial_dir: Path, trial_id: str, hparams: dict[str, Any], static: dict[str, float]) -> None:
    """A trial's HParams session in the trial folder; its training metrics are read from TRAINER_RUN below it.

    Written once and closed: TensorBoard reads a folder's event files in name order and follows the
    newest, so a file must be complete before another one (a restored trial's) is opened beside it.
    """
    writer = FileWriter(str(trial_dir))
    values = {k: v for k, v in hparams.items() if isinstance(v, (bool, int, float, str))}
    writer.add_summary(hp.hparams_pb(values, trial_id=trial_id, start_time_secs=time.time()))
    from torch.utils.tensorboard.summary import scalar

    for tag in STATIC_METRICS:
        name = tag.split("/", 1)[1]
        if name in static:
            writer.add_summary(scalar(tag, float(static[name])), global_step=0)
    writer.close()


def serve(exp: Path, host: str = "127.0.0.1", port: int = 6006) -> None:
    """TensorBoard on this experiment, bound to loopback unless told otherwise; blocks until Ctrl-C."""
    from tensorboard import program

    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(exp), "--host", host, "--port", str(port)])
    board.main()


def mirror_events(exp: Experiment, every_s: float = 30.0) -> None:
    """Copy an experiment's event files from object storage into its local folder now, then every every_s
    seconds in a background thread (appending what the files gained), so TensorBoard follows a running search."""
    from .storage import is_event_file

    exp.pull(include=is_event_file)

    def refresh() -> None:
        while True:
            time.sleep(every_s)
            try:
                exp.pull(include=is_event_file)
            except OSError as e:  # a network hiccup: the next round tries again
                log.warning("refreshing the TensorBoard mirror of %s: %s", exp.uri, e)

    threading.Thread(target=refresh, name="tensorboard-mirror", daemon=True).start()
