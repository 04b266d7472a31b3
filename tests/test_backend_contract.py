"""kernels/backend.py declares what a backend offers the trainer; each backend offers exactly that:
every name, every method with the declared parameters (names, order, defaults). The CUDA backend
is checked on the emulated device, which runs the same kernels/cuda.py as the GPU."""
import inspect

import numpy as np
import pytest

import bf16_twins
from kernels import backend, cuda_backend, reference

METHODS = {name: inspect.signature(member) for name, member in vars(backend.Backend).items()
           if inspect.isfunction(member) and not name.startswith("_")}
ATTRIBUTES = backend.Backend.__annotations__


def declared(signature):
    """The parameters a caller passes: the declaration's, without self."""
    return [(p.name, p.default) for p in signature.parameters.values()][1:]


def offered(function):
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]


BACKENDS = [pytest.param(lambda: reference, id="reference"), pytest.param(lambda: bf16_twins, id="bf16-twins"),
            pytest.param(lambda: cuda_backend("emulated"), id="cuda-emulated")]


def test_the_interface_is_the_trainers_vocabulary():
    assert len(METHODS) == 20 and set(ATTRIBUTES) == {"DEVICE", "FLOAT", "GELU_FUSION"}
    assert "adamw" in METHODS and "attention_backward" in METHODS and "scalars" in METHODS


@pytest.mark.parametrize("make", BACKENDS)
def test_each_backend_offers_every_declared_method_with_its_parameters(make):
    K = make()
    for name, signature in METHODS.items():
        assert callable(getattr(K, name, None)), name
        assert offered(getattr(K, name)) == declared(signature), name
    assert isinstance(K.DEVICE, str) and K.FLOAT in (np.float32, np.uint16) and K.GELU_FUSION in (0, 1, 2)


def test_a_drifted_signature_is_seen(monkeypatch):
    """The check above would fail for a backend whose adamw lost its offset parameter."""
    def adamw(params, grads, m, v, master, t, lr, beta1, beta2, eps, weight_decay, grad_scale, seed):
        pass
    monkeypatch.setattr(reference, "adamw", adamw)
    assert offered(reference.adamw) != declared(METHODS["adamw"])
