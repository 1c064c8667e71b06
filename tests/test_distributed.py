"""Data-parallel training with MPI (examples/distributed.py, ``train.py --distributed``).

On one rank the data-parallel step (``loss_and_grads``, the allreduce, the model's
optimizer op per parameter) computes what the model's fused ``train_step`` computes;
two ranks under ``mpiexec -n 2`` (loopback TCP) reach the parameters of a run in one
process after the same global batches, across a resume; bad set-ups say what is wrong.
The mpiexec tests skip without mpi4py and an ``mpiexec`` (``pip install '.[mpi]'``; the
test extra brings both). As root, Open MPI's mpiexec needs OMPI_ALLOW_RUN_AS_ROOT=1 and
OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, set here for the child processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
TRAIN = EXAMPLES / "train.py"
# float64: the only difference between the runs is the order of the gradient sums
RTOL, ATOL = 1e-10, 1e-12


@pytest.fixture(scope="module")
def examples():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import distributed
        import train
        import trainer
    finally:
        sys.path.remove(str(EXAMPLES))
    return trainer, distributed, train


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


needs_mpi = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or _mpiexec() is None,
    reason="needs mpi4py and mpiexec (pip install '.[mpi]': mpi4py and Open MPI wheels)",
)


def _mpi_env() -> dict:
    env = dict(os.environ)
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",  # the CI runs as root
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_btl="self,tcp",  # loopback only
        OMPI_MCA_btl_tcp_if_include="lo",
        OPENBLAS_NUM_THREADS="1",
        OMP_NUM_THREADS="1",
        NUMBA_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    return env


def _mpirun(n: int, *args: str) -> subprocess.CompletedProcess:
    over = ["--oversubscribe"] if n > (os.cpu_count() or 1) else []
    cmd = [_mpiexec(), "-n", str(n), *over, sys.executable, str(TRAIN), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_mpi_env(), cwd=REPO, timeout=300)


def _checkpoint(trainer, path) -> dict:
    return trainer.load_checkpoint(path)


def _assert_same_run(a: dict, b: dict):
    assert a["epoch"] == b["epoch"]
    assert sorted(a["params"]) == sorted(b["params"]) and sorted(a["state"]) == sorted(b["state"])
    for key in a["params"]:
        np.testing.assert_allclose(b["params"][key], a["params"][key], rtol=RTOL, atol=ATOL, err_msg=key)
    for key in a["state"]:
        np.testing.assert_allclose(b["state"][key], a["state"][key], rtol=RTOL, atol=ATOL, err_msg=key)
    for ha, hb in zip(a["history"], b["history"], strict=True):
        for k in ("loss", "test_loss", "test_accuracy", "lr"):
            assert hb[k] == pytest.approx(ha[k], rel=1e-10), k
    # the same shuffling state: the next epoch draws the same order
    assert a["rng"].bit_generator.state == b["rng"].bit_generator.state


def test_one_rank_step_is_the_fused_train_step(examples):
    """loss_and_grads, the (one-rank) allreduce and the optimizer op per parameter
    give what the fused train_step gives (float64; a changing learning rate)."""
    trainer, distributed, _ = examples
    from generated.models import mlp_digits as model

    rng = np.random.default_rng(3)
    fused = model.init(1, dtype=np.float64)
    fused_state = model.init_state(fused)
    mine = {k: v.copy() for k, v in fused.items()}
    mine_state = model.init_state(mine)
    dp = distributed.DataParallel(distributed.Group(), batch_size=6)
    dp.attach(model)
    for step in range(4):
        n = 6 if step < 3 else 5  # a last, smaller batch
        x = rng.normal(size=(n, 64))
        y = np.eye(10)[rng.integers(0, 10, n)]
        lr = 0.01 / (step + 1)
        want = model.train_step(fused, fused_state, x, y, lr=lr)
        got = dp.step(mine, mine_state, x, y, lr=lr)
        assert got == pytest.approx(float(want), rel=1e-13)
    assert mine_state["t"] == fused_state["t"] == 4
    for key in fused:
        np.testing.assert_allclose(mine[key], fused[key], rtol=1e-13, atol=1e-15, err_msg=key)
    for key in fused_state:
        np.testing.assert_allclose(mine_state[key], fused_state[key], rtol=1e-13, atol=1e-15, err_msg=key)
    assert dp.timings["steps"] == 4


def test_shards_are_contiguous_and_cover_the_batch(examples):
    _, distributed, _ = examples
    for n, size in ((32, 2), (29, 2), (1, 2), (10, 4), (7, 3)):
        bounds = [distributed.shard(n, r, size) for r in range(size)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [hi - lo for lo, hi in bounds]
        assert max(sizes) - min(sizes) <= 1
        if n % size == 0:
            assert sizes == [n // size] * size


@needs_mpi
def test_two_ranks_match_one_process_and_resume(examples, tmp_path):
    """The digits MLP in float64, batch 32 (the last batch of an epoch has 29 samples,
    split 14/15): one epoch on two ranks, then a resumed second epoch, against the same
    run in one process with the fused step."""
    trainer, _, _ = examples
    common = ["--model", "mlp_digits", "--dtype", "float64", "--batch-size", "32", "--seed", "5", "--no-progress", "--no-plot"]
    ref = tmp_path / "one"
    config = dict(spec=str(trainer.EXAMPLES["mlp_digits"].spec), out=str(ref), dataset="digits", batch_size=32, seed=5, dtype="float64", progress=False, plot=False)
    trainer.train(trainer.Config(epochs=1, **config), log=lambda *a: None)
    ref_1 = _checkpoint(trainer, ref / trainer.CHECKPOINT)
    trainer.train(trainer.Config(epochs=2, resume=True, **config), log=lambda *a: None)
    ref_2 = _checkpoint(trainer, ref / trainer.CHECKPOINT)

    out = tmp_path / "two"
    first = _mpirun(2, *common, "--epochs", "1", "--out", str(out), "--distributed")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("epoch   1/1") == 1, first.stdout  # rank 0 alone prints
    assert "data-parallel on 2 ranks: each computes 16 samples of every batch of 32" in first.stdout
    _assert_same_run(ref_1, _checkpoint(trainer, out / trainer.CHECKPOINT))

    second = _mpirun(2, *common, "--epochs", "2", "--out", str(out), "--distributed", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("resuming mlp_digits") == 1, second.stdout
    _assert_same_run(ref_2, _checkpoint(trainer, out / trainer.CHECKPOINT))
    metrics = json.loads((out / trainer.METRICS).read_text())
    assert metrics["ranks"] == 2 and metrics["epochs"] == 2
    assert sorted(p.name for p in out.iterdir()) == [trainer.CHECKPOINT, trainer.METRICS]


@needs_mpi
def test_batch_that_does_not_divide_fails_clearly(tmp_path):
    proc = _mpirun(2, "--model", "mlp_digits", "--batch-size", "31", "--epochs", "1", "--out", str(tmp_path / "r"), "--distributed")
    assert proc.returncode != 0
    assert "error: --distributed: the batch size 31 does not divide by the 2 ranks" in proc.stderr
    assert "--batch-size 30" in proc.stderr
    assert not (tmp_path / "r" / "checkpoint.npz").exists()


def test_without_mpi4py_the_message_says_how_to_install(tmp_path):
    """No mpi4py (hidden here): --distributed stops with the install command."""
    code = (
        "import sys; sys.modules['mpi4py'] = None; sys.path.insert(0, sys.argv[1]); import train; "
        "sys.exit(train.main(sys.argv[2:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(EXAMPLES), "--model", "mlp_digits", "--epochs", "1", "--out", str(tmp_path), "--distributed"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "error: --distributed needs mpi4py and an MPI library" in proc.stderr
    assert "pip install 'symgrad[mpi]'" in proc.stderr


def test_mpiexec_without_distributed_is_refused(examples, monkeypatch, capsys, tmp_path):
    """Under mpiexec without --distributed every process would train and write alone."""
    _, _, train = examples
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert train.main(["--model", "mlp_digits", "--epochs", "1", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "started by mpiexec as one of 2 processes without --distributed" in err
    assert not (tmp_path / "r").exists()
