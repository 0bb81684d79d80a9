"""The corpus and tokenizer of ``python -m gpuad train-lm``: the ``.py`` files of the running
Python's standard library, split into train and validation by file, and a byte-level BPE
tokenizer trained on the train split with the ``tokenizers`` package, cached on disk.

The split depends on a file's path only (CRC-32 of its path relative to the library's root),
so a file lands in the same split on every machine and every Python version that has it.
Imports nothing beyond the standard library and numpy; ``tokenizers`` loads when needed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import sysconfig
import zlib

import numpy as np

from .cli import require

END_OF_FILE = "<|endoffile|>"  # the token between two files of the token stream
_SKIPPED_FOLDERS = {"site-packages", "dist-packages", "__pycache__"}  # third-party code, not the library's
_TOKENIZER_FORMAT = "bytelevel-bpe-1"  # part of the cache key: change it when the tokenizer's recipe changes


def stdlib_root():
    """The folder of the running Python's standard library."""
    return sysconfig.get_paths()["stdlib"]


def source_files(root):
    """Sorted paths (relative to `root`, '/'-separated) of the .py files under `root`, outside
    site-packages and dist-packages."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [s for s in subfolders if s not in _SKIPPED_FOLDERS]
        rel = os.path.relpath(folder, root)
        found += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files if f.endswith(".py")]
    return sorted(found)


def split_files(paths, val_fraction):
    """(train, val): a path goes to val when the CRC-32 of its UTF-8 bytes is below
    val_fraction · 2³²; each list is in the order of that hash (a fixed shuffle)."""
    keyed = sorted((zlib.crc32(p.encode("utf-8")), p) for p in paths)
    cut = val_fraction * 2 ** 32
    return [p for h, p in keyed if h >= cut], [p for h, p in keyed if h < cut]


def read_files(root, paths, max_bytes=None):
    """The bytes of the files `paths` under `root`, in order, skipping a file that would take
    the total past `max_bytes` (None: read all); the first file is always read."""
    texts, total = [], 0
    for p in paths:
        full = os.path.join(root, *p.split("/"))
        if texts and max_bytes is not None and total + os.path.getsize(full) > max_bytes:
            continue
        with open(full, "rb") as f:
            texts.append(f.read())
        total += len(texts[-1])
    return texts


@dataclasses.dataclass
class Corpus:
    """The train and validation files (bytes each) of a standard library, where it lies, and
    its Python version (None when it is not the running Python's)."""
    root: str
    version: str | None
    n_files: int
    train: list
    val: list

    def describe(self):
        mb = [sum(map(len, texts)) / 1e6 for texts in (self.train, self.val)]
        name = "the standard library" if self.version is None else f"Python {self.version}'s standard library"
        return (f"{name}, {self.n_files} .py files under {self.root}; read: train {len(self.train)} files "
                f"({mb[0]:.1f} MB), validation {len(self.val)} files ({mb[1]:.2f} MB)")


def load_corpus(val_fraction=0.05, max_bytes=None, root=None):
    """The Corpus of the standard library at `root` (default: the running Python's). With
    max_bytes, about that many bytes are read, split between train and validation in the
    proportion val_fraction (at least one file each)."""
    version = sys.version.split()[0] if root is None else None
    root = stdlib_root() if root is None else root
    paths = source_files(root)
    train, val = split_files(paths, val_fraction)
    if not train or not val:
        raise ValueError(f"the split of {len(paths)} files at validation fraction {val_fraction} leaves a split empty")
    caps = (None, None) if max_bytes is None else (max_bytes * (1 - val_fraction), max_bytes * val_fraction)
    return Corpus(root, version, len(paths), read_files(root, train, caps[0]),
                  read_files(root, val, caps[1]))


def default_cache_dir():
    """$GPUAD_CACHE_DIR, else gpuad/ under $XDG_CACHE_HOME (%LOCALAPPDATA% on Windows), else
    ~/.cache/gpuad."""
    if os.environ.get("GPUAD_CACHE_DIR"):
        return os.environ["GPUAD_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or (os.environ.get("LOCALAPPDATA") if os.name == "nt" else None)
    return os.path.join(base or os.path.join(os.path.expanduser("~"), ".cache"), "gpuad")


def tokenizer_path(cache_dir, vocab_size, texts):
    """The cache file of the tokenizer trained on `texts` (bytes) with `vocab_size`: its name
    holds a hash of both (and of the recipe), so another corpus or size gets another file."""
    h = hashlib.sha256(f"{_TOKENIZER_FORMAT}\0{vocab_size}\0".encode())
    for t in texts:
        h.update(len(t).to_bytes(8, "little"))
        h.update(t)
    return os.path.join(cache_dir, f"bpe-{vocab_size}-{h.hexdigest()[:16]}.json")


def load_or_train_tokenizer(texts, vocab_size, cache_dir, progress=True):
    """(tokenizer, path, trained): the byte-level BPE tokenizer of `texts` (bytes, decoded as
    UTF-8 with replacement) with at most `vocab_size` tokens, END_OF_FILE among them, loaded
    from `cache_dir` when it is there (trained False), else trained and saved there. The
    trainer's progress bar is shown when `progress` and stdout is a terminal (it writes there)."""
    tk = require("tokenizers", "tokenizers", "train")
    path = tokenizer_path(cache_dir, vocab_size, texts)
    if os.path.exists(path):
        return tk.Tokenizer.from_file(path), path, False
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_FILE],
                                     show_progress=progress and sys.stdout.isatty(),
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((t.decode("utf-8", "replace") for t in texts), trainer, length=len(texts))
    os.makedirs(cache_dir, exist_ok=True)
    partial = f"{path}.{os.getpid()}.partial"  # renamed when complete: a reader never sees half a file
    tokenizer.save(partial)
    os.replace(partial, path)
    return tokenizer, path, True


def encode(tokenizer, texts, min_tokens=None, files_per_batch=64):
    """The token ids (uint16 [n] when the vocabulary fits, else int32) of `texts` in order, each
    file followed by END_OF_FILE; with min_tokens, only the first files that give at least that
    many tokens (all of them when they give fewer)."""
    eof = tokenizer.token_to_id(END_OF_FILE)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2 ** 16 else np.int32
    parts, count = [], 0
    for i in range(0, len(texts), files_per_batch):
        batch = [t.decode("utf-8", "replace") for t in texts[i:i + files_per_batch]]
        for enc in tokenizer.encode_batch_fast(batch, add_special_tokens=False):
            parts += [np.asarray(enc.ids, dtype=dtype), np.array([eof], dtype=dtype)]
            count += len(enc.ids) + 1
        if min_tokens is not None and count >= min_tokens:
            break
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def unigram_entropy(tokens, vocab_size):
    """The entropy, in nats, of the frequencies of the ids in `tokens`: the loss of the best
    model that ignores context, fitted on these very tokens."""
    counts = np.bincount(tokens, minlength=vocab_size)
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())

