"""python -m gpuad train: end to end (small and fast), its loss curve against the same
training run in torch, reproducibility, its plot, and one-line errors on bad input."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from gpuad import backend as B
from gpuad import nn, train
from gpuad.__main__ import build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(epochs=2, hidden=(32, 32), progress=False)


def _env():
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_importing_gpuad_loads_no_training_dependency():
    code = ("import sys, gpuad, gpuad.nn, gpuad.optim, gpuad.train, gpuad.__main__; "
            "print(sorted(m for m in ('sklearn', 'tqdm', 'matplotlib', 'threadpoolctl', 'torch', 'triton', 'cupy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_end_to_end_with_progress_bar_and_plot(tmp_path):
    png = tmp_path / "curves.png"
    out = subprocess.run([sys.executable, "-m", "gpuad", "train", "--epochs", "2", "--hidden", "32", "--lr", "0.01",
                          "--plot", str(png)], env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    match = re.fullmatch(r"test accuracy: (0\.\d{4}|1\.0000)", lines[-1])
    assert match, lines
    assert float(match.group(1)) > 0.7  # 10 classes: chance is 0.1
    assert lines[-2] == f"wrote {png}"
    timing = re.search(r"2 epochs, (\d+) steps in (\S+) s \((\S+) ms a step\)", out.stdout)
    steps, seconds, ms = int(timing.group(1)), float(timing.group(2)), float(timing.group(3))
    assert steps == 2 * -(-1437 // 64) and seconds > 0  # 3 significant digits: never "0.0 s"
    assert ms * steps / 1e3 == pytest.approx(seconds, rel=0.01)
    assert "train (numpy)" in out.stderr and "loss" in out.stderr  # tqdm's bar with the running loss
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_loss_curve_matches_torch_on_the_same_run():
    """train() against the same model, data, batch order and Adam in torch, float32: the
    per-step losses agree to float32 rounding (the init and the batch order come from one
    numpy Generator seeded by `seed`, in that order)."""
    history = train.train(seed=3, lr=1e-2, label_smoothing=0.1, **SMALL)
    x_train, y_train, _, _ = train.load_digits_split(seed=3)
    rng = np.random.default_rng(3)
    model = nn.MLP([64, 32, 32, 10], rng=rng)
    layers = [torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
              torch.nn.Linear(32, 10)]
    ref = torch.nn.Sequential(*layers)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is fastest, as in train()
    for _ in range(2):
        order = rng.permutation(len(y_train))
        for i in range(0, len(y_train), 64):
            rows = order[i:i + 64]
            loss = loss_fn(ref(torch.from_numpy(x_train[rows])), torch.from_numpy(y_train[rows]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    torch.set_num_threads(threads)
    assert history["steps"] == len(losses) == 2 * 23  # 1437 training images in batches of 64
    np.testing.assert_allclose(history["step_loss"], losses, rtol=2e-5)
    assert history["step_loss"][-1] < 0.5 * history["step_loss"][0]


def test_same_seed_same_run_other_seed_other_run():
    a, b, c = train.train(seed=1, **SMALL), train.train(seed=1, **SMALL), train.train(seed=2, **SMALL)
    assert a["step_loss"] == b["step_loss"] and a["test_accuracy"] == b["test_accuracy"]
    assert a["step_loss"] != c["step_loss"]
    assert len(a["test_accuracy"]) == len(a["train_accuracy"]) == 3 and len(a["epoch_loss"]) == 2


@pytest.mark.gpu
def test_cupy_backend_gives_the_numpy_loss_curve():
    pytest.importorskip("cupy")
    config = dict(seed=0, epochs=2, progress=False)
    on_cpu, on_gpu = train.train(backend="numpy", **config), train.train(backend="cupy", **config)
    assert on_gpu["steps"] == on_cpu["steps"] == 46
    np.testing.assert_allclose(on_gpu["step_loss"], on_cpu["step_loss"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(on_gpu["test_accuracy"], on_cpu["test_accuracy"], atol=2.5 / 360)


@pytest.mark.parametrize("verb_name", ["train", "train-lm"])
def test_help_describes_every_flag(capsys, verb_name):
    with pytest.raises(SystemExit) as e:
        main([verb_name, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    verb = next(a for a in build_parser()._actions if a.dest == "verb").choices[verb_name]
    for action in verb._actions:
        assert action.help, action.option_strings
        assert action.option_strings[-1] in text


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: VERB"),
    (["walk-the-dog"], "invalid choice: 'walk-the-dog'"),
    (["train", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["train", "--epochs", "ten"], "argument --epochs: expected an integer, got 'ten'"),
    (["train", "--lr", "-0.1"], "argument --lr: must be a finite number > 0, got -0.1"),
    (["train", "--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["train", "--label-smoothing", "2"], "argument --label-smoothing: must lie in [0, 1], got 2"),
    (["train", "--hidden", "64,x"], "argument --hidden: expected comma-separated positive integers"),
    (["train", "--backend", "jax"], "argument --backend: invalid choice: 'jax'"),
    (["train", "--optimizer", "lbfgs"], "argument --optimizer: invalid choice"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--plot", "curves.pdf"], "--plot curves.pdf: the file name must end in .png"),
    (["train", "--plot", "no/such/folder/c.png"], "--plot no/such/folder/c.png: folder"),
    (["train", "--plot", "/proc/c.png"], "--plot /proc/c.png: cannot write into folder /proc"),
    (["train", "--seed", "-1"], "argument --seed: must lie in [0, 4294967295], got -1"),  # was a traceback
    (["train", "--seed", "4294967296"], "argument --seed: must lie in [0, 4294967295], got 4294967296"),
    (["train", "--hidden", "1000000,1000000"], "--hidden 1000000,1000000: the MLP 64-1000000-1000000-10 (float32, "
                                                "adam) needs about 2.24e+04 GiB of memory, more than the"),
])
def test_bad_input_exits_non_zero_with_one_line(capsys, argv, message):
    assert_one_line_usage_error(capsys, argv, message)


def assert_one_line_usage_error(capsys, argv, message):
    """`python -m gpuad *argv` exits with status 2, nothing on stdout and one line on stderr
    holding `message`."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], captured.err


@pytest.mark.parametrize("module, argv, package", [
    ("sklearn.datasets", ["train"], "scikit-learn"),
    ("tqdm", ["train"], "tqdm"),
    ("matplotlib", ["train", "--plot", "c.png"], "matplotlib"),
    ("cupy", ["train", "--backend", "cupy"], "CuPy"),
])
def test_missing_dependency_is_one_clear_line(capsys, monkeypatch, module, argv, package):
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    monkeypatch.setitem(B._state, "cuda_device_seen", False)
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and package in lines[0], lines
    assert lines[0].startswith("python -m gpuad train: error:")


@pytest.mark.parametrize("argv, message", [
    (["--steps", "-5"], "argument --steps: must be >= 0, got -5"),  # ran no step and printed an accuracy
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["--lr", "-1"], "argument --lr: must be a finite number > 0, got -1"),
])
def test_demo_refuses_bad_flags(capsys, argv, message):
    from gpuad import demo
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
