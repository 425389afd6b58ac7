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
