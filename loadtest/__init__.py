"""pdserve.loadtest: the `pdserve bench` load-test harness for OpenAI-compatible servers.

Python API: `await run_benchmark(BenchConfig(...))` -> `BenchResult`; `run_sweep` over rates.
"""

from .backends import BACKENDS, Backend
from .config import BenchConfig
from .request import BenchRequest, RequestResult
from .runner import BenchResult, run_benchmark, run_sweep

__all__ = ["BACKENDS", "Backend", "BenchConfig", "BenchRequest", "BenchResult", "RequestResult",
           "run_benchmark", "run_sweep"]
