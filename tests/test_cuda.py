"""Every op's CUDA target computes what its CPU target computes.

Under Numba's CUDA simulator (the default, see conftest.py) the shapes are tiny and the
launches few: the simulator runs every thread in Python. With SYMGRAD_REAL_GPU=1 the
same tests run on the device, and the ``gpu`` tests add shapes that span many blocks
and GEMM tiles.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref

pytestmark = pytest.mark.cuda

CASES = ref.op_cases(variants=False)
DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")
OPT_STEPS = 3
# Shapes that cross block and tile boundaries (real GPU only).
LARGE = {"B": 67, "I": 129, "O": 33, "C": 1030}


def ops(case: ref.OpCase):
    import generated

    return generated.op(case.name, **case.kw), generated.op(case.name, target="cuda", **case.kw)


def check_forward(case, dtype, rng, sizes=None):
    cpu, gpu = ops(case)
    args = ref.make_inputs(case.name, rng, dtype, case.kw, sizes)
    expected = ref.run_forward(cpu, args)
    got = ref.run_forward(gpu, args)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert isinstance(g, (np.ndarray, np.generic)), "NumPy in, NumPy out"
        assert np.shape(g) == np.shape(e) and g.dtype == np.dtype(dtype)
        ref.assert_close(g, e, dtype, f"{case.id} forward, cuda vs cpu")


def check_backward(case, dtype, rng, sizes=None):
    cpu, gpu = ops(case)
    args = ref.make_inputs(case.name, rng, dtype, case.kw, sizes)
    seeds = ref.make_seeds(ref.run_forward(cpu, args), rng, dtype)
    expected = ref.run_backward(cpu, seeds, args)
    got = ref.run_backward(gpu, seeds, args)
    assert len(got) == len(expected)
    for name, g, e in zip(cpu.differentiable, got, expected):
        assert isinstance(g, np.ndarray) and g.shape == e.shape and g.dtype == np.dtype(dtype)
        ref.assert_close(g, e, dtype, f"{case.id}: gradient of {name}, cuda vs cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_forward_equals_cpu(case, dtype, rng):
    check_forward(case, dtype, rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_backward_equals_cpu(case, dtype, rng):
    check_backward(case, dtype, rng)


def test_attributes_reach_the_cuda_kernels(rng):
    import generated

    x = rng.normal(size=(3, 5))
    cpu, gpu = generated.op("leaky_relu", slope=0.3), generated.op("leaky_relu", target="cuda", slope=0.3)
    assert gpu.attrs == pytest.approx({"slope": 0.3})
    ref.assert_close(gpu.forward(x), cpu.forward(x), np.float64)
    ref.assert_close(gpu.backward(np.ones_like(x), x), cpu.backward(np.ones_like(x), x), np.float64)


def is_device_array(a) -> bool:
    """A Numba device array (the simulator's too), not a host NumPy array."""
    return not isinstance(a, np.ndarray) and hasattr(a, "copy_to_host")


def test_device_arrays_in_device_arrays_out(rng):
    from numba import cuda

    import generated

    x, w, b = ref.make_inputs("dense", rng)
    cpu, gpu = generated.op("dense"), generated.op("dense", target="cuda")
    y = gpu.forward(*(cuda.to_device(a) for a in (x, w, b)))
    assert is_device_array(y), "device arrays in, device arrays out"
    ref.assert_close(y.copy_to_host(), cpu.forward(x, w, b), np.float64)
    gy = rng.normal(size=y.shape)
    grads = gpu.backward(cuda.to_device(gy), *(cuda.to_device(a) for a in (x, w, b)))
    for g, e in zip(grads, cpu.backward(gy, x, w, b)):
        assert is_device_array(g)
        ref.assert_close(g.copy_to_host(), e, np.float64)


# ---------------------------------------------------------------- optimizers


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_step_equals_cpu(name, dtype, rng):
    import generated

    cpu, gpu = generated.op(name), generated.op(name, target="cuda")
    p0 = rng.normal(size=(3, 5)).astype(dtype)
    grads = rng.normal(size=(OPT_STEPS, 3, 5)).astype(dtype)
    results = []
    for op in (cpu, gpu):
        p = p0.copy()
        state = op.init_state(p)
        for t, g in enumerate(grads, start=1):
            op.step(p, g, *state, t=t, **op.hyper)
        results.append((p, state))
    (p_cpu, s_cpu), (p_gpu, s_gpu) = results
    assert not np.array_equal(p_cpu, p0)
    ref.assert_close(p_gpu, p_cpu, dtype, f"{name}: parameters, cuda vs cpu")
    for k, (a, b) in enumerate(zip(s_gpu, s_cpu)):
        ref.assert_close(np.asarray(a), b, dtype, f"{name}: state {k}, cuda vs cpu")


def test_optimizer_step_on_device_arrays(rng):
    from numba import cuda

    import generated

    cpu, gpu = generated.op("adam"), generated.op("adam", target="cuda")
    p0 = rng.normal(size=(3, 5))
    grads = rng.normal(size=(OPT_STEPS, 3, 5))
    p_cpu = p0.copy()
    s_cpu = cpu.init_state(p_cpu)
    p_dev = cuda.to_device(p0)
    s_dev = tuple(cuda.to_device(s) for s in cpu.init_state(p0))
    for t, g in enumerate(grads, start=1):
        cpu.step(p_cpu, g, *s_cpu, t=t, **cpu.hyper)
        gpu.step(p_dev, cuda.to_device(g), *s_dev, t=t, **gpu.hyper)
    ref.assert_close(p_dev.copy_to_host(), p_cpu, np.float64)


# ---------------------------------------------------------------- real GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_large_shapes_equal_cpu(case, dtype, rng):
    check_forward(case, dtype, rng, LARGE)
    check_backward(case, dtype, rng, LARGE)
