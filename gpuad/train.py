"""Train an MLP on scikit-learn's handwritten digits (8×8 images, 10 classes; shipped with
scikit-learn, no download) with gpuad's tape, its fused linear and softmax cross-entropy, and
its optimizers. The seed fixes the train/test split, the initial weights and the batch order.
The last line printed is ``test accuracy: 0.XXXX``.

    python -m gpuad train [--backend numpy|cupy] [--epochs 30] [--plot curves.png]

Needs the [train] extra (scikit-learn, tqdm; matplotlib for --plot).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from . import backend as B
from . import nn, optim
from .cli import CommandError, check_fits, number, output_file, require, seed_type
from .tensor import Tensor, no_grad

HELP = "train an MLP on scikit-learn's handwritten digits; prints the test accuracy last"
OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD}


def load_digits_split(seed=0, test_fraction=0.2):
    """(x_train, y_train, x_test, y_test): x float32 [n, 64] scaled to [0, 1], y int64 [n];
    a split stratified by class and fixed by `seed`."""
    datasets = require("sklearn.datasets", "scikit-learn", "train")
    model_selection = require("sklearn.model_selection", "scikit-learn", "train")
    x, y = datasets.load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        (x / 16.0).astype(np.float32), y.astype(np.int64), test_size=test_fraction, random_state=seed, stratify=y)
    return x_train, y_train, x_test, y_test


def accuracy(model, x, y):
    """Fraction of rows of x (a backend array) whose arg-max logit is the label y."""
    with no_grad():
        logits = model(Tensor(x)).data
    return float((logits.argmax(axis=1) == y).mean())


def train(*, backend="numpy", epochs=30, batch_size=64, hidden=(256, 256), activation="relu", residual=False,
          optimizer="adam", lr=1e-3, momentum=0.9, weight_decay=0.0, label_smoothing=0.1, test_fraction=0.2,
          dtype="float32", seed=0, threads=1, progress=True):
    """Train and evaluate; returns a dict of lists: ``step_loss`` (every step's batch loss),
    ``epoch_loss`` (mean per epoch), ``train_accuracy`` and ``test_accuracy`` (before training,
    then after each epoch); also ``seconds`` (the training loop's wall time), ``steps``,
    ``n_train``, ``n_test`` and ``sizes`` (the MLP's widths).
    `threads` caps the BLAS threads (None: the library's default); one is fastest for these
    small matrices, and much faster than several on a busy machine."""
    tqdm = require("tqdm", "tqdm", "train").tqdm if progress else None
    threadpoolctl = require("threadpoolctl", "threadpoolctl", "train")
    x_train, y_train, x_test, y_test = load_digits_split(seed, test_fraction)
    with B.use_backend(backend), threadpoolctl.threadpool_limits(limits=threads, user_api="blas"):
        xp = B.module_for(backend)
        x_train, x_test = xp.asarray(x_train.astype(dtype)), xp.asarray(x_test.astype(dtype))
        y_train, y_test = xp.asarray(y_train), xp.asarray(y_test)
        rng = np.random.default_rng(seed)  # initial weights, then the batch order
        model = nn.MLP([x_train.shape[1], *hidden, 10], activation=activation, residual=residual, dtype=dtype,
                       rng=rng)
        options = {"momentum": momentum} if optimizer == "sgd" else {}
        opt = OPTIMIZERS[optimizer](model.parameters(), lr=lr, weight_decay=weight_decay, **options)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        history = {"step_loss": [], "epoch_loss": [], "train_accuracy": [accuracy(model, x_train, y_train)],
                   "test_accuracy": [accuracy(model, x_test, y_test)]}
        n = len(y_train)
        bar = None if tqdm is None else tqdm(total=epochs * -(-n // batch_size), unit="step", leave=False,
                                             desc=f"train ({backend})")
        def status(losses):
            return f"loss {np.mean(losses):.4f}, test acc {history['test_accuracy'][-1]:.4f}"

        start = time.perf_counter()
        for _ in range(epochs):
            order = xp.asarray(rng.permutation(n))
            epoch_losses = []
            for i in range(0, n, batch_size):
                rows = order[i:i + batch_size]
                loss = loss_fn(model(Tensor(x_train[rows])), y_train[rows])
                opt.zero_grad()
                loss.backward()
                opt.step()
                epoch_losses.append(loss.item())
                if bar is not None:  # the running loss of this epoch, drawn at tqdm's pace
                    bar.set_postfix_str(status(epoch_losses), refresh=False)
                    bar.update(1)
            history["step_loss"] += epoch_losses
            history["epoch_loss"].append(float(np.mean(epoch_losses)))
            history["train_accuracy"].append(accuracy(model, x_train, y_train))
            history["test_accuracy"].append(accuracy(model, x_test, y_test))
            if bar is not None:  # and drawn at every epoch's end
                bar.set_postfix_str(status(epoch_losses))
        history["seconds"] = time.perf_counter() - start
        if bar is not None:
            bar.close()
    history.update(steps=len(history["step_loss"]), n_train=n, n_test=len(y_test), sizes=model.sizes)
    return history


def plot_curves(history, path, title=""):
    """Write the loss curve (per step and per epoch) and the accuracy curves to `path` (PNG)."""
    figure = require("matplotlib.figure", "matplotlib", "train")  # no pyplot: no global backend state
    steps_per_epoch = len(history["step_loss"]) / max(len(history["epoch_loss"]), 1)
    epochs = np.arange(len(history["test_accuracy"]))
    fig = figure.Figure(figsize=(11, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(np.arange(1, len(history["step_loss"]) + 1) / steps_per_epoch, history["step_loss"], lw=0.7,
                 alpha=0.5, label="batch")
    ax_loss.plot(epochs[1:] - 0.5, history["epoch_loss"], marker="o", ms=3, label="epoch mean")  # mid-epoch
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss (training)", yscale="log", title="loss")
    ax_acc.plot(epochs, history["train_accuracy"], marker="o", ms=3, label="train")
    ax_acc.plot(epochs, history["test_accuracy"], marker="o", ms=3, label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- the command ----------------------------------------------------------------------------
def _widths(text):
    """--hidden: comma-separated positive integers, or "" / "none" for no hidden layer."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 128,128, got {text!r}")
    return widths


def add_arguments(p):
    d = "(default: %(default)s)"
    p.add_argument("--backend", choices=B.BACKENDS, default="numpy",
                   help=f"array backend: numpy on the CPU, cupy on a CUDA GPU {d}")
    p.add_argument("--epochs", type=number(int, 1), default=30, help=f"passes over the training set {d}")
    p.add_argument("--batch-size", type=number(int, 1), default=64, help=f"images per optimizer step {d}")
    p.add_argument("--hidden", type=_widths, default=(256, 256), metavar="W1,W2,...",
                   help="hidden layer widths, comma-separated (none for a linear model) (default: 256,256)")
    p.add_argument("--activation", choices=sorted(nn.ACTIVATIONS), default="relu", help=f"hidden activation {d}")
    p.add_argument("--residual", action="store_true",
                   help="make hidden layers of equal widths residual blocks y = x + act(Wx + b)")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam", help=f"optimizer {d}")
    p.add_argument("--lr", type=number(float, 0, low_open=True), default=1e-3, help=f"learning rate {d}")
    p.add_argument("--momentum", type=number(float, 0), default=0.9, help=f"SGD momentum (sgd only) {d}")
    p.add_argument("--weight-decay", type=number(float, 0), default=0.0,
                   help=f"weight decay: L2 for adam and sgd, decoupled for adamw {d}")
    p.add_argument("--label-smoothing", type=number(float, 0, 1), default=0.1,
                   help=f"label smoothing of the cross-entropy, in [0, 1] {d}")
    p.add_argument("--test-fraction", type=number(float, 0, 0.9, low_open=True), default=0.2,
                   help=f"fraction of the 1797 images held out for testing {d}")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help=f"parameter dtype {d}")
    p.add_argument("--seed", type=seed_type, default=0,
                   help=f"seed of the train/test split, the initial weights and the batch order {d}")
    p.add_argument("--threads", type=number(int, 1), default=1,
                   help=f"BLAS threads of the numpy backend; one is fastest for these small matrices {d}")
    p.add_argument("--plot", metavar="FILE.png", help="write the loss and accuracy curves to FILE.png (matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


N_IMAGES = 1797  # scikit-learn's digits


def memory_bytes(hidden, dtype="float32", batch_size=64, optimizer="adam"):
    """About the most memory a training run holds: parameters, gradients, the optimizer's
    buffers and an update's temporaries, a batch's activations and their gradients, and the
    evaluation's activations over every image."""
    widths = [64, *hidden, 10]
    n_params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    buffers = 2 if optimizer in ("adam", "adamw") else 1
    rows = min(batch_size, N_IMAGES)
    return np.dtype(dtype).itemsize * (n_params * (4 + buffers) + 3 * rows * sum(widths) + 2 * N_IMAGES * max(widths))


def run(args):
    if args.plot is not None:  # check before training, not after
        output_file(args.plot, "--plot", ".png")
        require("matplotlib", "matplotlib", "train")
    if args.backend == "numpy":
        sizes = "-".join(map(str, [64, *args.hidden, 10]))
        check_fits(memory_bytes(args.hidden, args.dtype, args.batch_size, args.optimizer),
                   f"--hidden {','.join(map(str, args.hidden)) or 'none'}: the MLP {sizes} ({args.dtype}, "
                   f"{args.optimizer})")
    if args.backend == "cupy":
        try:
            B.module_for("cupy")
        except RuntimeError as e:
            raise CommandError(f"--backend cupy: {e}", code=1) from None
    config = {k: v for k, v in vars(args).items() if k not in ("verb", "run", "plot", "no_progress")}
    history = train(**config, progress=not args.no_progress)
    sizes = "-".join(map(str, history["sizes"]))
    title = (f"MLP {sizes} ({args.activation}{', residual' if args.residual else ''}), {args.optimizer} "
             f"lr {args.lr:g}, batch {args.batch_size}, label smoothing {args.label_smoothing:g}, {args.backend} "
             f"{args.dtype}, seed {args.seed}")
    print(f"digits: {history['n_train']} train / {history['n_test']} test images; {title}")
    seconds, steps = history["seconds"], history["steps"]
    print(f"{args.epochs} epochs, {steps} steps in {seconds:.3g} s ({1e3 * seconds / max(steps, 1):.3g} ms a step); "
          f"final epoch: loss {history['epoch_loss'][-1]:.4f}, train accuracy {history['train_accuracy'][-1]:.4f}")
    if args.plot is not None:
        plot_curves(history, args.plot, title)
        print(f"wrote {args.plot}")
    print(f"test accuracy: {history['test_accuracy'][-1]:.4f}")
