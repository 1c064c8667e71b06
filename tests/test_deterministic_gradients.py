"""Deterministic CUDA gradients by construction (issue 12, part 4).

Index maps that are bijections through division and modulo (flatten's mixed-radix
digits) are derived as gathers, not scatters (derive/differentiate.py's
``digit_change``); the scatters left (data-dependent indices such as
``table[idx[b], d]``, maps whose digits are not a proven bijection) run with one writer
per element, in a fixed order (codegen/lower.py's ``exclusive_loops``). No generated
CUDA kernel adds with floating-point atomics, and the results are the same bit for bit
from run to run.

CUDA runs under the simulator (tests/conftest.py): shapes are tiny.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import sympy

import reference as ref
from spec_check import TextSpec, build, check_cuda_matches_cpu, check_gradients, make_args

REPO = Path(__file__).resolve().parent.parent
ATOMIC = re.compile(r"\batomic\.")  # cuda.atomic.add(...), or any other atomic operation


def _spec(name, body, sizes, ints=None):
    return TextSpec(f'name = "{name}"\nkind = "layer"\n' + body, sizes=sizes, ints=ints or {})


# every user spec: (spec, whether its gradient is a gather (True) or stays a scatter)
SPECS = {
    # a 2-d input read as 1-d (row-major): two digits, the leading one without a radix
    "reshape_to_1d": (_spec("reshape_to_1d", 'inputs = { x = "H W" }\noutputs = { y = "F" }\ndims = { F = "H*W" }\n'
                            'equations = ["y[j] = x[j // W, j % W]"]\n', {"H": 3, "W": 4}), True),
    # and back: 1-d read as 2-d, already affine (h*W + w)
    "reshape_to_2d": (_spec("reshape_to_2d", 'attrs = { W = 4 }\ninputs = { x = "F" }\noutputs = { y = "H W" }\n'
                            'dims = { H = "F / W" }\nequations = ["y[h, w] = x[h*W + w]"]\n', {"F": 12}), True),
    # unflatten: y[n, c, h] = x[n, c*H + h] (affine; the other direction of flatten)
    "unflatten": (_spec("unflatten", 'attrs = { H = 3 }\ninputs = { x = "N F" }\noutputs = { y = "N C H" }\n'
                        'dims = { C = "F / H" }\nequations = ["y[n, c, h] = x[n, c*H + h]"]\n', {"N": 2, "F": 6}), True),
    # three digits in another order than the axes (channels fastest), every digit named
    # by its own stride: j = c + C h + C H w
    "flatten_channels_last": (_spec(
        "flatten_channels_last", 'inputs = { x = "N C H W" }\noutputs = { y = "N F" }\ndims = { F = "C*H*W" }\n'
        'equations = ["y[n, j] = x[n, j % C, (j // C) % H, j // (C*H)]"]\n', {"N": 2, "C": 2, "H": 3, "W": 2}), True),
    # every digit with a radix: a bijection because the range F = A*B is the product
    "all_radix": (_spec("all_radix", 'inputs = { x = "A B" }\noutputs = { y = "F" }\ndims = { F = "A*B" }\n'
                        'equations = ["y[j] = exp(x[j % A, (j // A) % B])"]\n', {"A": 2, "B": 3}), True),
    # nearest upsampling: one digit of stride S, so each x[n, w] is read by S outputs and
    # its gradient gathers the window j = S*w + t, t < S (S an attribute: not assumed to
    # divide F, the bound j < F stays a guard)
    "upsample": (_spec("upsample", 'attrs = { S = 2 }\ninputs = { x = "N W" }\noutputs = { y = "N F" }\n'
                       'dims = { F = "S*W" }\nequations = ["y[n, j] = tanh(x[n, j // S])"]\n', {"N": 2, "W": 3}), True),
    # the radix W does not cover the range 2W: j and j + W read the same element
    "wrapping": (_spec("wrapping", 'inputs = { x = "N W" }\noutputs = { y = "N F" }\ndims = { F = "2*W" }\n'
                       'equations = ["y[n, j] = sin(x[n, j % W])"]\n', {"N": 2, "W": 3}), False),
    # strides that do not chain (the second digit's stride H is not the first's radix W)
    "broken_chain": (_spec("broken_chain", 'inputs = { x = "N H W" }\noutputs = { y = "N F" }\ndims = { F = "H*W" }\n'
                           'equations = ["y[n, j] = x[n, j // H, j % W]**2"]\n', {"N": 2, "H": 3, "W": 2}), False),
    # a data-dependent scatter with no plain destination index: one sequential writer
    "lookup_1d": (_spec("lookup_1d", 'inputs = { idx = "B" }\nparams = { table = "V" }\noutputs = { y = "B" }\n'
                        'dtypes = { idx = "int" }\nequations = ["y[b] = table[idx[b]]"]\n', {"B": 7, "V": 3},
                        {"idx": "V"}), False),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build(SPECS[name][0], tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def _scatters(program):
    return [a for a in program.backward if a.scatter]


def test_no_float_atomics_in_generated_cuda_modules():
    modules = sorted(REPO.glob("generated/**/*.py"))
    cuda = [p for p in modules if "@cuda.jit" in p.read_text()]
    assert len(cuda) >= 4, f"expected the generated CUDA modules, found {[str(p) for p in cuda]}"
    # the CUDA model twins launch the op modules' kernels: scanned with the rest
    assert [p for p in modules if p.parent.name == "models" and p.name.endswith("_cuda.py")], "no CUDA model modules"
    for p in modules:
        text = p.read_text()
        assert not ATOMIC.search(text), f"{p.relative_to(REPO)} uses an atomic operation"


def test_flatten_gradient_is_a_gather_shown_in_the_derivation():
    import derive

    program = derive.build(next(o for o in derive.library_defs() if o.name == "flatten"))
    assert not _scatters(program)
    (g,) = [a for a in program.backward if a.target == "g_x"]
    assert [str(l.index) for l in g.free] == ["n", "c", "h", "w"]
    read = next(iter(g.body.atoms(sympy.Indexed)))
    c, h, w = (l.index for l in g.free[1:])
    H, W = sympy.Symbol("H", integer=True, positive=True), sympy.Symbol("W", integer=True, positive=True)
    assert str(read.base) == "g_y" and sympy.expand(read.indices[1] - (c * H * W + h * W + w)) == 0
    assert not g.body.has(sympy.Piecewise), "the bounds F = C*H*W proves need no guard"
    assert "mixed-radix digits" in program.latex and "scatter" not in program.latex


@pytest.mark.parametrize("name", sorted(SPECS))
def test_user_spec_gradient_form_and_values(name, built, rng):
    spec, gather = SPECS[name]
    opdef, module = built(name)
    import derive

    program = derive.build(opdef)
    assert bool(_scatters(program)) != gather, f"{name}: expected a {'gather' if gather else 'scatter'}"
    check_gradients(module.op(), make_args(spec, opdef, rng), rng, name)


def _torch_grad(fn, x, gy):
    import torch

    t = torch.tensor(x, requires_grad=True)
    fn(t).backward(torch.tensor(gy))
    return t.grad.numpy()


def test_reshapes_match_torch(built, rng):
    """The digit gathers against PyTorch's reshape and permute (float64)."""
    x = rng.normal(size=(3, 4))
    gy = rng.normal(size=(12,))
    op = built("reshape_to_1d")[1].op()
    np.testing.assert_array_equal(op.forward(x), x.reshape(-1))
    ref.assert_close(op.backward(gy, x), _torch_grad(lambda t: t.reshape(-1), x, gy), np.float64, "reshape to 1-d")
    x = rng.normal(size=(2, 2, 3, 2))
    gy = rng.normal(size=(2, 12))
    op = built("flatten_channels_last")[1].op()
    want = _torch_grad(lambda t: t.permute(0, 3, 2, 1).reshape(2, -1), x, gy)
    np.testing.assert_array_equal(op.forward(x), x.transpose(0, 3, 2, 1).reshape(2, -1))
    ref.assert_close(op.backward(gy, x), want, np.float64, "channels-last flatten")


def test_upsample_matches_torch(built, rng):
    op = built("upsample")[1].op(S=3)
    x = rng.normal(size=(2, 3))
    gy = rng.normal(size=(2, 9))
    want = _torch_grad(lambda t: t.repeat_interleave(3, dim=1).tanh(), x, gy)
    ref.assert_close(op.backward(gy, x), want, np.float64, "nearest upsampling by 3")


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["flatten_channels_last", "upsample", "wrapping", "lookup_1d"])
def test_user_spec_cuda_equals_cpu(name, built, rng):
    spec, _ = SPECS[name]
    opdef, module = built(name)
    assert not ATOMIC.search(Path(module.__file__).with_name(f"{name}_cuda.py").read_text())
    check_cuda_matches_cpu(module, make_args(spec, opdef, rng), rng, name)


def test_scatter_kernels_run_one_writer_per_element(built):
    """The CUDA scatter kernels: a thread per plain destination index, the rest of the
    loops inside it, a plain +=; with no plain destination index, one thread."""
    import generated

    text = (Path(generated.__file__).parent / "layers" / "embedding_cuda.py").read_text()
    kernel = re.search(r"def _embedding_bwd1\(.*?\n\n\n", text, re.S).group(0)
    assert "for b in range(0, B):" in kernel and "g_table[idx[b], d] += " in kernel
    assert re.search(r"_launch\(_embedding_bwd1, D, ", text)
    text = Path(built("lookup_1d")[1].__file__).with_name("lookup_1d_cuda.py").read_text()
    assert re.search(r"_launch\(_lookup_1d_bwd1, 1, ", text), "no plain destination index: one thread"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_embedding_cuda_backward_deterministic_with_repeated_indices(dtype, rng):
    import torch

    import generated

    cpu, gpu = generated.op("embedding"), generated.op("embedding", target="cuda")
    idx = np.array([1, 1, 0, 1, 1, 2, 1, 1, 0, 1, 1, 1], dtype=np.int64)  # row 1 nine times, row 3 never
    table = rng.normal(size=(4, 3)).astype(dtype)
    gy = (rng.normal(size=(12, 3)) * 10.0 ** rng.integers(-4, 4, size=(12, 1))).astype(dtype)  # order matters
    first = gpu.backward(gy, idx, table)
    second = gpu.backward(gy, idx, table)
    np.testing.assert_array_equal(first, second)  # bitwise, run to run
    # the same additions in the same order (batch order) as the CPU kernel: bitwise equal
    np.testing.assert_array_equal(first, cpu.backward(gy, idx, table))
    t = torch.tensor(table.astype(np.float64), requires_grad=True)
    torch.nn.functional.embedding(torch.tensor(idx), t).backward(torch.tensor(gy.astype(np.float64)))
    ref.assert_close(first, t.grad.numpy(), dtype, "embedding backward, cuda vs torch (float64)")
    assert not first[3].any()


@pytest.mark.cuda
def test_flatten_cuda_backward_equals_cpu(rng):
    import generated

    cpu, gpu = generated.op("flatten"), generated.op("flatten", target="cuda")
    x = rng.normal(size=(2, 2, 3, 2))
    gy = rng.normal(size=(2, 12))
    got = gpu.backward(gy, x)
    np.testing.assert_array_equal(got, cpu.backward(gy, x))
    np.testing.assert_array_equal(got, gy.reshape(x.shape))  # a gather moves values exactly
