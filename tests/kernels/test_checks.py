"""trusted_inputs(): the hot launchers skip their argument checks inside it, in its thread only, and check again
after it, an exception included."""

import threading

import pytest
import torch

from scaleinfer.kernels import rms_norm as rms_norm_module
from scaleinfer.kernels.checks import checking, trusted_inputs


def test_trusted_inputs_turns_checks_off_in_its_thread_only_and_back_on():
    seen = []
    assert checking()
    with pytest.raises(RuntimeError), trusted_inputs():
        assert not checking()
        other = threading.Thread(target=lambda: seen.append(checking()))
        other.start()
        other.join()
        with trusted_inputs():
            assert not checking()
        assert not checking()  # the inner one restores the outer's state
        raise RuntimeError("leaves the block")
    assert checking() and seen == [True]


def test_a_launcher_checks_outside_and_not_inside(monkeypatch, device, triton_path):
    calls = []
    monkeypatch.setattr(rms_norm_module, "_check", lambda *args: calls.append(len(args)))
    x, weight = torch.randn(2, 32, device=device), torch.ones(32, device=device)
    expected = rms_norm_module.rms_norm_triton(x, weight, 1e-5)
    assert calls == [3]
    with trusted_inputs():
        got = rms_norm_module.rms_norm_triton(x, weight, 1e-5)
    assert calls == [3] and torch.equal(got, expected)
