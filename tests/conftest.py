"""One tiny two-objective search on local Ray, shared by the tests that read a finished experiment
(TensorBoard, export, report): a search costs about a minute here, so it runs once per session."""
from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="session")
def tiny_search(tmp_path_factory):
    from search.results import trial_rows
    from search.run import SearchOptions, run_search
    from test_search import write_space

    tmp = tmp_path_factory.mktemp("search")
    space = write_space(tmp, num_samples=4)
    summary = run_search(SearchOptions(space=str(space), name="tiny", storage=str(tmp / "exp"), live=False,
                                       objectives=["main", "latency"]))
    exp = Path(summary["experiment"])
    return {"tmp": tmp, "exp": exp, "rows": trial_rows(exp), "summary": summary,
            "space": yaml.safe_load(space.read_text())}
