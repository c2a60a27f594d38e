"""The scheduler's thread tuner: it picks the count whose steps are measured faster, and keeps probing cheap
when the other count is much slower."""

import pytest
import torch

from baichuan2.serve.threads import ThreadTuner


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def serve(tuner: ThreadTuner, steps: int, cost, key_of=lambda i: 16) -> list[int]:
    """Run ``steps`` simulated steps; ``cost(threads, i)`` is a step's time. Returns the counts used."""
    used = []
    for i in range(steps):
        key = key_of(i)
        threads = tuner.threads_for(key)
        assert torch.get_num_threads() == threads
        used.append(threads)
        tuner.record(key, cost(threads, i))
    return used


def test_switches_to_the_faster_count_and_stays():
    tuner = ThreadTuner((1, 2), period=8)
    used = serve(tuner, 400, lambda t, i: 0.100 if t == 1 else 0.080)
    assert tuner.current == 2 and tuner.switches == 1
    assert used[-100:].count(2) >= 95  # after the switch, 1 thread is only probed
    assert used[:8] == [1] * 8  # the first count until the first probe


def test_a_much_slower_count_is_probed_ever_more_rarely():
    tuner = ThreadTuner((1, 2), period=8, max_period=256)
    used = serve(tuner, 3000, lambda t, i: 0.100 if t == 1 else 0.500)  # e.g. a loaded machine
    assert tuner.current == 1 and tuner.switches == 0
    probes = [i for i, t in enumerate(used) if t == 2]
    assert len(probes) < 25  # back-off: 8, 16, 32, ... steps apart
    assert probes[-1] - probes[-2] >= 256


def test_follows_the_machine_when_load_comes_and_goes():
    # two threads are faster on an idle machine, one while another process takes a core
    def cost(t, i):
        loaded = 300 <= i < 900
        return (0.100 if t == 1 else 0.400) if loaded else (0.100 if t == 1 else 0.075)

    tuner = ThreadTuner((1, 2), period=8, max_period=64)
    used = serve(tuner, 1400, cost)
    assert used[250:300].count(2) > 45
    assert used[800:900].count(1) > 90
    assert used[1300:].count(2) > 95
    assert tuner.switches == 3


def test_equal_counts_do_not_flap():
    tuner = ThreadTuner((1, 2), period=4)
    serve(tuner, 500, lambda t, i: 0.100 * (1 + 0.02 * ((i * 7919) % 3 - 1)))  # +-2% noise, no difference
    assert tuner.switches == 0


def test_probes_only_between_steps_of_the_same_work():
    # every step differs (prefill chunks, changing batch): nothing is comparable, so nothing is probed
    tuner = ThreadTuner((1, 2), period=2)
    used = serve(tuner, 200, lambda t, i: 0.1, key_of=lambda i: i)
    assert set(used) == {1}
    tuner = ThreadTuner((1, 2), period=2)
    assert set(serve(tuner, 200, lambda t, i: 0.1, key_of=lambda i: None)) == {1}


def test_a_probe_followed_by_different_work_is_discarded():
    # the step after each probe is a prefill (key None): a faster probe must not count
    tuner = ThreadTuner((1, 2), period=2)
    state = {"after_probe": False}

    def key_of(i):
        if state["after_probe"]:
            state["after_probe"] = False
            return None
        return 16

    used = []
    for i in range(300):
        key = key_of(i)
        threads = tuner.threads_for(key)
        used.append(threads)
        tuner.record(key, 0.05 if threads == 2 else 0.1)
        state["after_probe"] = threads == 2
    assert tuner.switches == 0 and used.count(2) > 10


def test_a_fixed_count_never_changes():
    tuner = ThreadTuner((1,))
    assert tuner.fixed
    assert set(serve(tuner, 100, lambda t, i: 0.1)) == {1}
    assert ThreadTuner((2, 2)).fixed


def test_the_engine_chooses_its_threads_from_its_own_step_times(checkpoint, monkeypatch):
    """On CPU the default engine tunes between N - 1 and N threads; steps that take 40 ms longer with N - 1
    make it settle on N (the step time is simulated, far above what load does to a tiny model's real steps:
    the real difference depends on the machine)."""
    import time

    from baichuan2.serve.engine import Engine

    n = torch.get_num_threads()
    fixed = Engine(str(checkpoint), threads=1)
    try:
        assert fixed.tuner.fixed and fixed.tuner.current == 1
    finally:
        fixed.close()
    engine = Engine(str(checkpoint))
    try:
        if n == 1:
            assert engine.tuner.fixed
            return
        assert engine.tuner.choices == [n - 1, n] and engine.tuner.current == n - 1
        step, used = engine.batcher.step, []

        def timed_step():
            step()
            used.append(torch.get_num_threads())
            time.sleep(0.0 if used[-1] == n else 0.040)

        monkeypatch.setattr(engine.batcher, "step", timed_step)
        cfg = engine.sampling(max_new_tokens=120, do_sample=False, stop_token_ids=[])
        done = engine.complete(engine.text_prompt("Hello", 120), cfg)
        assert done.completion_tokens == 120
        assert engine.tuner.current == n and engine.tuner.switches >= 1
        assert used[-60:].count(n) >= 50  # settled: the other count only probed now and then
        assert engine.metrics.registry.get_sample_value("baichuan2_scheduler_threads") == n
    finally:
        engine.close()
