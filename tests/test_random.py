"""The counter-based generator of the spec language (``uniform``/``normal``, Philox-4x32-10)
and the library dropout that draws its own mask.

The runtime helpers (generated/_runtime.py ``_philox``, ``_uniform``, ``_normal`` and their
CUDA twins) are checked against Random123's known answers and against the independent
NumPy twin in tests/reference.py; dropout's CPU and CUDA (simulator) kernels must draw the
same mask bit for bit, keep about 1 - p, reproduce a (seed, step) and change with the step.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref

# Random123's kat_vectors, philox4x32 10: counter (4 words), key (2 words) -> output (4 words)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _int64(lo, hi) -> int:
    """The int64 whose two 32-bit words are (lo, hi)."""
    v = (hi << 32) | lo
    return v - (1 << 64) if v >= 1 << 63 else v


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_the_numpy_twin_gives_random123s_known_answers(counter, key, expected):
    assert tuple(int(w) for w in ref.philox4x32(counter, key)) == expected


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_the_runtime_helpers_give_random123s_known_answers(counter, key, expected):
    """The compiled helper and its plain-Python body (what the CUDA simulator runs, with
    Python's unbounded integers) take the seed's words as the key and the counter's then
    the step's as the counter."""
    from generated import _runtime

    seed, counter_, step = _int64(*key), _int64(counter[0], counter[1]), _int64(counter[2], counter[3])
    assert _runtime._philox(seed, step, counter_) == expected[:2]
    assert _runtime._philox.py_func(seed, step, counter_) == expected[:2]
    assert tuple(int(w) for w in ref.philox_draw(seed, step, counter_)) == expected


def test_uniform_and_normal_helpers_match_the_twin():
    from generated import _runtime

    draws = [(s, t, c) for s in (0, 5, 2**40 + 3, -7) for t in (1, 2, 2**33) for c in (0, 1, 17, 2**31 + 5)]
    for F in (np.float64, np.float32):
        u = np.array([_runtime._uniform(s, t, c, F) for s, t, c in draws])
        z = np.array([_runtime._normal(s, t, c, F) for s, t, c in draws])
        seeds, steps, counters = (np.array(v, np.int64) for v in zip(*draws))
        # uniform is (2k + 1) / 2**24: exact in both float types
        np.testing.assert_array_equal(u, ref.uniform_twin(seeds, steps, counters))
        np.testing.assert_allclose(z, ref.normal_twin(seeds, steps, counters), rtol=1e-5 if F is np.float32 else 1e-13)
        assert ((u > 0) & (u < 1)).all()


def test_the_draws_have_the_right_moments():
    """2**16 draws of the NumPy twin (checked above against the kernels' helpers)."""
    counter = np.arange(1 << 16, dtype=np.int64)
    u = ref.uniform_twin(3, 1, counter)
    z = ref.normal_twin(3, 1, counter)
    se = 1 / np.sqrt(counter.size)
    assert abs(u.mean() - 0.5) < 5 * se * np.sqrt(1 / 12)
    assert abs(u.var() - 1 / 12) < 5 * se * 0.075
    assert abs(z.mean()) < 5 * se and abs(z.var() - 1) < 5 * se * np.sqrt(2)
    assert abs(np.mean(z**3)) < 5 * se * np.sqrt(15) and abs(np.mean(z**4) - 3) < 5 * se * np.sqrt(96)
    # neighbouring counters and steps are not correlated
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 5 * se
    assert abs(np.corrcoef(u, ref.uniform_twin(3, 2, counter))[0, 1]) < 5 * se


def _mask(target, dtype, p, seed, step, shape=(3, 7)):
    import generated

    op = generated.op("dropout", target=target, p=p, seed=seed, step=step)
    x = np.ones(shape, dtype)
    y = op.forward(x)
    y = y.copy_to_host() if hasattr(y, "copy_to_host") else np.asarray(y)
    return y * (1 - dtype(p))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_draws_the_same_mask_on_cpu_and_cuda(dtype):
    cpu = _mask("cpu", dtype, 0.3, 5, 9)
    gpu = _mask("cuda", dtype, 0.3, 5, 9)
    assert set(np.unique(cpu)) <= {0, 1}
    np.testing.assert_array_equal(cpu, gpu)
    np.testing.assert_array_equal(cpu, ref.dropout_keep((3, 7), 0.3, 5, 9))


def test_dropout_keeps_about_one_minus_p_and_reproduces():
    shape = (64, 250)  # 16000 draws
    for p in (0.1, 0.5):
        m = _mask("cpu", np.float64, p, 1, 1, shape)
        assert abs(m.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / m.size)
    a, b = _mask("cpu", np.float64, 0.5, 1, 1, shape), _mask("cpu", np.float64, 0.5, 1, 1, shape)
    np.testing.assert_array_equal(a, b)
    other_step = _mask("cpu", np.float64, 0.5, 1, 2, shape)
    other_seed = _mask("cpu", np.float64, 0.5, 2, 1, shape)
    for c in (other_step, other_seed):
        assert 0.4 < np.mean(a != c) < 0.6  # independent masks differ in half the places


def test_dropout_backward_uses_the_forward_mask():
    import generated

    rng = np.random.default_rng(0)
    op = generated.op("dropout", p=0.25, seed=3, step=8)
    x, g = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    keep = ref.dropout_keep((4, 6), 0.25, 3, 8)
    np.testing.assert_allclose(op.forward(x), x * keep / 0.75, rtol=1e-15)
    np.testing.assert_allclose(op.backward(g, x), g * keep / 0.75, rtol=1e-15)


def test_a_draw_takes_integers(tmp_path):
    from derive.errors import SpecError
    from derive.spec import load_toml

    path = tmp_path / "bad_draw.toml"
    path.write_text('name = "bad_draw"\nkind = "layer"\nattrs = { seed = 0, p = 0.5 }\ninputs = { x = "B N" }\n'
                    'outputs = { y = "B N" }\nequations = ["y[b,n] = x[b,n] * uniform(seed, p, b*N + n)"]\n')
    with pytest.raises(SpecError, match=r"bad_draw.toml.*uniform\(seed, p, b\*N \+ n\).*takes integers.*p is not one"):
        load_toml(path)
