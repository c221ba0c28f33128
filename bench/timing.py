"""Shared timing helper for the benchmark scripts (run as ``python bench/NAME.py``)."""
import statistics
import time


def median_time(fn, repeats: int, sync=None) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up run;
    ``sync`` (e.g. torch.cuda.synchronize) is called before each clock read."""
    sync = sync or (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
