"""Train a small decoder-only transformer on the Python standard library's own source (no
download) with gpuad's fused LM head, ``gpuad.torch.LinearCrossEntropy``, as its output layer
and loss. The library's .py files are split into train and validation by file (a hash of each
path); a byte-level BPE tokenizer is trained on the train split at the first run and cached
(--cache-dir). Before training it prints ``baseline loss: X``, the unigram entropy of the
validation tokens in nats; the last line printed is ``val loss: Y``, the model's nats per
token on the validation sample.

    python -m gpuad train-lm [--head gpuad|torch] [--steps N] [--device cpu|cuda] [--compile]
                             [--nproc N] [--plot curves.png] [--sample 200]

--nproc N splits the head's vocabulary over N processes (gloo on the CPU, NCCL on GPUs,
gpuad.torch_parallel); the rest of the model is replicated and the losses are one process's.

Needs torch and the [train] extra (tokenizers, tqdm; matplotlib for --plot).
"""
from __future__ import annotations

import contextlib
import copy
import os
import queue
import tempfile
import time
import tracemalloc
from datetime import timedelta

import numpy as np

from . import lm_data
from .cli import CommandError, number, output_file, require

HELP = "train a small transformer LM on the Python standard library with gpuad's fused LM head"
MiB = 2 ** 20
# The train windows are drawn from the first files of the train split (in hash order) that give
# this many times the tokens a run trains on: more files, less of each file's own identifiers
# to fit (measured: val loss 6.38 with a factor of 8 against 6.52 with 1, at 100 steps of width
# 64 and a vocabulary of 16384). Encoding them is the cost (about 1 MB of source a second).
TRAIN_FILES_FACTOR = 4
# How long a rank of --nproc waits in a collective (the others training the tokenizer included)
# before it fails instead of hanging.
GROUP_TIMEOUT = timedelta(minutes=10)


# --- data ------------------------------------------------------------------------------------
def prepare_data(*, vocab=16384, val_fraction=0.05, max_bytes=None, stdlib=None, cache_dir=None, tokens_needed=None,
                 progress=True, log=print, tokenizer_ready=None):
    """Read the corpus (the library at `stdlib`, default the running Python's), load or train
    the tokenizer (then call `tokenizer_ready`, if given), encode; log a line on each and the
    baseline. Returns a dict: tokenizer, train and val (token ids), baseline (nats)."""
    corpus = lm_data.load_corpus(val_fraction, max_bytes, stdlib)
    log(f"corpus: {corpus.describe()}")
    start = time.perf_counter()
    tokenizer, path, trained = lm_data.load_or_train_tokenizer(
        corpus.train, vocab, lm_data.default_cache_dir() if cache_dir is None else cache_dir, progress)
    log(f"tokenizer: {'trained' if trained else 'loaded'} byte-level BPE, {tokenizer.get_vocab_size()} tokens, in "
        f"{time.perf_counter() - start:.1f} s; {'saved to' if trained else 'cached at'} {path}")
    if tokenizer_ready is not None:
        tokenizer_ready()
    start = time.perf_counter()
    train, val = lm_data.encode(tokenizer, corpus.train, tokens_needed), lm_data.encode(tokenizer, corpus.val)
    baseline = lm_data.unigram_entropy(val, tokenizer.get_vocab_size())
    log(f"encoded {len(train)} train tokens (of the first files the run reads) and {len(val)} validation tokens "
        f"in {time.perf_counter() - start:.1f} s")
    log(f"baseline loss: {baseline:.4f} (unigram entropy of the {len(val)} validation tokens, nats)")
    return dict(tokenizer=tokenizer, train=train, val=val, baseline=baseline)


def train_order(n_tokens, context, n_windows, seed):
    """Start offsets of n_windows windows of context + 1 tokens in a stream of n_tokens: the
    stream cut at stride `context`, in a random order fixed by `seed`, epoch after epoch."""
    available = (n_tokens - 1) // context
    if available < 1:
        raise ValueError(f"the train stream has {n_tokens} tokens: too few for one window of {context + 1}")
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(available) for _ in range(-(-n_windows // available))])
    return order[:n_windows] * context


def val_starts(n_tokens, context, val_tokens):
    """Start offsets of about val_tokens / context windows spread evenly over the validation
    stream (the same for every seed and head)."""
    available = (n_tokens - 1) // context
    if available < 1:
        raise ValueError(f"the validation stream has {n_tokens} tokens: too few for one window of {context + 1}")
    count = min(available, max(1, -(-val_tokens // context)))
    return np.unique(np.linspace(0, available - 1, count).round().astype(np.int64)) * context


def window_batch(torch, stream, starts, context, device):
    """(inputs, targets): int64 [len(starts), context] tensors on `device`."""
    rows = starts[:, None] + np.arange(context + 1)
    ids = torch.from_numpy(stream[rows].astype(np.int64)).to(device)
    return ids[:, :-1], ids[:, 1:]


def evaluate(torch, model, stream, starts, context, batch_size, autocast):
    """The mean loss, in nats per token, of the windows at `starts`."""
    total = 0.0
    with torch.no_grad(), autocast():
        for i in range(0, len(starts), batch_size):
            x, y = window_batch(torch, stream, starts[i:i + batch_size], context, model_device(model))
            total += float(model(x, y)) * x.numel()
    return total / (len(starts) * context)


def model_device(model):
    return next(model.parameters()).device


# --- the head's memory -------------------------------------------------------------------------
def _profiled_cpu_peak(prof):
    """The peak of torch's live CPU bytes over a profile recorded with profile_memory=True,
    from its allocation and free events ("[memory]", with signed sizes) in time order."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def head_peak_memory(torch, head, rows, device, autocast, seed=0):
    """(bytes, method): the peak memory one forward and backward of a copy of `head` takes
    beyond what is live before it, on `rows` random rows. On CUDA from the allocator's peak; on
    the CPU, the peak of torch's allocations from its profiler plus the peak of numpy's from
    tracemalloc (the gpuad head runs numpy there): an upper bound when both allocate."""
    group = getattr(head, "process_group", None)
    head = copy.deepcopy(head, {id(group): group})  # a vocabulary-parallel copy keeps the group
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, head.in_features, generator=g).to(device).requires_grad_()
    targets = torch.randint(0, head.num_classes, (rows,), generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with autocast():
            head(x, targets).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, "CUDA allocator's peak"
    profiler = torch.profiler
    with profiler.profile(activities=[profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        tracemalloc.start()
        with autocast():
            head(x, targets).backward()
        numpy_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return (_profiled_cpu_peak(prof) + numpy_peak,
            "CPU: torch profiler's allocation events plus tracemalloc's peak (numpy arrays)")


# --- training ----------------------------------------------------------------------------------
def build_model(torch, *, head, vocab_size, width, layers, heads, context, seed, device, group=None):
    """The LanguageModel with a `head` ("gpuad" or "torch") head, initialised from `seed`, on
    `device`. With a process `group` (a gpuad head), every rank builds the same whole model and
    keeps only its rows of the head (torch_parallel.shard_head), so N processes start where one
    does."""
    from . import lm_model

    model = lm_model.LanguageModel(lm_model.make_head(head, width, vocab_size), vocab_size, width, layers, heads,
                                   context)
    lm_model.init_parameters(model, seed)
    model = model.to(device)
    if group is not None:
        from . import torch_parallel

        model.head = torch_parallel.shard_head(model.head, group)
    return model


def make_optimizer(torch, model, lr, steps):
    """AdamW (β 0.9, 0.95; weight decay 0.1 on matrices) and its schedule: a linear warm-up
    over min(50, steps / 10) steps, then a cosine decay to lr / 10."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, min(50, steps // 10))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + np.cos(np.pi * (step - warmup) / max(1, steps - warmup)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def eval_steps(steps, eval_every):
    """The steps after which the validation loss is measured: every eval_every (0: none) and
    the last; step 0 (before training) too when eval_every > 0."""
    return sorted({steps} | (set(range(0, steps, eval_every)) if eval_every else set()))


def train_loop(torch, model, data, *, steps, batch_size, context, lr, val_tokens, eval_every, compile, seed,
               autocast, bar, group=None, sync_replicas=True):
    """Train; returns a dict: step_loss, tokens (seen after each step), val (pairs of tokens
    seen and validation loss), seconds (the steps' wall time, evaluations excluded). With a
    process `group` the head's vocabulary is split over it (see parallel_step)."""
    device = model_device(model)
    order = train_order(len(data["train"]), context, steps * batch_size, seed)
    starts = val_starts(len(data["val"]), context, val_tokens)
    opt, schedule = make_optimizer(torch, model, lr, steps)
    forward = torch.compile(model) if compile else model
    history = {"step_loss": [], "tokens": [], "val": [], "seconds": 0.0}
    due = eval_steps(steps, eval_every)

    def validate(step):
        history["val"].append((step * batch_size * context,
                               evaluate(torch, model, data["val"], starts, context, batch_size, autocast)))

    if due[0] == 0:
        validate(0)
    for step in range(1, steps + 1):
        start = time.perf_counter()
        x, y = window_batch(torch, data["train"], order[(step - 1) * batch_size:step * batch_size], context, device)
        with autocast():
            loss = forward(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if group is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        else:
            parallel_step(torch, model, 1.0, group, sync_replicas)
        opt.step()
        schedule.step()
        history["step_loss"].append(loss.item())
        history["tokens"].append(step * batch_size * context)
        history["seconds"] += time.perf_counter() - start
        if step in due:
            validate(step)
        if bar is not None:
            val = f", val {history['val'][-1][1]:.3f}" if history["val"] else ""
            bar.set_postfix_str(f"loss {np.mean(history['step_loss'][-10:]):.3f}{val}", refresh=False)
            bar.update(1)
    return history


# --- the vocabulary-parallel run (--nproc) ---------------------------------------------------------
def _split_params(model):
    """(replicated, sharded): the model's parameters outside the head, and the head's."""
    head = {id(p) for p in model.head.parameters()}
    return ([p for p in model.parameters() if id(p) not in head], list(model.head.parameters()))


def parallel_step(torch, model, max_norm, group, sync_replicas=True):
    """Before the optimizer step of a model whose head holds this rank's rows of the
    vocabulary: average the replicated parameters' gradients over `group` (identical already
    when every kernel is deterministic; this keeps the replicas equal when one is not), then
    clip all gradients to a total norm of max_norm as clip_grad_norm_ would on one process
    (the head's squared norm summed over the ranks)."""
    dist = torch.distributed
    replicated, sharded = _split_params(model)
    rep = [p.grad for p in replicated if p.grad is not None]
    if sync_replicas and rep:
        flat = torch.cat([g.reshape(-1) for g in rep])
        dist.all_reduce(flat, group=group)
        flat /= dist.get_world_size(group)
        for g, new in zip(rep, flat.split([g.numel() for g in rep])):
            g.copy_(new.view_as(g))
    heads = [p.grad for p in sharded if p.grad is not None]
    device = model_device(model)
    head_sq = torch.stack([g.float().square().sum() for g in heads]).sum() if heads else torch.zeros((), device=device)
    dist.all_reduce(head_sq, group=group)
    rep_sq = torch.stack([g.float().square().sum() for g in rep]).sum() if rep else torch.zeros((), device=device)
    total = (rep_sq + head_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in rep + heads:
        g.mul_(coef.to(g.dtype))
    return total


def replicas_identical(torch, model, group):
    """Whether every parameter outside the head is bitwise the same on every rank of `group`
    (a MAX all-reduce of the values and of their negations: max == -max(-p) iff all equal)."""
    flat = torch.cat([p.detach().float().reshape(-1) for p in _split_params(model)[0]])
    both = torch.stack([flat, -flat])
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX, group=group)
    return bool(torch.equal(both[0], -both[1]))


def gathered_head(torch, head):
    """A single-process gpuad LinearCrossEntropy holding the whole vocabulary of a
    vocabulary-parallel `head` (its rows gathered from every rank of its group), on every rank."""
    import gpuad.torch as gt

    group = head.process_group
    world = torch.distributed.get_world_size(group)
    per = -(-head.num_classes // world)  # vocab_slice's rows a rank; the last ranks may hold fewer

    def gather(t):
        padded = torch.zeros((per,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[:t.shape[0]] = t.detach()
        parts = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(parts, padded, group=group)
        return torch.cat(parts)[:head.num_classes]

    full = gt.LinearCrossEntropy(head.in_features, head.num_classes, bias=head.bias is not None,
                                 device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        full.weight.copy_(gather(head.weight))
        if head.bias is not None:
            full.bias.copy_(gather(head.bias))
    return full


def _rank_main(rank, nproc, store_path, threads, config, messages):
    """One rank of a --nproc run: join the group (a FileStore at store_path), train with the
    head's vocabulary split over it; rank 0 sends ("log", line) for each line it logs and
    ("result", history) at the end to the `messages` queue."""
    torch = require("torch", "torch", "bench")
    import gpuad.torch  # noqa: F401 - before the group exists, so destroy_process_group can end it (see gpuad/torch.py)
    dist = torch.distributed
    cuda = config.get("device") == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.FileStore(store_path, nproc), rank=rank,
                            world_size=nproc, timeout=GROUP_TIMEOUT)
    try:
        log = (lambda line: messages.put(("log", line))) if rank == 0 else (lambda line: None)
        with cpu_threads(torch, threads):
            history = train_lm_body(torch, **{**config, "progress": config.get("progress", True) and rank == 0},
                                    log=log, group=dist.group.WORLD)
        if rank == 0:
            messages.put(("result", history))
        dist.barrier()  # every rank's collectives are done before any rank tears the group down
    finally:
        dist.destroy_process_group()


def run_ranks(torch, nproc, threads, config, log=print):
    """Run train_lm_body in `nproc` new processes, the head's vocabulary split over them (gloo
    on the CPU, NCCL with one GPU a rank for device "cuda"); relay rank 0's log lines to `log`
    as they come and return its history. A rank that fails ends the others and raises here."""
    mp = torch.multiprocessing
    messages = mp.get_context("spawn").Queue()
    history = None
    with tempfile.TemporaryDirectory(prefix="gpuad-train-lm-") as tmp:
        ranks = mp.start_processes(_rank_main, args=(nproc, os.path.join(tmp, "store"), threads, config, messages),
                                   nprocs=nproc, join=False, start_method="spawn")
        try:
            done = False
            while not done:
                done = ranks.join(timeout=0.1)
                while True:
                    try:
                        kind, value = messages.get_nowait()
                    except queue.Empty:
                        break
                    if kind == "log":
                        log(value)
                    else:
                        history = value
        finally:
            for process in ranks.processes:
                if process.is_alive():
                    process.terminate()
                    process.join()
    if history is None:
        raise RuntimeError("train-lm --nproc: rank 0 ended without a result")
    return history


@contextlib.contextmanager
def cpu_threads(torch, threads):
    """Run with `threads` threads in torch and in the BLAS that numpy calls (the gpuad head's
    CPU path); restore both after."""
    threadpoolctl = require("threadpoolctl", "threadpoolctl", "train")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpoolctl.threadpool_limits(limits=threads, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


def train_lm(*, threads=1, nproc=1, log=print, **config):
    """Prepare the data, train and evaluate with `threads` CPU threads (a process), the head's
    vocabulary split over `nproc` processes when nproc > 1 (see train_lm_body for the options),
    logging each stage as a line; returns the train_loop's dict plus baseline, val_loss (the
    last validation loss), head_memory (bytes), sample (the generated text, "" when sample is
    0) and, with nproc > 1, replicas_identical (the model outside the head is bitwise the same
    on every rank at the end)."""
    torch = require("torch", "torch", "bench")
    if nproc > 1:
        return run_ranks(torch, nproc, threads, config, log)
    with cpu_threads(torch, threads):
        return train_lm_body(torch, log=log, **config)


def train_lm_body(torch, *, head="gpuad", steps=400, batch_size=16, context=64, width=64, layers=2, heads=4,
                  vocab=16384, lr=1e-2, val_fraction=0.05, val_tokens=16384, max_bytes=None, stdlib=None,
                  eval_every=0, device="cpu", compile=False, seed=0, cache_dir=None, sample=0, prompt="def ",
                  progress=True, log=print, group=None, sync_replicas=True):
    """train_lm's work, under its thread limits; with a process `group` (every rank calls it),
    the head holds this rank's rows of the vocabulary and rank 0 trains the tokenizer first."""
    tqdm = require("tqdm", "tqdm", "train").tqdm if progress else None
    rank = 0 if group is None else torch.distributed.get_rank(group)
    if rank:
        torch.distributed.barrier(group)  # rank 0 has the tokenizer in the cache
    tokenizer_ready = None if rank or group is None else (lambda: torch.distributed.barrier(group))
    data = prepare_data(vocab=vocab, val_fraction=val_fraction, max_bytes=max_bytes, stdlib=stdlib, cache_dir=cache_dir,
                        tokens_needed=TRAIN_FILES_FACTOR * steps * batch_size * context + 1, progress=progress,
                        log=log, tokenizer_ready=tokenizer_ready)
    dev = torch.device(device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else contextlib.nullcontext
    v = data["tokenizer"].get_vocab_size()
    model = build_model(torch, head=head, vocab_size=v, width=width, layers=layers, heads=heads, context=context,
                        seed=seed, device=dev, group=group)
    log(describe_model(torch, model, layers=layers, width=width, heads=heads, context=context, head=head, device=dev,
                       compile=compile))
    rows = batch_size * context
    memory, method = head_peak_memory(torch, model.head, rows, dev, autocast)
    log(f"head peak extra memory{' on rank 0' if group else ''}: {memory / MiB:.1f} MiB for one forward and backward "
        f"of {rows} rows ({method}); the [{rows}, {v}] float32 logits alone are {rows * v * 4 / MiB:.1f} MiB")
    bar = None if tqdm is None else tqdm(total=steps, unit="step", leave=False, desc=f"train-lm ({head} head)")
    history = train_loop(torch, model, data, steps=steps, batch_size=batch_size, context=context, lr=lr,
                         val_tokens=val_tokens, eval_every=eval_every, compile=compile, seed=seed, autocast=autocast,
                         bar=bar, group=group, sync_replicas=sync_replicas)
    if bar is not None:
        bar.close()
    tokens = steps * rows
    log(f"trained {steps} steps, {tokens} tokens in {history['seconds']:.1f} s ({tokens / history['seconds']:.0f} "
        f"tokens/s); mean train loss of the last 10 steps {np.mean(history['step_loss'][-10:]):.4f}")
    history.update(baseline=data["baseline"], val_loss=history["val"][-1][1], head_memory=memory, sample="")
    if group is not None:
        history["replicas_identical"] = replicas_identical(torch, model, group)
        if not history["replicas_identical"]:
            raise RuntimeError("train-lm --nproc: the model outside the head differs between the ranks")
        if sample:
            model.head = gathered_head(torch, model.head)  # every rank takes part in the gather; rank 0 samples
    if sample and rank == 0:
        history["sample"] = sample_text(torch, model, data["tokenizer"], prompt, sample, seed, autocast)
        log(f"sample ({sample} tokens after the prompt {prompt!r}):\n{history['sample']}")
    return history


def describe_model(torch, model, *, layers, width, heads, context, head, device, compile):
    """The log line of the model: its shape, parameters (the whole vocabulary's, with a
    vocabulary-parallel head) and where it runs."""
    lm_head = model.head
    full_head = lm_head.num_classes * (lm_head.in_features + (lm_head.bias is not None))
    n_params = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in lm_head.parameters()) + full_head
    group, split = getattr(lm_head, "process_group", None), ""
    if group is not None:
        dist = torch.distributed
        split = (f", its vocabulary split over {dist.get_world_size(group)} processes ({dist.get_backend(group)}; "
                 f"{lm_head.weight.shape[0]} rows on rank 0)")
    return (f"model: transformer blocks {layers}, width {width}, heads {heads}, context {context}; "
            f"{n_params / 1e6:.2f} M parameters ({lm_head.num_classes * lm_head.in_features / 1e6:.2f} M in the "
            f"head); {head} head{split} on {device.type}{' (bf16 autocast)' if device.type == 'cuda' else ''}"
            f"{', torch.compile' if compile else ''}")


def sample_text(torch, model, tokenizer, prompt, n_tokens, seed, autocast):
    """The prompt followed by n_tokens generated tokens, decoded."""
    from . import lm_model

    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    with autocast():
        ids = lm_model.generate(model, prompt_ids, n_tokens, seed=seed)
    return tokenizer.decode(prompt_ids + ids, skip_special_tokens=False)


def plot_curves(history, path, title=""):
    """Write the train loss (each step's, and its running mean over 20 steps) and the validation
    loss against tokens seen, with the unigram baseline, to `path` (PNG)."""
    figure = require("matplotlib.figure", "matplotlib", "train")
    fig = figure.Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    tokens, losses = np.asarray(history["tokens"]), np.asarray(history["step_loss"])
    ax.plot(tokens, losses, lw=0.6, alpha=0.35, label="train (each step)")
    window = min(20, len(losses))
    ax.plot(tokens[window - 1:], np.convolve(losses, np.ones(window) / window, mode="valid"),
            label=f"train (mean of {window} steps)")
    ax.plot(*zip(*history["val"]), marker="o", ms=4, label="validation")
    ax.axhline(history["baseline"], color="gray", ls="--", lw=1, label="unigram baseline")
    ax.set(xlabel="tokens seen", ylabel="cross-entropy (nats per token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- the command ----------------------------------------------------------------------------
def add_arguments(p):
    d = "(default: %(default)s)"
    p.add_argument("--head", choices=("gpuad", "torch"), default="gpuad",
                   help=f"output layer and loss: gpuad's fused LinearCrossEntropy, or nn.Linear + F.cross_entropy {d}")
    p.add_argument("--steps", type=number(int, 1), default=400, help=f"optimizer steps {d}")
    p.add_argument("--batch-size", type=number(int, 1), default=16, help=f"sequences per step {d}")
    p.add_argument("--context", type=number(int, 2), default=64, help=f"tokens per sequence {d}")
    p.add_argument("--width", type=number(int, 1), default=64, help=f"model width D {d}")
    p.add_argument("--layers", type=number(int, 1), default=2, help=f"transformer blocks {d}")
    p.add_argument("--heads", type=number(int, 1), default=4, help=f"attention heads; they divide --width {d}")
    p.add_argument("--vocab", type=number(int, 512, 65536), default=16384,
                   help=f"BPE vocabulary size, in [512, 65536] (a small corpus may give fewer tokens) {d}")
    p.add_argument("--lr", type=number(float, 0, low_open=True), default=1e-2, help=f"peak learning rate {d}")
    p.add_argument("--val-fraction", type=number(float, 0, 0.5, low_open=True), default=0.05,
                   help=f"fraction of the files (by a hash of the path) held out for validation {d}")
    p.add_argument("--val-tokens", type=number(int, 1), default=16384,
                   help=f"tokens of the validation sample the val loss is measured on {d}")
    p.add_argument("--max-bytes", type=number(int, 1), default=None,
                   help="read only about this many bytes of the library (default: all of it)")
    p.add_argument("--stdlib", metavar="DIR",
                   help="read the .py files under DIR, another Python's standard library (default: this Python's)")
    p.add_argument("--eval-every", type=number(int, 0), default=0,
                   help="measure the val loss every N steps too (default 0: only at the end; with --plot, "
                        "ten times along the run)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help=f"where to train; cuda runs in bf16 autocast {d}")
    p.add_argument("--compile", action="store_true", help="wrap the model in torch.compile for training")
    p.add_argument("--seed", type=int, default=0,
                   help=f"seed of the initial weights, the batch order and the sample {d}")
    p.add_argument("--threads", type=number(int, 1), default=1,
                   help=f"CPU threads of torch and of numpy's BLAS (in each process); more are faster only on idle "
                        f"cores {d}")
    p.add_argument("--nproc", type=number(int, 1, 64), default=1, metavar="N",
                   help="split the head's vocabulary over N processes (gloo on the CPU; NCCL and one GPU a process "
                        f"with --device cuda), the rest of the model replicated; the same losses as one process {d}")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where the tokenizer is cached (default: $GPUAD_CACHE_DIR, else gpuad/ in "
                        "$XDG_CACHE_HOME or ~/.cache)")
    p.add_argument("--plot", metavar="FILE.png", help="write the train and val loss against tokens seen to FILE.png")
    p.add_argument("--sample", type=number(int, 0), default=0, metavar="N",
                   help="at the end, print N tokens generated after --prompt (default 0: none)")
    p.add_argument("--prompt", default="def ", help=f"the text --sample continues {d}")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_cache_dir(path):
    """Create the folder `path` (for --cache-dir) or raise a CommandError saying why it cannot."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise CommandError(f"--cache-dir {path}: cannot create this folder ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise CommandError(f"--cache-dir {path}: this folder is not writable")


def check_nproc(torch, args):
    """Raise a CommandError when --nproc cannot run as asked."""
    if args.nproc == 1:
        return
    if args.head != "gpuad":
        raise CommandError(f"--nproc {args.nproc} needs --head gpuad: the vocabulary-parallel head is gpuad's")
    if not torch.distributed.is_available():
        raise CommandError(f"--nproc {args.nproc}: this torch has no torch.distributed", code=1)
    if args.device == "cuda" and args.nproc > torch.cuda.device_count():
        raise CommandError(f"--nproc {args.nproc} with --device cuda needs a GPU a process; torch sees "
                           f"{torch.cuda.device_count()}", code=1)


def run(args):
    if args.width % args.heads:
        raise CommandError(f"--heads {args.heads} must divide --width {args.width}")
    if args.sample and not args.prompt:
        raise CommandError("--prompt must not be empty: --sample continues it")
    if args.plot is not None:
        output_file(args.plot, "--plot", ".png")
        require("matplotlib", "matplotlib", "train")
    if args.stdlib is not None and not os.path.isfile(os.path.join(args.stdlib, "os.py")):
        raise CommandError(f"--stdlib {args.stdlib}: not a standard library folder (it has no os.py)")
    torch = require("torch", "torch", "bench")
    require("tokenizers", "tokenizers", "train")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: torch sees no CUDA device", code=1)
    check_nproc(torch, args)
    args.cache_dir = lm_data.default_cache_dir() if args.cache_dir is None else args.cache_dir
    check_cache_dir(args.cache_dir)
    if args.plot is not None and not args.eval_every:
        args.eval_every = max(1, args.steps // 10)
    config = {k: v for k, v in vars(args).items() if k not in ("verb", "run", "plot", "no_progress")}
    history = train_lm(**config, progress=not args.no_progress)
    if args.plot is not None:
        plot_curves(history, args.plot, f"{args.layers}-layer transformer, width {args.width}, {args.head} head, "
                                        f"vocabulary {args.vocab}, seed {args.seed}")
        print(f"wrote {args.plot}")
    print(f"val loss: {history['val_loss']:.4f}")
