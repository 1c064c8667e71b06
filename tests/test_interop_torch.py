"""``op.torch()`` (issue 15): every generated op as a PyTorch custom operator.

gradcheck (float64, central differences against the derived backward) for every op with
gradients and its attribute variants, and gradgradcheck (double backward) for every op; forward values against ``op.forward``; the fake
(meta) implementation against the real shapes for every op; one op inside
``torch.compile``; integer and data arguments without gradients; optimizers and
schedules refused. The CUDA path (tensors through ``__cuda_array_interface__``) needs a
real GPU and torch built with CUDA: ``test_cuda_tensors`` runs only with
``SYMGRAD_REAL_GPU=1``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import DOCUMENTED_DIFFERENTIABLE, library_kinds, make_inputs, op_cases
from torch._subclasses.fake_tensor import FakeTensorMode

import generated

FUNCTION_KINDS = ("activation", "layer", "loss")


def _tensors(op, arrays, grad=True):
    """Tensors of ``arrays``; the differentiable ones require grad."""
    out = []
    for name, a in zip(op.arg_names, arrays):
        t = torch.from_numpy(np.array(a))
        out.append(t.requires_grad_() if grad and name in op.differentiable else t)
    return out


@pytest.mark.parametrize("case", op_cases())
def test_gradcheck(case, rng):
    op = generated.op(case.name, **case.kw)
    f = op.torch()
    args = _tensors(op, make_inputs(case.name, rng, np.float64, case.kw))
    expected = op.forward(*[a.detach().numpy() for a in args])
    got = f(*args)
    for e, g in zip(expected if isinstance(expected, tuple) else (expected,), got if isinstance(got, tuple) else (got,)):
        assert g.dtype == torch.float64 and tuple(g.shape) == np.shape(e)
        np.testing.assert_array_equal(g.detach().numpy(), e)
    # the whole Jacobian, column by column; the arguments that are data stay fixed
    assert torch.autograd.gradcheck(f, args, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", op_cases(variants=False))
def test_gradgradcheck(case, rng):
    """Double backward (the backward's own vector-Jacobian product from the generated
    jvp and hvp kernels) against finite differences of the backward; fast mode (random
    projections of the second-order Jacobian: any wrong entry breaks it) keeps it cheap."""
    op = generated.op(case.name, **case.kw)
    args = _tensors(op, make_inputs(case.name, rng, np.float64, case.kw))
    assert torch.autograd.gradgradcheck(op.torch(), args, atol=1e-6, rtol=1e-5, fast_mode=True)


def _all_function_ops():
    return [name for name, kind in sorted(library_kinds().items()) if kind in FUNCTION_KINDS]


@pytest.mark.parametrize("name", _all_function_ops())
def test_fake_shapes_match_real(name, rng):
    """The fake implementation (shapes from the op's dimensions) agrees with a real run,
    for every op, including those without gradients (batch_norm2d_stats)."""
    op = generated.op(name)
    f = op.torch()
    args = _tensors(op, make_inputs(name, rng, np.float32), grad=False)
    real = f(*args)
    real = real if isinstance(real, tuple) else (real,)
    with FakeTensorMode() as mode:
        fake = f(*[mode.from_tensor(a) for a in args])
    fake = fake if isinstance(fake, tuple) else (fake,)
    assert [(tuple(t.shape), t.dtype) for t in fake] == [(tuple(t.shape), t.dtype) for t in real]
    assert all(t.dtype == torch.float32 for t in real)  # float32 in, float32 out


@pytest.mark.parametrize("name", ["conv2d", "categorical_nll"])
def test_opcheck(name, rng):
    """torch.library.opcheck: schema, fake tensors, autograd registration and AOT
    dispatch with dynamic shapes (conv2d's derived output size from SymInts; integer
    class indices and a scalar result)."""
    op = generated.op(name, S=2, P=1) if name == "conv2d" else generated.op(name)
    args = _tensors(op, make_inputs(name, rng, np.float64, op.attrs))
    torch.library.opcheck(op.torch().custom_op, args)


def test_every_function_op_is_covered():
    """gradcheck covers every op with gradients: none silently left out."""
    checked = {p.values[0].name for p in op_cases()}
    without = {n for n, d in DOCUMENTED_DIFFERENTIABLE.items() if d == ()}
    assert checked | without == set(_all_function_ops())


def test_integer_and_data_arguments_get_no_gradient(rng):
    lp = torch.log_softmax(torch.randn(5, 4, dtype=torch.float64), dim=1).requires_grad_()
    idx = torch.tensor([0, 3, 3, 1, 2])
    loss = generated.op("categorical_nll").torch()(lp, idx)
    loss.backward()
    expected = torch.nn.functional.nll_loss(lp.detach().requires_grad_(), idx)
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-12, atol=0)
    ids = torch.tensor([1, 1, 4])  # repeated ids: their gradients add up
    table = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    generated.op("embedding").torch()(ids, table).sum().backward()
    assert table.grad[1].tolist() == [2.0] * 3 and table.grad[4].tolist() == [1.0] * 3
    # a loss's target is data: it gets no gradient even when it requires one
    pred = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    generated.op("mse").torch()(pred, target).backward()
    assert pred.grad is not None and target.grad is None


def test_torch_compile_aot_eager(rng):
    """One op inside a compiled graph, forward and backward traced by AOTAutograd
    through the fake implementations, against eager mode."""
    conv = generated.op("conv2d", S=2, P=1).torch()
    x, w, b = (torch.from_numpy(a).requires_grad_() for a in make_inputs("conv2d", rng))

    def model(x, w, b):
        return torch.tanh(conv(x, w, b)).square().sum()

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = compiled(x, w, b)
    grads = torch.autograd.grad(got, (x, w, b))
    expected = model(x, w, b)
    expected_grads = torch.autograd.grad(expected, (x, w, b))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=0)


def test_registration_is_deterministic_and_per_attributes():
    a = generated.op("leaky_relu", slope=0.2).torch()
    assert generated.op("leaky_relu", slope=0.2).torch() is a
    b = generated.op("leaky_relu", slope=0.3).torch()
    assert a.custom_op._qualname != b.custom_op._qualname
    assert a.custom_op._qualname.startswith("symgrad::activations_leaky_relu_")
    # the qualified name follows from the module, the op and its attributes alone
    from codegen.interop import qualified_name

    assert a.custom_op._qualname == "symgrad::" + qualified_name(generated.op("leaky_relu", slope=0.2))


@pytest.mark.parametrize("name", ["adam", "sgd", "cosine"])
def test_optimizers_and_schedules_are_not_torch_functions(name):
    with pytest.raises(TypeError, match=name + " is an? (optimizer|learning-rate schedule)"):
        generated.op(name).torch()


def test_wrong_number_of_tensors():
    with pytest.raises(TypeError, match="mse takes 2 tensors"):
        generated.op("mse").torch()(torch.zeros(2, 2))


def test_cuda_kernels_launch_on_the_given_stream(rng):
    """The CUDA side of the torch path as far as the simulator goes (it has no torch
    CUDA tensors): the stream cell the glue sets is the one the op's kernels launch
    through, and launches and the copy of a scalar result run on that stream."""
    from numba import cuda

    import generated._runtime_cuda as runtime
    from codegen.interop.torch import _call, _stream_cell

    op = generated.op("softmax_cross_entropy", target="cuda")
    cell = _stream_cell(op._funcs["backward"])
    assert cell is runtime._STREAM and cell == [0]
    args = make_inputs("softmax_cross_entropy", rng)
    stream = cuda.stream()
    cell[0] = stream
    try:
        device = [cuda.to_device(a, stream=stream) for a in args]
        loss = _call(op, "forward", device, 0)
        grad = _call(op, "backward", [np.float64(1.5), *device], 0).copy_to_host(stream=stream)
        tangent = _call(op, "jvp", [*device, cuda.to_device(args[0], stream=stream)], 1)
        stream.synchronize()
    finally:
        cell[0] = 0
    cpu = op.on("cpu")
    np.testing.assert_allclose(loss, cpu.forward(*args), rtol=1e-12)
    np.testing.assert_allclose(grad, cpu.backward(1.5, *args), rtol=1e-12)
    np.testing.assert_allclose(tangent, cpu.jvp(*args, tangents=(args[0],)), rtol=1e-12)


@pytest.mark.gpu
def test_cuda_tensors(rng):
    """CUDA tensors through __cuda_array_interface__ on the current stream, against the
    same function on CPU tensors (a real GPU only: the simulator has no torch tensors)."""
    if not torch.cuda.is_available():
        pytest.skip(f"torch {torch.__version__} is a build without CUDA: install a CUDA build of torch to run this on the GPU")
    for name, attrs in (("elu", {"alpha": 0.5}), ("conv2d", {"P": 1}), ("softmax_cross_entropy", {})):
        op = generated.op(name, **attrs)
        f = op.torch()
        cpu = _tensors(op, make_inputs(name, rng, np.float64, attrs))
        gpu = [t.detach().cuda().requires_grad_(t.requires_grad) for t in cpu]
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            out_gpu = f(*gpu)
            out_gpu.sum().backward()
        stream.synchronize()
        out_cpu = f(*cpu)
        out_cpu.sum().backward()
        torch.testing.assert_close(out_gpu.cpu(), out_cpu.detach(), rtol=1e-10, atol=1e-12)
        for c, g in zip(cpu, gpu):
            if c.requires_grad:
                torch.testing.assert_close(g.grad.cpu(), c.grad, rtol=1e-10, atol=1e-12)
