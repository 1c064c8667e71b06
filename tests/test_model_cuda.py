"""The CUDA twins of model specs (generated/models/<name>_cuda.py, codegen/templates/
model/model_cuda.py.jinja) under the simulator: each model's CUDA training step equals
its CPU step over several steps (float64, tight tolerance), a model with two named
inputs (int64 token ids and floats, dict batches) too, a step allocates no device memory
after its first with a batch shape, a model with an unrolled cell is refused at build
time, ``examples/train.py --device cuda`` trains and resumes reading back the same per
epoch whatever its number of batches, and every kernel a model step launches compiles
to PTX for sm_90 (the models' files are scanned for atomics with the rest of generated/
in tests/test_deterministic_gradients.py).

The models are tiny specs of the library's examples' shapes (an MLP, a CNN, a logistic
regression) and a residual block (a graph): the simulator runs each CUDA thread as a
Python thread, so a block costs about 0.1 s whatever its work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import codegen
from codegen.model import ModelSpecError

pytestmark = pytest.mark.cuda

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

SPECS = {
    "mlp": """
name = "tiny_mlp"
kind = "model"
input = 5
layers = [{ op = "dense", out = 4 }, { op = "relu" }, { op = "dense", out = 3 }]
loss = "softmax_cross_entropy"
optimizer = { op = "adam", lr = 0.05 }
""",
    "cnn": """
name = "tiny_cnn"
kind = "model"
input = [1, 5, 5]
layers = [
  { op = "conv2d", out = 2, KH = 3, KW = 3, P = 1 },
  { op = "relu" },
  { op = "max_pool2d" },
  { op = "flatten" },
  { op = "dense", out = 3 },
]
loss = "softmax_cross_entropy"
optimizer = { op = "adam", lr = 0.05 }
""",
    # a graph: h1 is read by relu and add, so its gradient is the sum of two parts;
    # layer_norm keeps its mean and reciprocal deviation for its backward (fwd_saving, bwd_saved)
    "residual": """
name = "tiny_residual"
kind = "model"
input = 3
layers = [
  { op = "dense", out = 4, name = "h1" }, { op = "relu" },
  { op = "dense", out = 4, name = "h2" }, { op = "add", inputs = ["h2", "h1"] },
  { op = "layer_norm" }, { op = "dense", out = 3 },
]
loss = "softmax_cross_entropy"
optimizer = { op = "adam", lr = 0.05 }
""",
    "logreg": """
name = "tiny_logreg"
kind = "model"
input = 4
layers = [{ op = "dense", out = 1 }]
loss = "bce_with_logits"
optimizer = { op = "momentum", lr = 0.1 }
""",
}


OPS = ("add", "dense", "embedding", "layer_norm", "relu", "conv2d", "max_pool2d", "flatten", "rnn_cell", "softmax_cross_entropy", "bce_with_logits", "adam", "momentum")


@pytest.fixture(scope="module")
def programs():
    """The library ops the tiny models use (deriving only these is quicker than the library)."""
    import derive

    return [derive.build(d) for d in derive.library_defs() if d.name in OPS]


@pytest.fixture(scope="module")
def built(tmp_path_factory, programs):
    """{kind: (CPU module, CUDA module)} of the tiny specs (what codegen.build writes:
    codegen.model.render_model for each target, then the file imported)."""
    from codegen.model import render_model

    out = tmp_path_factory.mktemp("cuda_models")
    models = {}
    for kind, text in SPECS.items():
        spec = out / f"{kind}.toml"
        spec.write_text(text)
        pair = []
        for target in ("cpu", "cuda"):
            rel, module = render_model(spec, programs, target=target)
            path = out / Path(rel).name
            path.write_text(module)
            pair.append(codegen.load_module(path))
        models[kind] = tuple(pair)
    return models


def batch(model, rng, size=3):
    x = rng.normal(size=(size,) + model.INPUT_SHAPE)
    if model.TASK == "classification":
        y = np.eye(model.OUTPUT)[rng.integers(0, model.OUTPUT, size)]
    elif model.TASK == "binary":
        y = rng.integers(0, 2, (size,) + model.OUTPUT_SHAPE).astype(np.float64)
    else:
        y = rng.normal(size=(size,) + model.OUTPUT_SHAPE)
    return x, y


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_cuda_step_equals_cpu_step(built, kind, rng):
    cpu, gpu = built[kind]
    params = cpu.init(1, np.float64)
    state = cpu.init_state(params)
    dparams = gpu.init(1, np.float64)  # the same draws, on the device
    dstate = gpu.init_state(dparams)
    assert all(hasattr(a, "copy_to_host") for a in [*dparams.values(), *(v for k, v in dstate.items() if k != "t")])
    for step in range(3):
        x, y = batch(cpu, rng)
        if step == 2:  # a batch already on the device stays there
            x = gpu.to_device(x)
        expected = cpu.train_step(params, state, x if step < 2 else gpu.to_host(x), y)
        got = gpu.train_step(dparams, dstate, x, y)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    assert dstate["t"] == state["t"] == 3
    host_params, host_state = gpu.to_host(dparams), gpu.to_host(dstate)
    for key in params:
        np.testing.assert_allclose(host_params[key], params[key], rtol=1e-11, atol=1e-13, err_msg=key)
    for key in state:
        np.testing.assert_allclose(host_state[key], state[key], rtol=1e-11, atol=1e-13, err_msg=key)
    # loss_and_grads, forward and predict on the trained parameters
    x, y = batch(cpu, rng)
    loss, grads = cpu.loss_and_grads(params, x, y)
    dloss, dgrads = gpu.loss_and_grads(dparams, x, y)
    np.testing.assert_allclose(dloss, loss, rtol=1e-12)
    for key in grads:
        np.testing.assert_allclose(gpu.to_host(dgrads[key]), grads[key], rtol=1e-10, atol=1e-13, err_msg=key)
    np.testing.assert_allclose(gpu.to_host(gpu.forward(dparams, x)), cpu.forward(params, x), rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(gpu.predict(dparams, x), cpu.predict(params, x))
    np.testing.assert_allclose(gpu.loss(dparams, x, y), cpu.loss(params, x, y), rtol=1e-12)


def test_cuda_step_reads_back_nothing_unless_asked(built, rng):
    _, gpu = built["mlp"]
    params = gpu.init(0, np.float64)
    state = gpu.init_state(params)
    x, y = batch(gpu, rng)
    loss = gpu.train_step(params, state, gpu.to_device(x), gpu.to_device(y), read_loss=False)
    assert hasattr(loss, "copy_to_host") and loss.shape == (1,)
    with pytest.raises(ValueError, match="device array"):
        gpu.train_step(gpu.to_host(params), state, x, y)  # host parameters cannot be updated in place
    with pytest.raises(NotImplementedError, match="hvp"):
        gpu.hvp(params, x, y, params)


@pytest.fixture
def allocations(monkeypatch):
    """The device allocations made from now on, by name: ``cuda.device_array``,
    ``device_array_like`` and ``to_device`` append to it (every allocation the generated
    modules make goes through them)."""
    from numba import cuda

    made = []
    for fn in ("device_array", "device_array_like", "to_device"):
        original = getattr(cuda, fn)

        def counting(*args, _fn=fn, _original=original, **kwargs):
            made.append(_fn)
            return _original(*args, **kwargs)

        monkeypatch.setattr(cuda, fn, counting)
    return made


def test_cuda_step_allocates_nothing_after_its_first(built, rng, allocations):
    """After the first step with a batch shape (and the first with an epoch's last,
    smaller batch), a step launches kernels only: its arrays, workspaces and staged
    host batches are kept per shape. The loss summed on the device (``loss_sum``) is the
    CPU step's losses times their rows."""
    cpu, gpu = built["mlp"]  # the loss's launchers have workspaces (its log-sum-exp's parts)
    params, dparams = cpu.init(2, np.float64), gpu.init(2, np.float64)
    state, dstate = cpu.init_state(params), gpu.init_state(dparams)
    batches = [batch(cpu, rng, 3), batch(cpu, rng, 2)]  # a full batch and a last, smaller one
    # a data set kept on the device, its batches gathered by their rows (index=, as examples/train.py does)
    data_x, data_y = batch(cpu, rng, 5)
    device_data, order = (gpu.to_device(data_x), gpu.to_device(data_y)), gpu.to_device(np.array([4, 0, 2, 3, 1]))
    for x, y in batches:  # the first step of each shape allocates
        cpu.train_step(params, state, x, y)
        gpu.train_step(dparams, dstate, x, y)
    cpu.train_step(params, state, data_x[[4, 0, 2]], data_y[[4, 0, 2]])
    gpu.train_step(dparams, dstate, *device_data, index=order[:3])
    assert allocations, "the first steps allocate (else this test counts nothing)"
    total = gpu.to_device(np.zeros(1))
    device_x = gpu.to_device(batches[0][0])
    allocations.clear()
    expected = 0.0
    for x, y in batches + [(device_x, batches[0][1])]:
        expected += cpu.train_step(params, state, gpu.to_host(x), y) * len(y)
        loss = gpu.train_step(dparams, dstate, x, y, loss_sum=total)
        assert hasattr(loss, "copy_to_host")
    expected += cpu.train_step(params, state, data_x[[2, 3, 1]], data_y[[2, 3, 1]]) * 3
    gpu.train_step(dparams, dstate, *device_data, loss_sum=total, index=order[2:])
    assert allocations == [], "device allocations in steps after the first"
    np.testing.assert_allclose(total.copy_to_host()[0], expected, rtol=1e-12)
    for key, value in gpu.to_host(dparams).items():
        np.testing.assert_allclose(value, params[key], rtol=1e-11, atol=1e-13, err_msg=key)
    with pytest.raises(ValueError, match="loss_sum must be a one-element float64 device array"):
        gpu.train_step(dparams, dstate, *batches[0], loss_sum=np.zeros(1))
    with pytest.raises(ValueError, match=r"index must be one-dimensional integers in \[0, 5\)"):
        gpu.train_step(dparams, dstate, *device_data, index=np.array([1, 5]))
    with pytest.raises(ValueError, match="with index=, x must be a C-contiguous float64 device array"):
        gpu.train_step(dparams, dstate, data_x, data_y, index=np.array([1, 2]))


TWO_INPUTS = """
name = "tiny_two_inputs"
kind = "model"
inputs = { token = { shape = [], dtype = "int64" }, feats = 3 }
layers = [
  { op = "embedding", V = 5, D = 4, inputs = ["token"], name = "e" },
  { op = "dense", out = 4, inputs = ["feats"], name = "f" },
  { op = "add", inputs = ["e", "f"] }, { op = "relu" },
  { op = "dense", out = 3 },
]
loss = "softmax_cross_entropy"
optimizer = { op = "adam", lr = 0.05 }
"""


def test_a_model_with_several_inputs_trains_on_cuda_as_on_the_cpu(programs, tmp_path, rng):
    """Named inputs, one of integers (token ids, with a repeated id: the embedding's
    gradient gathers them in a fixed order) and one of floats: dict batches from the
    host and on the device (``to_device`` of the dict) give the CPU step's losses and
    parameters over three float64 steps."""
    from codegen.model import render_model

    spec = tmp_path / "tiny_two_inputs.toml"
    spec.write_text(TWO_INPUTS)
    cpu, gpu = (
        codegen.load_module(_written(tmp_path, *render_model(spec, programs, target=target))) for target in ("cpu", "cuda")
    )
    assert gpu.INPUTS == cpu.INPUTS == {"token": ((), "int64"), "feats": ((3,), "float")}
    params, dparams = cpu.init(3, np.float64), gpu.init(3, np.float64)
    state, dstate = cpu.init_state(params), gpu.init_state(dparams)
    for step in range(3):
        x = {"token": np.array([1, 4, 1]), "feats": rng.normal(size=(3, 3))}
        y = np.eye(3)[rng.integers(0, 3, 3)]
        expected = cpu.train_step(params, state, x, y)
        got = gpu.train_step(dparams, dstate, gpu.to_device(x) if step == 2 else x, y)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    for key, value in gpu.to_host(dparams).items():
        np.testing.assert_allclose(value, params[key], rtol=1e-11, atol=1e-13, err_msg=key)
    loss, grads = cpu.loss_and_grads(params, x, y)
    dloss, dgrads = gpu.loss_and_grads(dparams, x, y)
    np.testing.assert_allclose(dloss, loss, rtol=1e-12)
    for key in grads:
        np.testing.assert_allclose(gpu.to_host(dgrads[key]), grads[key], rtol=1e-10, atol=1e-13, err_msg=key)
    np.testing.assert_array_equal(gpu.predict(dparams, x), cpu.predict(params, x))
    with pytest.raises(ValueError, match=r"x must be a dict of arrays named token, feats"):
        gpu.train_step(dparams, dstate, x["feats"], y)
    with pytest.raises(ValueError, match=r"x\['feats'\] must have shape \(B,\) \+ \(3,\) with B = 3"):
        gpu.forward(dparams, {"token": x["token"], "feats": x["feats"][:2]})


def _written(directory, rel, text):
    path = directory / Path(rel).name
    path.write_text(text)
    return path


def test_cuda_step_checks_the_loss_assumption_on_host_targets(built, rng):
    _, gpu = built["mlp"]
    params = gpu.init(0, np.float64)
    x, _ = batch(gpu, rng)
    with pytest.raises(ValueError, match="assumption"):
        gpu.train_step(params, gpu.init_state(params), x, np.full((3, 3), 0.5))


def test_an_unrolled_cell_has_no_cuda_model(programs, tmp_path):
    """A recurrent model (a cell unrolled over time) gets no CUDA module: building one is
    a clear error naming the spec and the layer, and the library has no such twin."""
    from codegen.model import render_model

    spec = tmp_path / "tiny_rnn.toml"
    spec.write_text(SPECS["mlp"].replace("tiny_mlp", "tiny_rnn").replace(
        "input = 5", "input = [3, 2]").replace('{ op = "dense", out = 4 }', '{ op = "rnn_cell", out = 4, unroll = true }'))
    render_model(spec, programs)  # the CPU module is built
    with pytest.raises(ModelSpecError, match=r"tiny_rnn\.toml.*layers\[0\].*unrolled.*no cuda training step"):
        render_model(spec, programs, target="cuda")
    assert not (REPO / "generated" / "models" / "gru_majority_cuda.py").exists()
    assert (REPO / "generated" / "models" / "gru_majority.py").exists()
    assert (REPO / "generated" / "models" / "mlp_digits_cuda.py").exists()


# ------------------------------------------------------------------------- train.py


@pytest.fixture
def tiny_dataset(monkeypatch):
    """A 24-sample, 4-feature, two-class dataset named "tiny" (the simulator cannot run
    a real dataset's batches in CI time)."""
    sys.path.insert(0, str(REPO / "examples"))
    import trainer

    sys.path.remove(str(REPO / "examples"))

    def load():
        rng = np.random.default_rng(5)
        x = rng.normal(size=(24, 4))
        return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64)

    monkeypatch.setitem(trainer.DATASETS, "tiny", trainer.Dataset("tiny", "classification", load, "24 samples"))
    return trainer


def test_train_cli_trains_and_resumes_on_cuda(built, programs, tiny_dataset, tmp_path, capsys, monkeypatch):
    import derive

    monkeypatch.setattr(derive, "library", lambda: programs)  # the model's ops, derived once above
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import train
    finally:
        sys.path.remove(str(REPO / "examples"))
    spec = tmp_path / "tiny_logreg.toml"
    spec.write_text(SPECS["logreg"])
    out = tmp_path / "run"
    args = [str(spec), "--dataset", "tiny", "--batch-size", "10", "--dtype", "float64", "--out", str(out), "--no-progress"]
    # what is read back from the device: the same per epoch whatever the number of batches
    from numba import cuda

    device_array = type(cuda.to_device(np.zeros(1)))
    reads = []
    copy_to_host = device_array.copy_to_host
    monkeypatch.setattr(device_array, "copy_to_host", lambda self, *a, **k: reads.append(self.shape) or copy_to_host(self, *a, **k))
    assert train.main(args + ["--epochs", "1", "--device", "cuda"]) == 0
    per_epoch = list(reads)
    small = [a if a != "10" else "3" for a in args[:-3]] + ["--out", str(tmp_path / "small"), "--no-progress", "--no-plot"]
    reads.clear()
    assert train.main(small + ["--epochs", "1", "--device", "cuda"]) == 0  # 7 batches instead of 2
    assert sorted(reads) == sorted(per_epoch), "a read back per batch"
    assert (out / "checkpoint.npz").exists() and (out / "model" / "tiny_logreg_cuda.py").exists()
    ckpt = tiny_dataset.load_checkpoint(out / "checkpoint.npz")
    assert all(isinstance(v, np.ndarray) for v in ckpt["params"].values())  # written from the host copy
    assert train.main(args + ["--epochs", "2", "--device", "cuda", "--resume", "--no-plot"]) == 0
    assert "resuming tiny_logreg" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["config"]["device"] == "cuda"
    # the same run on the CPU gives the same history (float64)
    cpu_out = tmp_path / "cpu"
    args_cpu = [a if a != str(out) else str(cpu_out) for a in args]
    assert train.main(args_cpu + ["--epochs", "2", "--no-plot"]) == 0
    cpu_metrics = json.loads((cpu_out / "metrics.json").read_text())
    for got, want in zip(metrics["history"], cpu_metrics["history"]):
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-10)
        np.testing.assert_allclose(got["test_loss"], want["test_loss"], rtol=1e-10)


# ------------------------------------------------------------------------------ PTX


def test_every_model_step_kernel_compiles_to_ptx_for_sm90(built, tmp_path, rng):
    """The kernels one training step of the tiny models launches in float32 (the op
    tests compile every kernel in both float types), with the argument types the step gives them, compile for a GPU (tests/cuda_ptx.py,
    as tests/test_cuda_ptx.py does for each op alone); float32 ones without float64."""
    from conftest import REAL_GPU
    from test_cuda_ptx import recorded_launches

    if REAL_GPU:
        pytest.skip("on a real GPU the steps above compiled every kernel for the device itself")
    launches = []
    for kind in ("cnn", "logreg", "residual"):  # the CNN's ops include the MLP's, launched with the same types; the residual adds add
        _, gpu = built[kind]
        for dtype in (np.float32,):
            params = gpu.init(0, dtype)
            state = gpu.init_state(params)
            x, y = batch(gpu, rng, 2)
            with recorded_launches(launches):
                # the loss summed on the device, as examples/train.py does (_add_scaled)
                # (and the batch gathered from device data by its rows, as examples/train.py does: _gather_rows)
                gpu.train_step(params, state, gpu.to_device(x.astype(dtype)), gpu.to_device(y.astype(dtype)),
                               loss_sum=gpu.to_device(np.zeros(1, dtype)), index=gpu.to_device(np.array([1, 0])))
    unique = sorted(set(launches))
    assert any(k.endswith("_f32") for _, k, _ in unique) and len(unique) > 20
    # the fused-step variants' kernels (forward-saving, saved and params-only backward) and the loss's sum are among them
    assert {"_add_scaled", "_gather_rows", "_max_pool2d_fwd_saving0", "_layer_norm_fwd_saving0"} <= {k for _, k, _ in unique}
    (tmp_path / "launches.json").write_text(json.dumps([{"module": m, "kernel": k, "types": list(t)} for m, k, t in unique]))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(TESTS / "cuda_ptx.py"), str(tmp_path / "launches.json"), str(tmp_path / "results.json")],
                          env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, f"tests/cuda_ptx.py failed:\n{proc.stderr[-4000:]}"
    results = json.loads((tmp_path / "results.json").read_text())
    failed = [f"{r['kernel']}({', '.join(r['types'])}): {r['error']}" for r in results if r["error"]]
    assert not failed, "model-step kernels that do not compile for a GPU:\n" + "\n".join(failed)
    promoted = [f"{r['kernel']}: {r['float64']}" for r in results if r["float64"]]
    assert not promoted, "float32 kernels with float64 instructions:\n" + "\n".join(promoted)
