"""python -m gpuad train-lm: a tiny run end to end, the tokenizer cache, the corpus split, the
two heads' first steps and memory, --compile, --nproc 2 against one process, and one-line
errors on bad flags before any work."""
import contextlib
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from gpuad import lm_data, lm_model, train_lm
from gpuad.__main__ import build_parser, main  # train-lm --help: tests/test_train.py
from test_train import assert_one_line_usage_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a few steps of a tiny model on about 200 kB of the library, with a 512-token vocabulary
TINY = dict(steps=6, batch_size=8, context=32, width=32, layers=1, heads=2, vocab=512, max_bytes=200_000,
            val_tokens=1024, progress=False)
TINY_ARGV = ["--steps", "6", "--batch-size", "8", "--context", "32", "--width", "32", "--layers", "1", "--heads", "2",
             "--vocab", "512", "--max-bytes", "200000", "--val-tokens", "1024"]


def _env():
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One tokenizer cache for the module's runs (never the user's)."""
    return str(tmp_path_factory.mktemp("cache"))


def test_importing_gpuad_loads_no_lm_dependency():
    code = ("import sys, gpuad, gpuad.train_lm, gpuad.lm_data, gpuad.__main__; "
            "print(sorted(m for m in ('torch', 'tqdm', 'tokenizers', 'matplotlib', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_tiny_run_then_a_second_run_reuses_the_tokenizer(tmp_path, capsys):
    png, cache = tmp_path / "lm.png", tmp_path / "cache"
    argv = [sys.executable, "-m", "gpuad", "train-lm", *TINY_ARGV, "--cache-dir", str(cache), "--plot", str(png),
            "--sample", "12", "--prompt", "import "]
    first = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.strip().splitlines()
    [cached] = os.listdir(cache)
    assert any(line.startswith("tokenizer: trained") and line.endswith(str(cache / cached)) for line in lines)
    baseline = [float(m.group(1)) for m in map(re.compile(r"baseline loss: (\d+\.\d{4}) ").match, lines) if m]
    assert len(baseline) == 1 and 3 < baseline[0] < np.log(512)
    assert lines.index(next(line for line in lines if line.startswith("baseline loss"))) < lines.index(
        next(line for line in lines if line.startswith("trained 6 steps")))
    assert re.search(r"head peak extra memory: \d+\.\d MiB .*CPU: torch profiler", first.stdout)
    assert "sample (12 tokens after the prompt 'import '):\nimport " in first.stdout
    assert lines[-2] == f"wrote {png}" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    match = re.fullmatch(r"val loss: (\d+\.\d{4})", lines[-1])
    assert match and float(match.group(1)) < np.log(512)  # below the initial loss of a uniform guess
    assert "train-lm (gpuad head)" in first.stderr  # tqdm's bar
    mtime = os.path.getmtime(cache / cached)
    assert main(argv[3:-6] + ["--no-progress"]) == 0  # the same run in this process, without --plot and --sample
    second = capsys.readouterr()
    assert "tokenizer: loaded byte-level BPE, 512 tokens" in second.out and str(cache / cached) in second.out
    assert os.listdir(cache) == [cached] and os.path.getmtime(cache / cached) == mtime
    assert second.out.strip().splitlines()[-1] == lines[-1]  # same seed, same run
    assert "train-lm" not in second.err  # --no-progress


@pytest.fixture(scope="module")
def one_process_run(cache_dir):
    """The tiny run with the gpuad head on one process, and a sample of 8 tokens."""
    return train_lm.train_lm(cache_dir=cache_dir, log=lambda line: None, sample=8, **TINY)


def test_both_heads_take_the_same_first_steps(cache_dir, one_process_run):
    """Same seed: the same weights, batches and first-step loss whichever head; the gpuad head's
    losses then follow torch's to float32 rounding."""
    runs = {"gpuad": one_process_run,
            "torch": train_lm.train_lm(head="torch", cache_dir=cache_dir, log=lambda line: None, **TINY)}
    gpuad, ref = runs["gpuad"]["step_loss"], runs["torch"]["step_loss"]
    assert gpuad[0] == pytest.approx(ref[0], rel=1e-6) and gpuad[0] == pytest.approx(np.log(512), abs=0.05)
    np.testing.assert_allclose(gpuad, ref, rtol=1e-4)
    assert runs["gpuad"]["val_loss"] == pytest.approx(runs["torch"]["val_loss"], rel=1e-4)
    assert gpuad[-1] < gpuad[0]


def test_two_processes_take_the_steps_of_one(cache_dir, one_process_run):
    """--nproc 2: the head's vocabulary split over two gloo processes gives one process's
    per-step losses, val loss and sample; rank 0 alone logs. The gradients outside the head are
    not averaged here (sync_replicas=False), so the replicas staying bitwise equal shows they
    were equal on both ranks at every step."""
    lines = []
    two = train_lm.train_lm(nproc=2, cache_dir=cache_dir, log=lines.append, sample=8, sync_replicas=False, **TINY)
    np.testing.assert_allclose(two["step_loss"], one_process_run["step_loss"], rtol=1e-5)
    assert two["val_loss"] == pytest.approx(one_process_run["val_loss"], rel=1e-5)
    assert two["replicas_identical"] is True
    assert two["sample"] == one_process_run["sample"] and two["sample"].startswith("def ")
    assert sum(line.startswith("baseline loss: ") for line in lines) == 1
    assert any("gpuad head, its vocabulary split over 2 processes (gloo; 256 rows on rank 0) on cpu" in line
               for line in lines)


def test_a_failing_rank_ends_the_run_with_its_error(cache_dir):
    with pytest.raises(Exception, match="head must be one of"):
        train_lm.train_lm(nproc=2, head="nope", cache_dir=cache_dir, log=lambda line: None, **TINY)


def test_parallel_step_clips_by_the_norm_of_the_whole_model(tmp_path):
    """On a one-rank group the vocabulary-parallel step (averaging, then clipping by the global
    norm) is clip_grad_norm_; the two-rank case is the test above."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        models = [train_lm.build_model(torch, head="gpuad", vocab_size=64, width=16, layers=1, heads=2, context=8,
                                       seed=0, device=torch.device("cpu"), group=group)
                  for group in (None, dist.group.WORLD)]
        ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
        for model in models:
            (100 * model(ids[:, :-1], ids[:, 1:])).backward()
        want = torch.nn.utils.clip_grad_norm_(models[0].parameters(), 1.0)
        got = train_lm.parallel_step(torch, models[1], 1.0, dist.group.WORLD)
        assert float(got) == pytest.approx(float(want), rel=1e-5) and float(want) > 1
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_head_memory_is_measured_on_the_cpu():
    """The torch head holds its [N, V] float32 logits (and their gradient); gpuad's holds a
    chunk of rows at a time, so with N above a chunk it takes less."""
    rows, d, v = 8192, 8, 512
    logits = rows * v * 4
    used = {}
    for kind in ("gpuad", "torch"):
        head = lm_model.make_head(kind, d, v)
        used[kind], method = train_lm.head_peak_memory(torch, head, rows, torch.device("cpu"), contextlib.nullcontext)
        assert "torch profiler" in method and "tracemalloc" in method
    assert used["torch"] >= 2 * logits
    assert logits / 8 < used["gpuad"] < used["torch"] / 2


def test_compile_wraps_the_model(cache_dir, monkeypatch):
    compiled = []

    def fake_compile(model, **kw):
        compiled.append(model)
        return model
    monkeypatch.setattr(torch, "compile", fake_compile)
    train_lm.train_lm(compile=True, cache_dir=cache_dir, log=lambda line: None, **{**TINY, "steps": 1})
    assert len(compiled) == 1 and isinstance(compiled[0], lm_model.LanguageModel)


@pytest.mark.gpu
def test_cuda_run_in_bf16_matches_the_torch_head(cache_dir):
    runs = {head: train_lm.train_lm(head=head, device="cuda", cache_dir=cache_dir, log=lambda line: None, **TINY)
            for head in ("gpuad", "torch")}
    np.testing.assert_allclose(runs["gpuad"]["step_loss"], runs["torch"]["step_loss"], rtol=2e-2)
    assert runs["gpuad"]["head_memory"] > 0


# --- the corpus and the tokenizer ---------------------------------------------------------------
def test_source_files_and_the_split_by_path(tmp_path):
    for rel in ("a.py", "pkg/b.py", "pkg/c.txt", "site-packages/x.py", "pkg/dist-packages/y.py", "__pycache__/z.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    assert lm_data.source_files(str(tmp_path)) == ["a.py", "pkg/b.py"]
    paths = [f"m{i}/f{i}.py" for i in range(2000)]
    train, val = lm_data.split_files(paths, 0.1)
    assert sorted(train + val) == sorted(paths) and not set(train) & set(val)
    assert 150 < len(val) < 250
    assert lm_data.split_files(paths[::-1], 0.1) == (train, val)  # by path only
    assert set(lm_data.split_files(paths, 0.2)[1]) > set(val)  # a larger fraction only adds files


def test_corpus_of_another_library(tmp_path):
    for i in range(40):
        (tmp_path / f"m{i}.py").write_text(f"x = {i}\n")
    corpus = lm_data.load_corpus(val_fraction=0.25, root=str(tmp_path))
    assert corpus.version is None and corpus.n_files == 40 and len(corpus.train) + len(corpus.val) == 40
    assert corpus.describe().startswith(f"the standard library, 40 .py files under {tmp_path}; read: train ")
    assert lm_data.load_corpus(max_bytes=1000).describe().startswith(f"Python {sys.version.split()[0]}'s standard library, ")


def test_read_files_keeps_under_max_bytes(tmp_path):
    for name, size in (("a.py", 50), ("b.py", 500), ("c.py", 30)):
        (tmp_path / name).write_bytes(b"#" * size)
    assert [len(t) for t in lm_data.read_files(str(tmp_path), ["a.py", "b.py", "c.py"], max_bytes=100)] == [50, 30]
    assert [len(t) for t in lm_data.read_files(str(tmp_path), ["b.py", "a.py"], max_bytes=100)] == [500]
    assert len(lm_data.read_files(str(tmp_path), ["a.py", "b.py", "c.py"])) == 3


def test_tokenizer_is_cached_by_corpus_and_size(tmp_path):
    texts = [b"def f(x):\n    return x + 1\n" * 20, b"import os\nprint(os.getcwd())\n" * 20]
    tok, path, trained = lm_data.load_or_train_tokenizer(texts, 300, str(tmp_path), progress=False)
    assert trained and os.path.dirname(path) == str(tmp_path) and os.listdir(tmp_path) == [os.path.basename(path)]
    again, path2, trained2 = lm_data.load_or_train_tokenizer(texts, 300, str(tmp_path), progress=False)
    assert (path2, trained2) == (path, False) and again.get_vocab() == tok.get_vocab()
    assert lm_data.tokenizer_path(str(tmp_path), 400, texts) != path
    assert lm_data.tokenizer_path(str(tmp_path), 300, texts[:1]) != path
    ids = lm_data.encode(tok, texts)
    eof = tok.token_to_id(lm_data.END_OF_FILE)
    assert ids.dtype == np.uint16 and list(ids).count(eof) == 2 and ids[-1] == eof
    assert tok.decode(list(ids), skip_special_tokens=True) == b"".join(texts).decode()
    assert len(lm_data.encode(tok, texts, min_tokens=1, files_per_batch=1)) < len(ids)  # the first file is enough


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GPUAD_CACHE_DIR", str(tmp_path / "mine"))
    assert lm_data.default_cache_dir() == str(tmp_path / "mine")
    monkeypatch.delenv("GPUAD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert lm_data.default_cache_dir() == str(tmp_path / "gpuad")


def test_unigram_entropy_and_windows():
    assert lm_data.unigram_entropy(np.array([0, 1, 2, 3] * 5, dtype=np.uint16), 10) == pytest.approx(np.log(4))
    order = train_lm.train_order(n_tokens=101, context=10, n_windows=25, seed=0)
    assert sorted(order[:10]) == sorted(order[10:20]) == list(range(0, 100, 10))  # each window once an epoch
    starts = train_lm.val_starts(n_tokens=1001, context=10, val_tokens=200)
    assert len(starts) == 20 and starts[0] == 0 and starts[-1] == 990
    assert list(train_lm.val_starts(n_tokens=41, context=10, val_tokens=10**6)) == [0, 10, 20, 30]


def test_generate_is_seeded():
    model = train_lm.build_model(torch, head="gpuad", vocab_size=64, width=16, layers=1, heads=2, context=8, seed=0,
                                 device=torch.device("cpu"))
    with train_lm.cpu_threads(torch, 1):  # as in train-lm; more threads only wait on each other for these sizes
        a, b, c = (lm_model.generate(model, [1, 2, 3], 20, seed=seed) for seed in (5, 5, 6))
    assert a == b and len(a) == 20 and all(0 <= i < 64 for i in a)
    assert c != a


# --- flags ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["--vocab", "100"], "argument --vocab: must lie in [512, 65536], got 100"),
    (["--head", "jax"], "argument --head: invalid choice: 'jax'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--lr", "0"], "argument --lr: must be a finite number > 0, got 0"),
    (["--val-fraction", "0.9"], "argument --val-fraction: must lie in (0, 0.5], got 0.9"),
    (["--max-bytes", "lots"], "argument --max-bytes: expected an integer, got 'lots'"),
    (["--width", "128", "--heads", "3"], "--heads 3 must divide --width 128"),
    (["--sample", "5", "--prompt", ""], "--prompt must not be empty"),
    (["--plot", "curves.pdf"], "--plot curves.pdf: the file name must end in .png"),
    (["--plot", "no/such/folder/c.png"], "--plot no/such/folder/c.png: folder"),
    (["--cache-dir", "{file}/sub"], "--cache-dir {file}/sub: cannot create this folder"),
    (["--stdlib", "{file}"], "--stdlib {file}: not a standard library folder"),
    (["--nproc", "0"], "argument --nproc: must lie in [1, 64], got 0"),
    (["--nproc", "2", "--head", "torch"], "--nproc 2 needs --head gpuad"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_fail_in_one_line_before_any_work(capsys, monkeypatch, tmp_path, argv, message):
    monkeypatch.setattr(lm_data, "load_corpus", lambda *a, **k: pytest.fail("the corpus was read"))
    afile = tmp_path / "afile"
    afile.write_text("")
    argv = [a.replace("{file}", str(afile)) for a in argv]
    assert_one_line_usage_error(capsys, ["train-lm", *argv], message.replace("{file}", str(afile)))


def test_nproc_beyond_the_gpus_is_one_clear_line(capsys, monkeypatch):
    monkeypatch.setattr(lm_data, "load_corpus", lambda *a, **k: pytest.fail("the corpus was read"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["train-lm", "--device", "cuda", "--nproc", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "python -m gpuad train-lm: error: --nproc 2 with --device cuda needs a GPU a process; torch sees 1"


def test_cuda_without_a_device_is_one_clear_line(capsys, monkeypatch):
    monkeypatch.setattr(lm_data, "load_corpus", lambda *a, **k: pytest.fail("the corpus was read"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train-lm", "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "python -m gpuad train-lm: error: --device cuda: torch sees no CUDA device"


@pytest.mark.parametrize("module, argv, package", [
    ("tokenizers", [], "tokenizers"),
    ("torch", [], "torch"),
    ("matplotlib", ["--plot", "c.png"], "matplotlib"),
])
def test_missing_dependency_is_one_clear_line(capsys, monkeypatch, module, argv, package):
    monkeypatch.setattr(lm_data, "load_corpus", lambda *a, **k: pytest.fail("the corpus was read"))
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    assert main(["train-lm", *argv]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"this needs {package}" in lines[0], lines
    assert lines[0].startswith("python -m gpuad train-lm: error:")


def test_the_commands_in_docs_parse():
    """Every `python -m gpuad train-lm ...` command in docs/train-lm.md is valid for the parser."""
    with open(os.path.join(ROOT, "docs", "train-lm.md"), encoding="utf-8") as f:
        commands = re.findall(r"^python -m gpuad (train-lm.*)$", f.read(), flags=re.M)
    assert len(commands) >= 3
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command))
        assert args.verb == "train-lm"
