"""The CUDA twins of model specs (generated/models/<name>_cuda.py, codegen/templates/
model/model_cuda.py.jinja) under the simulator: each model's CUDA training step equals
its CPU step over several steps (float64, tight tolerance), a model with an unrolled
cell is refused at build time, ``examples/train.py --device cuda`` trains and resumes,
and every kernel a model step launches compiles to PTX for sm_90 (the models' files are
scanned for atomics with the rest of generated/ in tests/test_deterministic_gradients.py).

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
    # a graph: h1 is read by relu and add, so its gradient is the sum of two parts
    "residual": """
name = "tiny_residual"
kind = "model"
input = 3
layers = [
  { op = "dense", out = 4, name = "h1" }, { op = "relu" },
  { op = "dense", out = 4, name = "h2" }, { op = "add", inputs = ["h2", "h1"] },
  { op = "dense", out = 3 },
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


OPS = ("add", "dense", "relu", "conv2d", "max_pool2d", "flatten", "rnn_cell", "softmax_cross_entropy", "bce_with_logits", "adam", "momentum")


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
    assert train.main(args + ["--epochs", "1", "--device", "cuda"]) == 0
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
                gpu.train_step(params, state, x.astype(dtype), y.astype(dtype), read_loss=False)
    unique = sorted(set(launches))
    assert any(k.endswith("_f32") for _, k, _ in unique) and len(unique) > 20
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
