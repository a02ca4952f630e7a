"""The driver's task loop (pipeline.job.bounded) on a real local Ray: items go in plan order, an item waits
until it is ready (the dedup pre-pass's gate), and a limit that rises (the detector warm-up gate) is followed."""
import threading
import time

from pipeline.job import bounded


def test_items_wait_for_readiness_and_the_rising_limit(local_ray):
    import ray

    @ray.remote(num_cpus=0.1)
    def work(i):
        time.sleep(0.1)
        return i * i

    opened = threading.Event()
    submitted, results, state = [], {}, {"in_flight": 0, "peak_closed": 0, "peak_open": 0}

    def submit(i):
        submitted.append((i, opened.is_set()))
        state["in_flight"] += 1
        key = "peak_open" if opened.is_set() else "peak_closed"
        state[key] = max(state[key], state["in_flight"])
        return work.remote(i)

    def on_result(i, value):
        state["in_flight"] -= 1
        results[i] = value
        if i == 2:
            opened.set()

    errors = bounded(submit, range(12), lambda: 4 if opened.is_set() else 2, on_result,
                     ready=lambda i: i < 3 or opened.is_set())
    assert not errors and results == {i: i * i for i in range(12)}
    assert [i for i, _ in submitted] == list(range(12))                 # plan order, nothing skipped
    assert all(was_open for i, was_open in submitted if i >= 3)         # not ready before the gate opened
    assert state["peak_closed"] <= 2 and state["peak_open"] <= 4 and state["peak_open"] >= 3
