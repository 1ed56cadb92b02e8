"""``toolkit tune``: NVIDIA Triton Model Analyzer's search over a model's instance count, max batch size and
queue delay, on this machine, with the bundled tritonserver; the committed configuration measured in the
same run; the winner written back into model.yaml only when asked.

    search.py     the ranges, checked against the model's spec; Model Analyzer's manual sweep
    analyzer.py   finding Model Analyzer, its config for the bundled server, running it with a deadline
    results.py    its CSV and the configurations it tried -> trials, the winner, the committed one
    apply.py      the winner's values into model.yaml, comments kept
    tuner.py      one run, end to end (tune.json beside Model Analyzer's own reports)

Imports: ``toolkit.errors``, ``toolkit.repository``, ``toolkit.server`` (the bundled server's backends and
environment), ``toolkit.bench`` (perf_analyzer and its input data); nothing imports this but the CLI.
"""

from toolkit.tune.analyzer import Measurement, find_model_analyzer
from toolkit.tune.results import Outcome, Trial, Values
from toolkit.tune.search import SearchSpace, Sweep
from toolkit.tune.tuner import TuneReport, TuneRequest, tune

__all__ = ["Measurement", "Outcome", "SearchSpace", "Sweep", "Trial", "TuneReport", "TuneRequest", "Values",
           "find_model_analyzer", "tune"]
