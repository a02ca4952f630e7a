"""The old name of :mod:`model.testing`, kept while benchmarks/bench_model.py and
benchmarks/learn_wiring.py still import it; new code imports model.testing."""
from model.testing import *  # noqa: F401,F403
