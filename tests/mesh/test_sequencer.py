from hypothesis import given
from hypothesis import strategies as st

from mesh.pipeline.sequencer import TokenSequencer, Verdict


def test_in_order_tokens_are_accepted():
    seq = TokenSequencer()
    assert [seq.offer(i, 100 + i) for i in range(3)] == [Verdict.ACCEPTED] * 3
    assert seq.tokens == [100, 101, 102]


def test_duplicates_and_gaps_are_refused():
    seq = TokenSequencer()
    seq.offer(0, 5)
    assert seq.offer(0, 5) is Verdict.DUPLICATE
    assert seq.offer(2, 7) is Verdict.GAP
    assert seq.tokens == [5] and seq.duplicates == 1 and seq.gaps == 1


@given(st.lists(st.integers(0, 20), max_size=60))
def test_accepted_tokens_are_always_a_prefix_in_order(offers):
    seq = TokenSequencer()
    for n in offers:
        seq.offer(n, n * 10)
    assert seq.tokens == [i * 10 for i in range(len(seq.tokens))]
