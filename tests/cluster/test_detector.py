"""The failure detector's fast path: a connection that stays closed."""

from mesh.cluster.detector import DetectorConfig, FailureDetector, Liveness


def test_a_connection_that_stays_closed_is_a_dead_node_sooner_than_silence():
    d = FailureDetector(DetectorConfig())
    for i in range(20):
        d.heartbeat("a", i * 0.1)
    d.link_down("a", 2.0)
    assert d.state("a", 2.1) is not Liveness.DEAD  # a redial may still succeed
    assert d.state("a", 2.35) is Liveness.DEAD  # long before phi alone would say so
    d.link_up("a")  # it came back
    d.heartbeat("a", 2.4)
    assert d.state("a", 2.45) is Liveness.ALIVE


def test_a_heartbeat_after_the_link_dropped_clears_the_suspicion():
    d = FailureDetector(DetectorConfig())
    for i in range(20):
        d.heartbeat("a", i * 0.1)
    d.link_down("a", 2.0)
    d.heartbeat("a", 2.1)  # arrived over the redialed link
    assert d.state("a", 2.5) is Liveness.ALIVE


def test_phi_from_running_sums_equals_phi_over_the_window():
    """The detector keeps running sums; the window's own mean and spread must agree,
    also after thousands of heartbeats have pushed old gaps out of it."""
    import math
    import random

    from mesh.cluster.detector import PhiAccrual

    cfg = DetectorConfig(min_std=0.001)  # so the spread, not the floor, decides
    p = PhiAccrual(cfg)
    rng = random.Random(3)
    now = 0.0
    for i in range(5000):
        now += rng.uniform(0.05, 0.4) if i % 700 < 600 else rng.uniform(1.0, 3.0)
        p.heartbeat(now)
        if i % 97 == 0:
            xs = list(p.intervals)
            mean = sum(xs) / len(xs)
            std = max(math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)), cfg.min_std)
            at = now + mean + 1.5 * std  # phi there depends on both
            want = -math.log10(0.5 * math.erfc(1.5 / math.sqrt(2)))
            assert math.isclose(p.phi(at), want, rel_tol=1e-9, abs_tol=1e-9)
