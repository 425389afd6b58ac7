"""The speed probe (kernels.probe): the model's own layer on the backend, copied past the
cache, timed by one-token decode steps; the score is the best step."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kernels.probe import _copies, measure_decode_rate
from kernels.stage import StageSpec
from kernels.weights import QuantTensor, load_weights

BACKENDS = ["torch", "mlx"]


def _backend(name: str) -> None:
    if name == "mlx":
        pytest.importorskip("mlx.core")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["float32", "quant"])
def test_the_score_is_layers_per_second_of_the_best_step_over_copies_that_exceed_the_budget(model_path, backend,
                                                                                             mode):
    _backend(backend)
    ticks = itertools.count()
    rate = measure_decode_rate(model_path, backend, mode, min_bytes=24 << 20, steps=3,
                               timer=lambda: next(ticks) * 0.01)  # every step "takes" 10 ms
    assert rate.copies * rate.layer_bytes >= 24 << 20 > (rate.copies - 1) * rate.layer_bytes
    assert rate.best_step_s == pytest.approx(0.01)
    assert rate.layers_per_s == pytest.approx(rate.copies / 0.01)
    assert (rate.backend, rate.weight_mode, rate.steps) == (backend, mode, 3)
    assert f"{backend}/{mode}" in rate.describe() and "copies of the model's layer" in rate.describe()


def test_the_copies_are_layer_zero_in_memory_of_their_own(model_path):
    for mode in ("float32", "quant"):
        one = load_weights(model_path, StageSpec(0, 1), mode)
        many = _copies(one, 3)
        assert many.spec == StageSpec(0, 3) and many.config.n_layers == 3
        for name, t in one.tensors.items():
            if not name.startswith("model.layers.0."):
                continue
            copies = [many.tensors[name.replace(".0.", f".{i}.", 1)] for i in range(3)]
            arrays = [c.raw if isinstance(c, QuantTensor) else c for c in copies]
            source = t.raw if isinstance(t, QuantTensor) else t
            assert all(np.array_equal(a, source) for a in arrays)
            assert not any(np.shares_memory(a, b) for a, b in itertools.combinations([source, *arrays], 2))


def test_a_real_measurement_is_positive_and_cheap(model_path):
    rate = measure_decode_rate(model_path, "torch", "float32")
    assert rate.layers_per_s > 0 and rate.copies * rate.layer_bytes >= 96 << 20
    assert rate.seconds < 10  # a probe at every node start: ~0.1-0.7 s of CPU on this machine
