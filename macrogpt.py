"""macrogpt: a small GPT in one standard-library Python file that chats and keeps learning.

Contract
  * `python macrogpt.py` chats in the terminal. It answers at once from the corpus field (an n-gram
    model of the living corpus), trains its network in the background, and hands the voice over to
    the network as held-out evidence says it has earned it.
  * Training runs data-parallel in worker processes, one per core, never in the chat's way.
  * The field also teaches the network: part of each training target is its next-token distribution.
  * New conversation is learned in bursts by appended low-rank delta adapters over a frozen base;
    when no burst is due, idle learning rehearses the whole living corpus. Every burst and idle
    phase is judged on a held-out slice against the best state so far, and rolled back if worse.
  * Text is byte-level BPE whose vocabulary only grows; no trained weight is ever invalidated.
  * The network moves to and from the Hugging Face Llama format (--export, --import).
  * Standard library only, CPython 3.7 to 3.13.

Deliberately left out: GPUs, numpy, batching across users, anything that needs a network.

Run it:      python macrogpt.py            (see --help)
Benchmark:   python macrogpt.py --bench
Tests:       python -m unittest            (from the repository root)
"""

import sys

# Checked before `import dataclasses` (3.6 has none). Python 2 cannot parse the print below, and
# the SyntaxError it shows is that very line, so the need is named there too.
if sys.version_info < (3, 7):
    print("macrogpt: error: needs Python 3.7 or newer; this is Python %d.%d" % sys.version_info[:2], file=sys.stderr)
    sys.exit(2)

import signal

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # a Ctrl+C during the imports below ends quietly; main() takes it over

import argparse
import array
import asyncio
import base64
import bisect
import contextlib
import dataclasses
import functools
import gc
import hashlib
import heapq
import json
import math
import multiprocessing
import multiprocessing.connection
import operator
import os
import random
import re
import shutil
import sqlite3
import struct
import textwrap
import threading
import time
import warnings
from dataclasses import asdict, dataclass, fields
from collections import Counter
import itertools
from itertools import chain, repeat

try:
    import fcntl                                   # POSIX file locks
except ImportError:
    fcntl = None
try:
    import msvcrt                                  # Windows file locks
except ImportError:
    msvcrt = None

VERSION = "0.1.0"


# ======================================================================================
# Errors: one small family for bad files and bad input; `assert` is for our own bugs.
# ======================================================================================

class MacroError(Exception):
    """A problem the user can act on; main() prints it as one line and exits with code 2."""


class ConfigError(MacroError):
    pass


def read_bytes(path, what, error=MacroError):
    """The whole file, or `error` with one line naming what could not be read and why."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise error("cannot read %s%s: %s" % (what + " " if what else "", path, e.strerror or e))


class CheckpointError(MacroError):
    pass


# ======================================================================================
# Config: every knob, grouped by subsystem. Edit the defaults here to resize the model.
# ======================================================================================

_KIND_NAMES = {"int": "an integer", "float": "a finite number", "bool": "true or false"}
MAX_FIELD_ORDER = 16                      # field_order 1000 spent minutes counting a 40-line corpus


def _is_kind(value, kind):
    """Whether value fits a Config field annotated `kind` (bool is not an int here)."""
    if kind == "bool" or isinstance(value, bool):
        return kind == "bool" and isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int)
    if isinstance(value, int):                     # exact; math.isfinite(10**400) raises OverflowError
        return abs(value) <= sys.float_info.max
    return isinstance(value, float) and math.isfinite(value)


def field_kind(name):
    """'int', 'float' or 'bool': the annotation of Config field `name`."""
    f = {f.name: f for f in fields(Config)}[name]
    return f.type if isinstance(f.type, str) else f.type.__name__


@dataclass
class Config:
    # model
    n_layer: int = 2
    n_embd: int = 72
    n_head: int = 4                      # head_dim = n_embd // n_head must be even (RoPE)
    block_size: int = 96                 # context window in tokens
    tie_embeddings: bool = True          # lm_head shares wte
    rope_base: float = 10000.0
    init_std: float = 0.02
    dropout: float = 0.0                 # training only: share of each block's additions zeroed
    # delta adapters
    delta_rank: int = 4
    max_delta_modules: int = 8
    delta_alpha: float = 1.0             # scale applied to every A_k B_k
    # optimizer
    lr: float = 3e-3                     # peak learning rate
    lr_min: float = 3e-4                 # floor of the cosine decay
    lr_warmup_steps: int = 40            # linear ramp from 0 to lr
    lr_decay_steps: int = 1200           # cosine from lr to lr_min ends here
    idle_lr: float = 1e-3                # each idle phase anneals from this (at most lr) to lr_min
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8
    grad_clip: float = 1.0               # global L2 norm
    # trainer
    batch_size: int = 4                  # sequences per step
    seq_len: int = 64                    # tokens per training window (<= block_size)
    warmup_steps: int = 400              # steps on the whole corpus before the held-out text first judges
    micro_steps: int = 24                # steps per burst after warmup
    freeze_base_after_warmup: bool = True  # bursts train the delta adapters only
    idle_training: bool = True           # when no burst is due, keep training on the whole corpus
    idle_steps: int = 48                 # steps per idle phase
    distill_beta: float = 0.3            # share of each training target taken from the field (0: off)
    train_workers: int = 0               # training processes; 0: one per core
    delta_grow_prob: float = 0.25        # chance that a burst first appends a delta module
    qb_min_bytes: int = 480              # new bytes that trigger a burst ...
    qb_min_novelty: float = 0.25         # ... or this share of unseen token n-grams
    qb_cooldown_seconds: float = 60.0    # minimum gap between bursts
    forget_tolerance: float = 0.02       # max relative held-out loss increase a burst may cause
    checkpoint_every_seconds: float = 60.0
    max_corpus_lines: int = 20000
    heldout_every: int = 10              # every n-th seed line is held out of training
    # tokenizer
    enable_bpe_after_chars: int = 20000
    bpe_retrain_every_chars: int = 4000
    bpe_num_merges: int = 768            # merges the first training learns (0 keeps bytes)
    bpe_retrain_merges: int = 32         # merges each later retrain adds
    # corpus field
    field_order: int = 4                 # 1..MAX_FIELD_ORDER: each order adds a count per token and order
    field_discount: float = 0.75
    # sampling
    temperature: float = 0.85
    top_k: int = 40                      # 0 disables
    top_p: float = 0.92                  # 1 disables
    min_p: float = 0.06                  # 0 disables
    typical_p: float = 0.95              # 1 disables
    entropy_low: float = 0.5             # nats; below it the temperature is boosted
    entropy_high: float = 1.5            # nats; above it the temperature is focused
    entropy_temp_boost: float = 1.2
    entropy_temp_focus: float = 0.8
    repetition_guard: int = 4            # forbid repeating the last n-gram of this many tokens
    min_gen_tokens: int = 12
    max_gen_tokens: int = 80
    exact_generation: bool = False       # True: float dot products (slower); False: fixed point

    def __post_init__(self):
        self.validate()

    def validate(self):
        for f in fields(self):
            kind, value = field_kind(f.name), getattr(self, f.name)
            if not _is_kind(value, kind):
                raise ConfigError("Config.%s must be %s, got %r" % (f.name, _KIND_NAMES[kind], value))
        positive = ("n_layer", "n_embd", "n_head", "block_size", "delta_rank", "max_delta_modules",
                    "lr_warmup_steps", "lr_decay_steps", "batch_size", "seq_len", "micro_steps",
                    "max_corpus_lines", "heldout_every", "field_order", "max_gen_tokens", "idle_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError("Config.%s must be positive, got %r" % (name, getattr(self, name)))
        for name in ("init_std", "lr", "rope_base", "temperature", "grad_clip", "adam_eps",
                     "entropy_temp_boost", "entropy_temp_focus"):
            if not getattr(self, name) > 0:
                raise ConfigError("Config.%s must be > 0, got %r" % (name, getattr(self, name)))
        if self.n_embd % self.n_head:
            raise ConfigError("Config.n_embd (%d) must be divisible by n_head (%d)" % (self.n_embd, self.n_head))
        if (self.n_embd // self.n_head) % 2:
            raise ConfigError("Config.n_head: head_dim = n_embd / n_head = %d must be even for RoPE"
                              % (self.n_embd // self.n_head))
        if self.seq_len > self.block_size:
            raise ConfigError("Config.seq_len (%d) must not exceed block_size (%d)" % (self.seq_len, self.block_size))
        if not 0 <= self.lr_min <= self.lr:
            raise ConfigError("Config.lr_min must be in [0, lr], got %r" % self.lr_min)
        if self.idle_lr < 0:
            raise ConfigError("Config.idle_lr must be >= 0, got %r" % self.idle_lr)
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError("Config.%s must be in [0, 1), got %r" % (name, getattr(self, name)))
        for name in ("top_p", "min_p", "typical_p", "delta_grow_prob", "qb_min_novelty", "distill_beta"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError("Config.%s must be in [0, 1], got %r" % (name, getattr(self, name)))
        for name in ("top_k", "repetition_guard", "min_gen_tokens", "qb_min_bytes", "warmup_steps", "train_workers",
                     "enable_bpe_after_chars", "bpe_retrain_every_chars", "bpe_num_merges",
                     "bpe_retrain_merges"):
            if getattr(self, name) < 0:
                raise ConfigError("Config.%s must be >= 0, got %r" % (name, getattr(self, name)))
        if not self.entropy_low <= self.entropy_high:
            raise ConfigError("Config.entropy_low must not exceed entropy_high")
        if self.heldout_every < 2:
            raise ConfigError("Config.heldout_every must be at least 2 (1 would hold out every line)")
        if not 0 <= self.dropout < 1:
            raise ConfigError("Config.dropout must be in [0, 1), got %r" % self.dropout)
        if self.field_order > MAX_FIELD_ORDER:          # the counts grow as order squared per token
            raise ConfigError("Config.field_order must be at most %d, got %r" % (MAX_FIELD_ORDER, self.field_order))
        if not 0 <= self.field_discount < 1:
            raise ConfigError("Config.field_discount must be in [0, 1), got %r" % self.field_discount)
        if self.forget_tolerance < 0 or self.qb_cooldown_seconds < 0:
            raise ConfigError("Config.forget_tolerance and qb_cooldown_seconds must be >= 0")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})



# ======================================================================================
# Kernels: matrix arithmetic on plain lists of rows, the only place where speed is won.
# ======================================================================================
# A matrix is a list of rows (lists or tuples of floats). Everything heavy reduces to
# `dots(x, rows)`: the dot product of one vector with every row of a prepared matrix.
# The fast dot product uses math.dist (3.8+), which runs the whole row in C:
#     x.w = |x|^2 + |w/2|^2 - |x - w/2|^2
# so a matrix is prepared once as its rows halved (tuples) plus each |w/2|^2, and one C
# call per row does what sum(map(mul, x, w)) does in about five times the time. Python 3.7
# falls back to sum(map(mul, x, w)); there "prepared" rows are the rows themselves.

_dist = getattr(math, "dist", None)
_ZEROS = {}


def zero_tuple(n):
    """The origin of an n-dimensional space (cached: the dot kernel needs it on every call)."""
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = (0.0,) * n
    return z


def transpose(M):
    """(R, C) rows -> (C, R) rows (tuples)."""
    return list(zip(*M))


if _dist is not None:
    HALF = 0.5                            # prepared rows are stored as HALF * row

    def prepare_row(w):
        """-> (w/2 as a tuple, |w/2|^2)."""
        h = tuple([0.5 * v for v in w])
        n = _dist(h, zero_tuple(len(h)))
        return h, n * n                           # not ** 2: past 1e154 that raises OverflowError, this gives inf

    def dots(x, halves, norms):
        """[x . w for every prepared row w], one math.dist call per row."""
        x = tuple(x)
        nx = _dist(x, zero_tuple(len(x)))
        nx *= nx
        return [nx + n - d * d for n, d in zip(norms, map(_dist, repeat(x), halves))]
else:
    HALF = 1.0

    def prepare_row(w):
        """-> (w as a tuple, unused norm)."""
        return tuple(w), 0.0

    def dots(x, rows, norms):
        """[x . w for every row w]."""
        mul = operator.mul
        return [sum(map(mul, x, w)) for w in rows]


if _dist is not None:
    def prepare_rows(W):
        """(M, k) rows -> (halves, norms): what `dots` needs from the right-hand matrix."""
        halves = [tuple([0.5 * v for v in w]) for w in W]
        zero = zero_tuple(len(halves[0]) if halves else 0)
        return halves, [d * d for d in map(_dist, halves, repeat(zero))]
else:
    def prepare_rows(W):
        """(M, k) rows -> (rows as tuples, unused norms)."""
        return [tuple(w) for w in W], [0.0] * len(W)


def matmul_prepared(X, P):
    """X (N, k) rows times prepared W (M, k) -> (N, M) rows of X @ W^T."""
    halves, norms = P
    return [dots(x, halves, norms) for x in X]


def matmul_nt(X, W):
    """X (N, k) @ W(M, k)^T -> (N, M) rows."""
    return matmul_prepared(X, prepare_rows(W))


# Generation's fixed-point kernel. A token step multiplies one vector by fixed matrices, so
# each matrix W (M, k) is packed once: column j becomes one Python int whose 64-bit field i
# holds round(w_ij * s). Then sum_j round(x_j * t) * column_j is k big-int multiply-adds
# done in C, and field i of the total is (W x)_i * s * t. The weights sit in contiguous
# digits instead of scattered float objects, which matters as much as the arithmetic: after
# training has fragmented the heap, every float a dot product touches is a cache miss.
# Error: |y_i - exact| <= 0.5 * (k * 2^(FIXED_BITS - 62) + 2^-FIXED_BITS) * max|W| * |x|_1
# (about 4e-9 of that scale at k = 72), far below anything sampling can see.

FIXED_BITS = 28                           # weights keep this many bits below max|W|
FIXED_TINY = 1e-290                       # smaller weights or inputs count as zero (2^28 / them overflows)
_FIELD = 64
_SIGN = 1 << (_FIELD - 1)


class FixedMatrix:
    """W (M, k) packed by columns for `fixed_dots`."""

    def __init__(self, W):
        self.rows = len(W)
        self.finite = all(map(math.isfinite, chain.from_iterable(W)))
        wmax = max((max(map(abs, w)) for w in W), default=0.0) if self.finite else 0.0
        self.scale = 2.0 ** FIXED_BITS / wmax if wmax > FIXED_TINY else 1.0
        # every field offset by 2^63 makes it non-negative, so from_bytes can assemble it
        self.offset = int.from_bytes(array.array("Q", [_SIGN] * self.rows).tobytes(), sys.byteorder)
        s = self.scale
        self.packed = [int.from_bytes(array.array("Q", [round(v * s) + _SIGN for v in col]).tobytes(),
                                      sys.byteorder) - self.offset
                       for col in zip(*W)] if self.finite else []


def fixed_dots(x, fm):
    """W x for a FixedMatrix, in 64-bit fixed point -> (M,) floats."""
    l1 = sum(map(abs, x))
    if not (fm.finite and math.isfinite(l1)):
        return [math.nan] * fm.rows
    if l1 < FIXED_TINY:
        return [0.0] * fm.rows
    t = 2.0 ** (62 - FIXED_BITS) / l1     # sum |x_j t| <= 2^(62 - bits): fields stay < 2^63
    acc = sum(map(operator.mul, [round(v * t) for v in x], fm.packed))
    # +offset makes each signed field f into f + 2^63 without carries; ^offset flips each
    # field's top bit back, leaving f in two's complement for array("q")
    fields = array.array("q", ((acc + fm.offset) ^ fm.offset).to_bytes(8 * fm.rows, sys.byteorder))
    inv = 1.0 / (fm.scale * t)
    return [v * inv for v in fields]


def add_rows(A, B):
    """Elementwise A + B as new lists (never mutates, so gradients may alias safely)."""
    add = operator.add
    return [list(map(add, a, b)) for a, b in zip(A, B)]


def scale_rows(A, s):
    return [[s * v for v in a] for a in A]


def zeros(rows, cols):
    return [[0.0] * cols for _ in range(rows)]


def softmax_row(s, scale=1.0):
    """softmax(scale * s) of one row."""
    m = max(s)
    exp = math.exp
    e = [exp((v - m) * scale) for v in s]
    z = sum(e)
    return [v / z for v in e]


def sigmoid_row(xs):
    """Logistic function of each entry; exp(-x) would overflow below about -709."""
    exp = math.exp
    return [1.0 / (1.0 + exp(-v)) if v > -700.0 else 0.0 for v in xs]


def sumsq(x):
    """|x|^2 (inf past 1e154, where float ** 2 would raise OverflowError)."""
    if _dist is None:
        return sum(v * v for v in x)
    n = _dist(x, zero_tuple(len(x)))
    return n * n


def rms_scale(x, eps=1e-6):
    """1 / rms(x): the factor RMSNorm multiplies a row by."""
    return 1.0 / math.sqrt(sumsq(x) / len(x) + eps)


class RopeTable:
    """cos/sin of the rotary angles pos * base^(-2i/head_dim), grown on demand per position."""

    def __init__(self, head_dim, base):
        half = head_dim // 2
        self.freqs = [base ** (-2.0 * i / head_dim) for i in range(half)]
        self.cos = []
        self.sin = []

    def at(self, pos):
        while len(self.cos) <= pos:
            p = len(self.cos)
            self.cos.append([math.cos(p * f) for f in self.freqs])
            self.sin.append([math.sin(p * f) for f in self.freqs])
        return self.cos[pos], self.sin[pos]


def rope_rotate(x, cos, sin):
    """Rotate the pairs (x[i], x[i + half]) of one head vector by the position's angles."""
    half = len(cos)
    x1, x2 = x[:half], x[half:]
    return ([a * c - b * s for a, b, c, s in zip(x1, x2, cos, sin)]
            + [a * s + b * c for a, b, c, s in zip(x1, x2, cos, sin)])


def rope_unrotate(g, cos, sin):
    """The transpose (= inverse) rotation, which carries gradients back through rope_rotate."""
    half = len(cos)
    g1, g2 = g[:half], g[half:]
    return ([a * c + b * s for a, b, c, s in zip(g1, g2, cos, sin)]
            + [b * c - a * s for a, b, c, s in zip(g1, g2, cos, sin)])


# ======================================================================================
# Autograd: nodes hold whole matrices (a sequence of rows), so a training step is ~20 nodes.
# ======================================================================================
# Each op computes its forward value and returns a node whose `backward_fn(g)` maps the
# output gradient to one gradient per parent (None where a parent needs none). The closure
# holds the parents and saved values but never the output node, so the graph has no
# reference cycles and is freed as soon as the loss goes out of scope.

class Tensor:
    __slots__ = ("data", "grad", "parents", "backward_fn", "requires_grad", "frozen_rows")

    def __init__(self, data, parents=(), backward_fn=None, requires_grad=None):
        self.data = data                  # list of rows
        self.grad = None                  # same shape as data once backward has reached it
        self.parents = parents
        self.backward_fn = backward_fn
        if requires_grad is None:
            requires_grad = any(p.requires_grad for p in parents)
        self.requires_grad = requires_grad
        self.frozen_rows = 0              # parameters: rows below this index never change

    def freeze(self, rows=None):
        """Freeze the first `rows` rows (all by default); the optimizer never touches them."""
        self.frozen_rows = len(self.data) if rows is None else rows
        self.requires_grad = self.frozen_rows < len(self.data)

    def append_rows(self, rows):
        """Grow by rows at the end; a tensor with frozen rows is frozen base, and stays wholly frozen."""
        frozen = self.frozen_rows > 0
        self.data.extend(rows)
        if frozen:
            self.freeze()

    def backward(self):
        """Accumulate d(self)/d(node) into every node's .grad; self must be a 1x1 scalar."""
        order = _topological_order(self)
        self.grad = [[1.0]]
        for node in reversed(order):
            if node.backward_fn is None or node.grad is None:
                continue
            grads = node.backward_fn(node.grad)
            for parent, g in zip(node.parents, grads):
                if g is None or not parent.requires_grad:
                    continue
                parent.grad = g if parent.grad is None else add_rows(parent.grad, g)
            if node.parents:
                node.grad = None          # free interior gradients as soon as they are used


def param(data, trainable=True):
    t = Tensor(data, requires_grad=trainable)
    if not trainable:
        t.frozen_rows = len(data)
    return t


def _topological_order(root):
    """Iterative DFS post-order: no recursion limit however deep the graph."""
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for p in node.parents:
            if id(p) not in seen and p.requires_grad:
                stack.append((p, False))
    return order


def add(a, b):
    def backward_fn(g):
        return g, g
    return Tensor(add_rows(a.data, b.data), (a, b), backward_fn)


def mul(a, b):
    A, B = a.data, b.data
    out = [list(map(operator.mul, x, y)) for x, y in zip(A, B)]

    def backward_fn(g):
        ga = [list(map(operator.mul, gr, y)) for gr, y in zip(g, B)] if a.requires_grad else None
        gb = [list(map(operator.mul, gr, x)) for gr, x in zip(g, A)] if b.requires_grad else None
        return ga, gb
    return Tensor(out, (a, b), backward_fn)


def dropout(x, p, rng):
    """Zero each entry with probability p and scale the survivors by 1 / (1 - p) (training only)."""
    keep = 1.0 / (1.0 - p)
    rand = rng.random
    masks = [[keep if rand() >= p else 0.0 for _ in row] for row in x.data]
    out = [list(map(operator.mul, r, m)) for r, m in zip(x.data, masks)]

    def backward_fn(g):
        return ([list(map(operator.mul, gr, m)) for gr, m in zip(g, masks)],)
    return Tensor(out, (x,), backward_fn)


def scale(a, s):
    def backward_fn(g):
        return (scale_rows(g, s),)
    return Tensor(scale_rows(a.data, s), (a,), backward_fn)


def silu(a):
    X = a.data
    S = [sigmoid_row(x) for x in X]
    out = [[v * s for v, s in zip(x, sr)] for x, sr in zip(X, S)]

    def backward_fn(g):
        # d/dx x*sig(x) = sig(x) * (1 + x * (1 - sig(x)))
        return ([[gv * s * (1.0 + v * (1.0 - s)) for gv, v, s in zip(gr, x, sr)]
                 for gr, x, sr in zip(g, X, S)],)
    return Tensor(out, (a,), backward_fn)


def swiglu(gv):
    """(N, 2H) rows [gate | value] -> (N, H) rows silu(gate) * value, fused for speed."""
    H = len(gv.data[0]) // 2
    G = [r[:H] for r in gv.data]
    V = [r[H:] for r in gv.data]
    S = [sigmoid_row(g) for g in G]
    act = [[v * s for v, s in zip(g, sr)] for g, sr in zip(G, S)]
    out = [list(map(operator.mul, a, v)) for a, v in zip(act, V)]

    def backward_fn(grad):
        dg = [[d * v * s * (1.0 + x * (1.0 - s)) for d, v, s, x in zip(dr, vr, sr, gr)]
              for dr, vr, sr, gr in zip(grad, V, S, G)]
        dv = [list(map(operator.mul, dr, a)) for dr, a in zip(grad, act)]
        return ([a + b for a, b in zip(dg, dv)],)
    return Tensor(out, (gv,), backward_fn)


def rmsnorm(x, gain, eps=1e-6):
    """y = x / rms(x) * gain per row; gain is a (1, C) parameter."""
    X = x.data
    C = len(X[0])
    w = gain.data[0]
    R = [rms_scale(r, eps) for r in X]
    out = [[v * r * gw for v, gw in zip(row, w)] for row, r in zip(X, R)]

    def backward_fn(g):
        gx = dgain = None
        if x.requires_grad:
            gx = []
            for row, gr, r in zip(X, g, R):
                gy = list(map(operator.mul, gr, w))
                c = r * r * r * sum(map(operator.mul, gy, row)) / C
                gx.append([r * a - c * v for a, v in zip(gy, row)])
        if gain.requires_grad:
            scaled = [[d * v * r for d, v in zip(gr, row)] for gr, row, r in zip(g, X, R)]
            dgain = [[sum(col) for col in zip(*scaled)]]
        return gx, dgain
    return Tensor(out, (x, gain), backward_fn)


def embed(wte, ids):
    """Rows of the embedding matrix for each token id -> (N, C)."""
    table = wte.data
    out = [list(table[i]) for i in ids]

    def backward_fn(g):
        grad = {}
        for i, gr in zip(ids, g):
            prev = grad.get(i)
            grad[i] = gr if prev is None else list(map(operator.add, prev, gr))
        C = len(table[0])
        dense = [grad.get(i) or [0.0] * C for i in range(len(table))]
        return (dense,)
    return Tensor(out, (wte,), backward_fn)


def rope(x, n_head, positions, table):
    """Rotary position embedding of every head of every row; positions[i] is row i's position."""
    X = x.data
    hd = len(X[0]) // n_head

    def apply(rows, fn):
        out = []
        for row, pos in zip(rows, positions):
            cos, sin = table.at(pos)
            new = []
            for h in range(n_head):
                new.extend(fn(row[h * hd:(h + 1) * hd], cos, sin))
            out.append(new)
        return out

    def backward_fn(g):
        return (apply(g, rope_unrotate),)
    return Tensor(apply(X, rope_rotate), (x,), backward_fn)


def attention(qkv, n_seq, T, n_head, table):
    """Causal multi-head attention with RoPE, fused: (n_seq*T, 3C) rows [q|k|v] -> (n_seq*T, C).

    Row b*T + t is token t of sequence b at absolute position t.
    """
    C = len(qkv.data[0]) // 3
    hd = C // n_head
    sc = 1.0 / math.sqrt(hd)
    angles = [table.at(t) for t in range(T)]
    out = zeros(n_seq * T, C)
    saved = []
    for b in range(n_seq):
        rows = qkv.data[b * T:(b + 1) * T]
        for h in range(n_head):
            o = h * hd
            Q = [rope_rotate(r[o:o + hd], c, s) for r, (c, s) in zip(rows, angles)]
            K = [rope_rotate(r[C + o:C + o + hd], c, s) for r, (c, s) in zip(rows, angles)]
            V = [r[2 * C + o:2 * C + o + hd] for r in rows]
            Kh, Kn = prepare_rows(K)
            P = []                                        # (T, T), zero above the diagonal
            for t, q in enumerate(Q):
                p = softmax_row(dots(q, Kh[:t + 1], Kn[:t + 1]), sc)
                P.append(p + [0.0] * (T - 1 - t))
            O = matmul_nt(P, transpose(V))                # (T, hd)
            for t in range(T):
                out[b * T + t][o:o + hd] = O[t]
            saved.append((Q, K, V, P))

    def backward_fn(g):
        dqkv = zeros(n_seq * T, 3 * C)
        i = 0
        for b in range(n_seq):
            for h in range(n_head):
                Q, K, V, P = saved[i]
                i += 1
                o = h * hd
                dO = [g[b * T + t][o:o + hd] for t in range(T)]
                dV = matmul_nt(transpose(P), transpose(dO))
                Vh, Vn = prepare_rows(V)
                dS = []
                for t, (p, do) in enumerate(zip(P, dO)):
                    dp = dots(do, Vh[:t + 1], Vn[:t + 1])   # (t+1,): zip below stops there
                    dot = sum(map(operator.mul, p, dp))
                    dS.append([sc * pj * (dpj - dot) for pj, dpj in zip(p, dp)]
                              + [0.0] * (T - 1 - t))
                dQ = matmul_nt(dS, transpose(K))
                dK = matmul_nt(transpose(dS), transpose(Q))
                for t in range(T):
                    c, s = angles[t]
                    row = dqkv[b * T + t]
                    row[o:o + hd] = rope_unrotate(dQ[t], c, s)
                    row[C + o:C + o + hd] = rope_unrotate(dK[t], c, s)
                    row[2 * C + o:2 * C + o + hd] = dV[t]
        return (dqkv,)
    return Tensor(out, (qkv,), backward_fn)


def cross_entropy(logits, targets):
    """Per-row -log softmax(logits)[target], fused with the log-softmax -> (N, 1)."""
    probs, out = [], []
    for row, y in zip(logits.data, targets):
        m = max(row)
        e = [math.exp(v - m) for v in row]
        z = sum(e)
        out.append([m + math.log(z) - row[y]])
        probs.append([v / z for v in e])

    def backward_fn(g):
        grad = []
        for p, y, gr in zip(probs, targets, g):
            d = gr[0]
            row = [d * v for v in p]
            row[y] -= d
            grad.append(row)
        return (grad,)
    return Tensor(out, (logits,), backward_fn)


def distill_cross_entropy(logits, targets, teacher, beta):
    """Per-row (1 - beta) * -log p[target] + beta * sum_j w_j * -log p[id_j] -> (N, 1), where
    teacher[r] = (ids, weights) is a teacher's distribution over a few ids for row r."""
    probs, out = [], []
    for row, y, (ids, ws) in zip(logits.data, targets, teacher):
        m = max(row)
        e = [math.exp(v - m) for v in row]
        z = sum(e)
        lz = m + math.log(z)                            # log-sum-exp: -log p[i] = lz - row[i]
        soft = sum(w * (lz - row[i]) for i, w in zip(ids, ws))
        out.append([(1.0 - beta) * (lz - row[y]) + beta * soft])
        probs.append([v / z for v in e])

    def backward_fn(g):
        grad = []
        for p, y, (ids, ws), gr in zip(probs, targets, teacher, g):
            d = gr[0]
            dp = d * ((1.0 - beta) + beta * sum(ws))      # the weights sum to 1 up to rounding
            row = [dp * v for v in p]
            row[y] -= d * (1.0 - beta)
            for i, w in zip(ids, ws):
                row[i] -= d * beta * w
            grad.append(row)
        return (grad,)
    return Tensor(out, (logits,), backward_fn)


def mean(x):
    """Mean of every entry -> (1, 1)."""
    n = len(x.data) * len(x.data[0])
    cols = len(x.data[0])
    value = sum(sum(r) for r in x.data) / n

    def backward_fn(g):
        d = g[0][0] / n
        return ([[d] * cols for _ in x.data],)
    return Tensor([[value]], (x,), backward_fn)


class Delta:
    """One low-rank adapter: adds alpha * A (B x); A starts at zero so appending is a no-op."""

    def __init__(self, A, B, alpha):
        self.A = A                        # (out, rank) parameter
        self.B = B                        # (rank, in) parameter
        self.alpha = alpha


class Linear:
    """A weight matrix W (out, in) plus appended deltas: y = W x + sum_k alpha_k A_k (B_k x)."""

    def __init__(self, weight):
        self.weight = weight
        self.deltas = []

    def effective(self):
        """W + sum alpha A B as plain rows: merged once per step, then one matmul does the rest."""
        W = self.weight.data
        for d in self.deltas:
            AB = matmul_nt(d.A.data, transpose(d.B.data))
            W = [[w + d.alpha * v for w, v in zip(wr, ab)] for wr, ab in zip(W, AB)]
        return W


def linear(x, mods):
    """x (N, in) @ [W_eff of each module stacked by rows]^T -> (N, sum of outs).

    Stacking q/k/v (or gate/value) lets one matmul serve several modules. Backward: the
    input gradient always; each trainable base gets dW = g^T x; deltas get dA, dB from dW
    when it exists, else from the cheap low-rank route dA = a g^T (x B^T), dB = a (g A)^T x.
    """
    W = []
    for m in mods:
        W.extend(m.effective())
    X = x.data
    out = matmul_nt(X, W)
    parents = [x]
    for m in mods:
        parents.append(m.weight)
        for d in m.deltas:
            parents.extend((d.A, d.B))

    def backward_fn(g):
        grads = [matmul_nt(g, transpose(W)) if x.requires_grad else None]
        gT = transpose(g)
        XT = transpose(X)
        o = 0
        for m in mods:
            M = len(m.weight.data)
            gTm = gT[o:o + M]
            o += M
            if m.weight.requires_grad:
                dW = matmul_nt(gTm, XT)
                grads.append(dW)
                for d in m.deltas:
                    grads.append(scale_rows(matmul_nt(dW, d.B.data), d.alpha))
                    grads.append(scale_rows(matmul_nt(transpose(d.A.data), transpose(dW)), d.alpha))
            else:
                grads.append(None)
                gm = transpose(gTm)                                  # (N, M)
                for d in m.deltas:
                    U = matmul_nt(X, d.B.data)                       # (N, r) = x B^T
                    grads.append(scale_rows(matmul_nt(gTm, transpose(U)), d.alpha))
                    gA = matmul_nt(gm, transpose(d.A.data))          # (N, r) = g A
                    grads.append(scale_rows(matmul_nt(transpose(gA), XT), d.alpha))
        return grads
    return Tensor(out, tuple(parents), backward_fn)



# ======================================================================================
# Tokenizer: byte-level BPE whose vocabulary only grows, so no trained weight is invalidated.
# ======================================================================================
# Ids 0..255 are the bytes, then BOS, EOS, PAD, then one id per merge in the order learned.
# A merge (a, b) -> n joins two adjacent tokens; its rank is its id, and a retrain only
# appends merges, so every existing id keeps exactly its byte string forever.
#
# Text that is not valid UTF-8 (stray bytes from a file or a pipe) follows one rule: the
# bytes are kept as they are (Python's surrogateescape), trained on and stored unchanged,
# and only the screen shows them as U+FFFD.
#
# Pre-segmentation keeps merges inside pieces: a run of letters (any script), of digits,
# of punctuation, or of whitespace; a single leading space joins the following piece, as
# in GPT-2, so " cat" is one piece and the model learns words with their left space.

BOS, EOS, PAD = 256, 257, 258
N_BASE_VOCAB = 259
SPECIAL_NAMES = {BOS: "<BOS>", EOS: "<EOS>", PAD: "<PAD>"}
TOKENIZER_VERSION = 1

PIECE_RE = re.compile(r" ?[^\W\d_]+| ?\d+| ?(?:[^\w\s]|_)+|\s+(?!\S)|\s+")


def text_to_bytes(text):
    """str -> UTF-8 bytes; stray bytes carried as surrogates come back as the original bytes."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:                 # a lone surrogate typed in by hand
        return text.encode("utf-8", "surrogatepass")


def bytes_to_text(data):
    """bytes -> str, losslessly (invalid bytes become surrogates; text_to_bytes reverses it)."""
    return data.decode("utf-8", "surrogateescape")


def split_pieces(text):
    """'Hi, 世界!' -> ['Hi', ',', ' 世界', '!']; the pieces always join back to text."""
    return PIECE_RE.findall(text)


def _merge_pair(ids, pair, new_id):
    """[1, 2, 3, 1, 2], (1, 2), 9 -> [9, 3, 9]"""
    out, i, n = [], 0, len(ids)
    a, b = pair
    while i < n:
        if i < n - 1 and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class Tokenizer:
    def __init__(self, merges=()):
        self.merges = []                       # [(a, b)], rank order; merge i makes id 259 + i
        self.ranks = {}                        # (a, b) -> new id
        self.vocab = [bytes([i]) for i in range(256)] + [b"", b"", b""]
        self._cache = {}                       # piece bytes -> ids
        for a, b in merges:
            self._append_merge((a, b))

    @property
    def vocab_size(self):
        return len(self.vocab)

    def _append_merge(self, pair):
        a, b = pair
        if not (0 <= a < len(self.vocab) and 0 <= b < len(self.vocab)) or a in SPECIAL_NAMES or b in SPECIAL_NAMES:
            raise ValueError("merge %r refers to an unknown or special token" % (pair,))
        new_id = len(self.vocab)
        self.merges.append(pair)
        self.ranks[pair] = new_id
        self.vocab.append(self.vocab[a] + self.vocab[b])
        return new_id

    # -- encoding ------------------------------------------------------------------------
    def _encode_piece(self, piece):
        ids = self._cache.get(piece)
        if ids is None:
            ids = list(piece)
            ranks = self.ranks
            while len(ids) > 1:
                best = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, 1 << 62))
                if best not in ranks:
                    break
                ids = _merge_pair(ids, best, ranks[best])
            if len(self._cache) > 200000:          # bound memory on endless novel input
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    def encode(self, text):
        """str -> ids (no BOS/EOS added)."""
        out = []
        for piece in split_pieces(text):
            out.extend(self._encode_piece(text_to_bytes(piece)))
        return out

    def encode_bytes(self, data):
        return self.encode(bytes_to_text(data))

    def token_bytes(self, i):
        return self.vocab[i]

    def decode_bytes(self, ids):
        """ids -> the exact bytes; special tokens contribute nothing."""
        return b"".join(self.vocab[i] for i in ids)

    def decode(self, ids):
        """ids -> text for the screen: invalid UTF-8 shows as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", "replace")

    # -- training: appends merges, never changes an existing one ---------------------------
    def train(self, lines, num_merges):
        """Learn up to num_merges new merges from lines on top of the current ones -> new ids.

        Pairs are counted over unique pieces weighted by frequency, each already encoded
        with the current merges; after a merge only the pieces that held the pair are
        recounted. A merge is learned only while some pair occurs at least twice. Ties go
        to the smallest pair, so training is deterministic.
        """
        freq = {}
        for line in lines:
            for piece in split_pieces(line):
                key = text_to_bytes(piece)
                freq[key] = freq.get(key, 0) + 1
        words = [list(self._encode_piece(p)) for p in freq]
        weights = list(freq.values())
        counts, where = {}, {}
        for wi, ids in enumerate(words):
            for pair in zip(ids, ids[1:]):
                counts[pair] = counts.get(pair, 0) + weights[wi]
                where.setdefault(pair, set()).add(wi)
        heap = [(-c, pair) for pair, c in counts.items()]
        heapq.heapify(heap)
        added = []
        while len(added) < num_merges and heap:
            neg, pair = heapq.heappop(heap)
            if counts.get(pair, 0) != -neg:
                continue                                   # stale entry
            if -neg < 2:
                break
            new_id = self._append_merge(pair)
            added.append(new_id)
            changed = set()
            for wi in where.pop(pair, ()):
                old = words[wi]
                new = _merge_pair(old, pair, new_id)
                if new == old:
                    continue
                w = weights[wi]
                for p in zip(old, old[1:]):
                    counts[p] -= w
                    changed.add(p)
                for p in zip(new, new[1:]):
                    counts[p] = counts.get(p, 0) + w
                    where.setdefault(p, set()).add(wi)
                    changed.add(p)
                words[wi] = new
            counts.pop(pair, None)
            for p in changed:
                c = counts.get(p, 0)
                if c > 0 and p != pair:
                    heapq.heappush(heap, (-c, p))
        if added:
            self._cache.clear()
        return added

    # -- persistence -----------------------------------------------------------------------
    def to_dict(self):
        return {"version": TOKENIZER_VERSION, "bos": BOS, "eos": EOS, "pad": PAD,
                "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_dict(cls, d):
        if d.get("version") != TOKENIZER_VERSION or (d.get("bos"), d.get("eos"), d.get("pad")) != (BOS, EOS, PAD):
            raise CheckpointError("tokenizer state has an unknown format (version %r)" % d.get("version"))
        try:
            return cls([tuple(m) for m in d["merges"]])
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError("tokenizer state is damaged: %s" % e)


def format_tokenization(tok, text):
    """One line per token: id and the bytes it stands for (what --tokenize prints)."""
    ids = tok.encode(text)
    lines = ["%d tokens for %d bytes (vocab %d)" % (len(ids), len(text_to_bytes(text)), tok.vocab_size)]
    for i in ids:
        raw = tok.token_bytes(i)
        try:
            shown = repr(raw.decode("utf-8"))
        except UnicodeDecodeError:                 # part of a multi-byte character
            shown = " ".join("<%02x>" % b for b in raw)
        lines.append("%6d  %s" % (i, shown))
    return "\n".join(lines)


# ======================================================================================
# Model: a pre-norm GPT with RoPE, SwiGLU and tied embeddings, every linear carrying deltas.
# ======================================================================================

LINEAR_NAMES = ("wq", "wk", "wv", "wo", "fc_g", "fc_v", "fc2")


def _randn(rng, rows, cols, std):
    """Gaussian rows, or zeros when rng is None (a model about to be overwritten by a checkpoint)."""
    if rng is None:
        return zeros(rows, cols)
    return [[rng.gauss(0.0, std) for _ in range(cols)] for _ in range(rows)]


class Block:
    """One transformer layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg, rng):
        C, H, std = cfg.n_embd, 4 * cfg.n_embd, cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layer)   # residual writers start smaller (GPT-2)
        self.ln1 = param([[1.0] * C])
        self.wq = Linear(param(_randn(rng, C, C, std)))
        self.wk = Linear(param(_randn(rng, C, C, std)))
        self.wv = Linear(param(_randn(rng, C, C, std)))
        self.wo = Linear(param(_randn(rng, C, C, out_std)))
        self.ln2 = param([[1.0] * C])
        self.fc_g = Linear(param(_randn(rng, H, C, std)))
        self.fc_v = Linear(param(_randn(rng, H, C, std)))
        self.fc2 = Linear(param(_randn(rng, C, H, out_std)))

    def linears(self):
        return [(name, getattr(self, name)) for name in LINEAR_NAMES]

    def __call__(self, x, n_seq, T, cfg, table, rng=None):
        drop = (lambda t: dropout(t, cfg.dropout, rng)) if rng is not None and cfg.dropout > 0 else (lambda t: t)
        qkv = linear(rmsnorm(x, self.ln1), [self.wq, self.wk, self.wv])
        x = add(x, drop(linear(attention(qkv, n_seq, T, cfg.n_head, table), [self.wo])))
        gv = linear(rmsnorm(x, self.ln2), [self.fc_g, self.fc_v])
        return add(x, drop(linear(swiglu(gv), [self.fc2])))


class GPT:
    def __init__(self, cfg, vocab_size=N_BASE_VOCAB, seed=0, init=True):
        self.cfg = cfg
        self.rng = random.Random(seed)    # initializes rows added later (vocab, deltas, growth)
        rng = self.rng if init else None  # init=False: zeros, for a checkpoint to fill in
        self.wte = param(_randn(rng, vocab_size, cfg.n_embd, cfg.init_std))
        self.blocks = [Block(cfg, rng) for _ in range(cfg.n_layer)]
        self.lnf = param([[1.0] * cfg.n_embd])
        head = self.wte if cfg.tie_embeddings else param(_randn(rng, vocab_size, cfg.n_embd, cfg.init_std))
        self.lm_head = Linear(head)
        self.rope = RopeTable(cfg.head_dim, cfg.rope_base)
        self.version = 0                  # bumped whenever weights change (invalidates caches)
        self._infer = None

    @property
    def vocab_size(self):
        return len(self.wte.data)

    # -- parameters ------------------------------------------------------------------
    def linears(self):
        """(name, Linear) for every adapted linear, in a fixed order."""
        out = []
        for i, blk in enumerate(self.blocks):
            out.extend(("h%d.%s" % (i, n), lin) for n, lin in blk.linears())
        out.append(("lm_head", self.lm_head))
        return out

    def base_params(self):
        """(name, Tensor) of the base weights; a tied lm_head is listed once, as wte."""
        out = [("wte", self.wte)]
        for i, blk in enumerate(self.blocks):
            out.append(("h%d.ln1" % i, blk.ln1))
            out.append(("h%d.ln2" % i, blk.ln2))
            out.extend(("h%d.%s" % (i, n), lin.weight) for n, lin in blk.linears())
        out.append(("lnf", self.lnf))
        if not self.cfg.tie_embeddings:
            out.append(("lm_head", self.lm_head.weight))
        return out

    def delta_params(self):
        out = []
        for name, lin in self.linears():
            for k, d in enumerate(lin.deltas):
                out.append(("%s.d%d.A" % (name, k), d.A))
                out.append(("%s.d%d.B" % (name, k), d.B))
        return out

    def named_params(self):
        return self.base_params() + self.delta_params()

    def num_params(self):
        return sum(len(t.data) * len(t.data[0]) for _, t in self.named_params())

    @property
    def n_deltas(self):
        return len(self.lm_head.deltas)

    def freeze_base(self):
        for _, t in self.base_params():
            t.freeze()
        self.touch()

    def set_trainable(self, base):
        """Train the base weights too (warmup, idle learning) or only the deltas (bursts)."""
        for _, t in self.base_params():
            t.freeze(0 if base else None)

    def touch(self):
        self.version += 1

    # -- growth ------------------------------------------------------------------------
    def add_delta(self):
        """Append one delta module to every linear; outputs are unchanged (A = 0)."""
        cfg = self.cfg
        if self.n_deltas >= cfg.max_delta_modules:
            return False
        r = cfg.delta_rank
        for _, lin in self.linears():
            out_dim, in_dim = len(lin.weight.data), len(lin.weight.data[0])
            A = param(zeros(out_dim, r))
            B = param(_randn(self.rng, r, in_dim, 1.0 / math.sqrt(in_dim)))
            lin.deltas.append(Delta(A, B, cfg.delta_alpha))
        self.touch()
        return True

    def grow_vocab(self, new_size):
        """Append rows for new token ids to wte (and lm_head, and every lm_head delta's A).

        Existing rows are untouched. A frozen base stays frozen: new rows of a frozen wte are
        frozen too, and new tokens are learned through the lm_head deltas (their A rows grow).
        """
        old = self.vocab_size
        if new_size <= old:
            return
        C, std = self.cfg.n_embd, self.cfg.init_std
        heads = [self.wte] if self.cfg.tie_embeddings else [self.wte, self.lm_head.weight]
        for t in heads:
            t.append_rows(_randn(self.rng, new_size - old, C, std))
        for d in self.lm_head.deltas:
            d.A.data.extend(zeros(new_size - old, len(d.A.data[0])))
        self.touch()

    # -- training forward ----------------------------------------------------------------
    def forward(self, inputs, rng=None):
        """inputs: n_seq lists of T ids (equal lengths, T <= block_size) -> logits (n_seq*T, V).

        With rng (training), Config.dropout applies to what each attention and MLP adds.
        """
        n_seq, T = len(inputs), len(inputs[0])
        assert T <= self.cfg.block_size
        ids = [i for seq in inputs for i in seq]
        x = embed(self.wte, ids)                          # (n_seq*T, C) rows
        for blk in self.blocks:
            x = blk(x, n_seq, T, self.cfg, self.rope, rng)
        return linear(rmsnorm(x, self.lnf), [self.lm_head])

    def loss(self, inputs, targets, rng=None, teacher=None, beta=0.0):
        """Mean next-token cross-entropy (nats) of targets (same shape as inputs); with a teacher
        (one (ids, weights) per target, in the same order) beta of it follows the teacher."""
        flat = [t for seq in targets for t in seq]
        logits = self.forward(inputs, rng)
        if teacher is None or not beta:
            return mean(cross_entropy(logits, flat))
        return mean(distill_cross_entropy(logits, flat, teacher, beta))

    # -- generation: one token at a time, KV cache, no graph ----------------------------------
    def _inference_weights(self):
        """Effective weights merged and prepared once per weight version."""
        if self._infer is None or self._infer[0] != self.version:
            if self.cfg.exact_generation:
                prepare, matvec = prepare_rows, lambda x, P: dots(x, *P)
            else:
                prepare, matvec = FixedMatrix, fixed_dots
            layers = []
            for blk in self.blocks:
                qkv = blk.wq.effective() + blk.wk.effective() + blk.wv.effective()
                gv = blk.fc_g.effective() + blk.fc_v.effective()
                layers.append((blk.ln1.data[0], prepare(qkv), prepare(blk.wo.effective()),
                               blk.ln2.data[0], prepare(gv), prepare(blk.fc2.effective())))
            head = prepare(self.lm_head.effective())
            self._infer = (self.version, matvec, layers, self.lnf.data[0], head)
        return self._infer

    def new_cache(self):
        return KVCache(self.cfg)

    def step(self, cache, token, logits=True):
        """Feed one token at the cache's next position -> logits list (V,), or None if not wanted.

        Past block_size tokens the oldest entry drops out of every layer's window and nothing
        is re-run (streaming sliding-window attention). RoPE makes scores depend only on
        relative positions, so one layer then computes exactly what a fresh forward over the
        last block_size tokens would; deeper layers keep entries computed while older tokens
        were still in view, so a little of what lies beyond the window still reaches them.
        """
        cfg = self.cfg
        _, matvec, layers, lnf, head = self._inference_weights()
        C, hd = cfg.n_embd, cfg.head_dim
        sc = 1.0 / math.sqrt(hd)
        cos, sin = self.rope.at(cache.pos)
        exp = math.exp
        x = self.wte.data[token]                                      # (C,)
        for heads, (ln1, qkv_w, wo_w, ln2, gv_w, fc2_w) in zip(cache.layers, layers):
            qkv = matvec(_rmsnorm_row(x, ln1), qkv_w)                  # (3C,) [q | k | v]
            att = []
            for o, kv in zip(range(0, C, hd), heads):
                kv.push(rope_rotate(qkv[C + o:C + o + hd], cos, sin), qkv[2 * C + o:2 * C + o + hd],
                        cfg.block_size)
                att.extend(kv.attend(rope_rotate(qkv[o:o + hd], cos, sin), sc))
            x = [a + b for a, b in zip(x, matvec(att, wo_w))]
            gv = matvec(_rmsnorm_row(x, ln2), gv_w)                    # (2H,) [gate | value]
            H = len(gv) // 2
            act = [g * v / (1.0 + exp(-g)) if g > -700.0 else 0.0 for g, v in zip(gv[:H], gv[H:])]
            x = [a + b for a, b in zip(x, matvec(act, fc2_w))]
        cache.pos += 1
        return matvec(_rmsnorm_row(x, lnf), head) if logits else None


def _rmsnorm_row(x, gain, eps=1e-6):
    r = rms_scale(x, eps)
    return [v * r * g for v, g in zip(x, gain)]


class HeadCache:
    """One attention head's past: rotated keys as prepared rows, values stored by column.

    Keeping values by column (each prepared, HALF-scaled, with a running |column|^2) makes
    p . V one `dots` call per head dimension instead of a transpose per token.
    """

    def __init__(self, head_dim):
        self.keys, self.key_norms = [], []          # (t,) prepared rows of the rotated keys
        self.cols = [[] for _ in range(head_dim)]   # (head_dim,) columns of HALF * values
        self.col_norms = [0.0] * head_dim
        self.dropped = 0

    def __len__(self):
        return len(self.keys)

    def push(self, k, v, window):
        h, n = prepare_row(k)
        self.keys.append(h)
        self.key_norms.append(n)
        for col, x in zip(self.cols, v):
            col.append(HALF * x)
        self.col_norms = [s + c[-1] * c[-1] for s, c in zip(self.col_norms, self.cols)]
        if len(self.keys) > window:
            del self.keys[0], self.key_norms[0]
            self.col_norms = [s - c[0] * c[0] for s, c in zip(self.col_norms, self.cols)]
            for col in self.cols:
                del col[0]
            self.dropped += 1
            if self.dropped % window == 0:            # running sums drift; renew them exactly
                self.col_norms = [sumsq(col) for col in self.cols]

    def attend(self, q, scale):
        """softmax(scale * q.K) . V for this head -> (head_dim,)."""
        p = softmax_row(dots(q, self.keys, self.key_norms), scale)
        return dots(p, self.cols, self.col_norms)


class KVCache:
    """Everything generation keeps between tokens: the position and each head's past."""

    def __init__(self, cfg):
        self.pos = 0
        self.layers = [[HeadCache(cfg.head_dim) for _ in range(cfg.n_head)] for _ in range(cfg.n_layer)]



# ======================================================================================
# Optimizer: Adam with bias correction, global-norm clipping, warmup then cosine decay.
# ======================================================================================

def lr_at(step, cfg):
    """Learning rate for a global step: linear warmup, cosine to lr_min, then lr_min."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    if step >= cfg.lr_decay_steps:
        return cfg.lr_min
    span = max(1, cfg.lr_decay_steps - cfg.lr_warmup_steps)
    progress = (step - cfg.lr_warmup_steps) / span
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1.0 + math.cos(math.pi * progress))


def idle_lr_at(step, i, steps, cfg):
    """Learning rate of step i of an idle phase of `steps`: a cosine from idle_lr down to lr_min
    (the last step at lr_min), or the schedule's rate where that is higher. Each phase thus ends
    annealed, and is judged so, however long the organism has lived; at the floor alone a phase
    gained less than its own noise (measured: -0.4% to +0.4% per phase from 20 minutes on)."""
    peak = min(cfg.idle_lr, cfg.lr)
    cycle = cfg.lr_min + 0.5 * max(0.0, peak - cfg.lr_min) * (1.0 + math.cos(math.pi * i / max(1, steps - 1)))
    return max(lr_at(step, cfg), cycle)


@dataclass
class AdamState:
    """One parameter's moments and update counts, row by row."""
    m: list                               # (rows, cols) first moments
    v: list                               # (rows, cols) second moments
    t: list                               # (rows,) updates each row has had

    def extend(self, rows, cols):
        """Rows appended to the parameter (vocabulary growth) start with no history."""
        while len(self.m) < rows:
            self.m.append([0.0] * cols)
            self.v.append([0.0] * cols)
            self.t.append(0)


class Adam:
    """Adam over named parameters; moments and update counts are kept per row.

    The count is per row so that rows born late (a delta appended, token rows added by a
    BPE retrain, a resize) get their own bias correction instead of inheriting a count of
    thousands with zero moments, which would let them move at up to twice the intended rate.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.state = {}                   # name -> AdamState

    def step(self, named_params, lr):
        """Clip the global gradient norm, update trainable rows, clear grads -> the norm."""
        cfg = self.cfg
        live = [(n, p) for n, p in named_params if p.requires_grad and p.grad is not None]
        total = 0.0
        for _, p in live:
            for row in p.grad[p.frozen_rows:]:
                total += sumsq(row)
        norm = math.sqrt(total)
        clip = min(1.0, cfg.grad_clip / (norm + 1e-12))
        b1, b2, eps = cfg.beta1, cfg.beta2, cfg.adam_eps
        c1, c2 = (1.0 - b1) * clip, (1.0 - b2) * clip * clip      # the clip folded in
        sqrt = math.sqrt
        for name, p in live:
            st = self.state.get(name)
            if st is None:
                st = self.state[name] = AdamState([], [], [])
            st.extend(len(p.data), len(p.data[0]))
            m, v, counts = st.m, st.v, st.t
            for i in range(p.frozen_rows, len(p.data)):
                counts[i] += 1
                t = counts[i]
                step_size = lr * sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
                g = p.grad[i]
                mi = [b1 * a + c1 * x for a, x in zip(m[i], g)]
                vi = [b2 * a + c2 * x * x for a, x in zip(v[i], g)]
                m[i], v[i] = mi, vi
                p.data[i] = [w - step_size * a / (sqrt(b) + eps) for w, a, b in zip(p.data[i], mi, vi)]
        for _, p in named_params:
            p.grad = None
        return norm



class _NoCycleCollection:
    """Pause the cyclic garbage collector: the graph has no cycles (see Autograd), so its
    scans of a step's thousands of row lists find nothing and cost about 3% of the step
    (callgrind, 3.11)."""

    def __enter__(self):
        self.was_enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self.was_enabled:
            gc.enable()
        return False


def backward_step(model, inputs, targets, weight=1.0, rng=None, teacher=None, beta=0.0):
    """Forward and backward of weight * mean loss; gradients land in .grad -> the mean loss (nats).

    A data-parallel shard passes its share of the batch's tokens as weight, so the shards'
    gradients add up to the gradient of the whole batch's mean loss.
    """
    with _NoCycleCollection():
        loss = model.loss(inputs, targets, rng, teacher, beta)
        (scale(loss, weight) if weight != 1.0 else loss).backward()
    return loss.data[0][0]


def train_step(model, opt, inputs, targets, lr, rng=None):
    """One forward, backward and Adam update -> the batch's mean loss (nats)."""
    loss = backward_step(model, inputs, targets, rng=rng)
    with _NoCycleCollection():
        opt.step(model.named_params(), lr)
    model.touch()
    return loss


# ======================================================================================
# Checkpoints: one versioned file, written atomically, weights as base64 of float64 arrays.
# ======================================================================================
# Layout: a header line "macrogpt-checkpoint <version> <sha256 of body>" then one JSON body.
# The digest makes a torn or edited file fail loudly instead of loading wrong weights.

CKPT_MAGIC = "macrogpt-checkpoint"
CKPT_VERSION = 2                          # 2: Adam counts per row, the model's random state
GROWABLE = ("n_embd", "n_layer", "n_head", "delta_rank", "block_size")
GROW_SCALE = 0.001                        # new weights start this fraction of a fresh init


def pack_rows(rows):
    flat = array.array("d", [v for r in rows for v in r])
    return {"shape": [len(rows), len(rows[0]) if rows else 0],
            "data": base64.b64encode(flat.tobytes()).decode("ascii")}


def unpack_rows(d, byteorder):
    n_rows, n_cols = d["shape"]
    flat = array.array("d")
    flat.frombytes(base64.b64decode(d["data"]))
    if byteorder != sys.byteorder:
        flat.byteswap()
    if len(flat) != n_rows * n_cols:
        raise CheckpointError("checkpoint is damaged: a weight block has the wrong size")
    return [flat[i * n_cols:(i + 1) * n_cols].tolist() for i in range(n_rows)]


def atomic_write(path, data):
    """Write bytes so that a crash at any instant leaves either the old or the new file."""
    try:
        _write_then_replace(path, data)
    except OSError as e:                           # no folder, disk full, another process's rename
        raise CheckpointError("cannot write checkpoint %s: %s" % (path, e.strerror or e))


def temp_name(path, pid=None):
    """Per process, so two writers never share a half-written file; see remove_stale_temps."""
    return "%s.%d.tmp" % (path, os.getpid() if pid is None else pid)


def _write_then_replace(path, data):
    folder = os.path.dirname(os.path.abspath(path))
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def checkpoint_bytes(model, opt, step, extra=None):
    """Everything needed to resume: config, step, weights, frozen rows, deltas, Adam state."""
    params, adam = {}, {}
    for name, t in model.named_params():
        entry = pack_rows(t.data)
        entry["frozen_rows"] = t.frozen_rows
        params[name] = entry
        st = opt.state.get(name)
        if st is not None:
            adam[name] = {"m": pack_rows(st.m), "v": pack_rows(st.v), "t": st.t}
    body = {"version": CKPT_VERSION, "byteorder": sys.byteorder, "config": model.cfg.to_dict(),
            "step": step, "vocab_size": model.vocab_size, "n_deltas": model.n_deltas,
            "delta_alphas": [d.alpha for d in model.lm_head.deltas],
            "params": params, "adam": adam, "rng": model.rng.getstate(), "extra": extra or {}}
    text = json.dumps(body, separators=(",", ":")).encode("utf-8")
    header = "%s %d %s\n" % (CKPT_MAGIC, CKPT_VERSION, hashlib.sha256(text).hexdigest())
    return header.encode("ascii") + text


def save_checkpoint(path, model, opt, step, extra=None):
    atomic_write(path, checkpoint_bytes(model, opt, step, extra))


def parse_checkpoint(raw, name="checkpoint"):
    """Verify and decode checkpoint bytes -> the body dict."""
    head, _, text = raw.partition(b"\n")
    parts = head.split(b" ")
    if len(parts) != 3 or parts[0] != CKPT_MAGIC.encode("ascii") or not parts[1].isdigit():
        raise CheckpointError("%s is not a macrogpt checkpoint (bad header); move it aside to start fresh" % name)
    version = int(parts[1])
    if version > CKPT_VERSION:
        raise CheckpointError("%s was written by a newer macrogpt (checkpoint format %d > %d)"
                              % (name, version, CKPT_VERSION))
    if hashlib.sha256(text).hexdigest().encode("ascii") != parts[2]:
        raise CheckpointError("%s is damaged (truncated or edited: checksum mismatch); move it aside to start fresh" % name)
    try:
        return json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError):           # RecursionError: nested deeper than json can parse
        raise CheckpointError("%s is damaged (body is not valid JSON)" % name)


def read_checkpoint(path):
    """Read and verify a checkpoint file -> its body dict. Never modifies the file."""
    return parse_checkpoint(read_bytes(path, "checkpoint", CheckpointError), path)


def restore_checkpoint(body, cfg=None, seed=0):
    """Rebuild (model, opt, step, extra) from a checkpoint body, growing into cfg if it is larger."""
    try:
        saved_cfg = Config.from_dict(body["config"])
        C, V, n_deltas = saved_cfg.n_embd, body["vocab_size"], min(len(body["delta_alphas"]), saved_cfg.max_delta_modules)
        stored = sum(len(p["data"]) for p in body["params"].values()) * 3 // 32      # float64s in base64
        if V * C + 16 * saved_cfg.n_layer * C * C + n_deltas * saved_cfg.delta_rank * C > stored:   # before allocating
            raise CheckpointError("checkpoint is damaged: its sizes claim more weights than it holds")
        model = GPT(saved_cfg, V, seed, init=False)
        for alpha in body["delta_alphas"]:
            if not _is_kind(alpha, "float"):               # 10**400 loaded, then overflowed in every forward
                raise TypeError("a delta alpha is %.40r" % (alpha,))
            model.add_delta()
            for _, lin in model.linears():
                lin.deltas[-1].alpha = alpha
        opt = Adam(saved_cfg)
        order = body["byteorder"]
        for name, t in model.named_params():
            entry = body["params"][name]
            data = unpack_rows(entry, order)
            if [len(data), len(data[0])] != [len(t.data), len(t.data[0])]:
                raise CheckpointError("checkpoint is damaged: %s has the wrong shape" % name)
            t.data = data
            if entry["frozen_rows"]:
                t.freeze(entry["frozen_rows"])
            st = body["adam"].get(name)
            if st is not None:
                m, v = unpack_rows(st["m"], order), unpack_rows(st["v"], order)
                counts = st["t"] if isinstance(st["t"], list) else [st["t"]] * len(m)   # format 1: one count
                opt.state[name] = AdamState(m, v, list(counts))
        if "rng" in body:                              # format 1 restarted the generator from the seed
            version, internal, gauss = body["rng"]
            model.rng.setstate((version, tuple(internal), gauss))
        step, extra = body["step"], body.get("extra", {})
        if not _is_kind(step, "int") or step < 0:          # "x" loaded, then the learner's seed + step raised
            raise TypeError("step is %.40r" % (step,))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as e:
        raise CheckpointError("checkpoint is damaged or incomplete (%s: %s)" % (type(e).__name__, e))
    if cfg is not None and cfg != saved_cfg:
        if all(getattr(cfg, f) == getattr(saved_cfg, f) for f in GROWABLE):
            check_growth(saved_cfg, cfg, model.n_deltas)       # shapes equal: only knobs changed
            model.cfg = opt.cfg = cfg
        else:
            model, opt = grow_model(model, opt, cfg, seed)
    return model, opt, step, extra


def check_growth(old, new, n_deltas):
    """Raise CheckpointError naming the field if `new` cannot be grown into from `old`."""
    for name in GROWABLE:
        a, b = getattr(old, name), getattr(new, name)
        if b < a:
            raise CheckpointError("Config.%s shrank from %d to %d; a trained model only grows "
                                  "(set it back, or move the checkpoint aside to start fresh)" % (name, a, b))
    if new.head_dim != old.head_dim:
        raise CheckpointError("Config.n_head: head_dim changed from %d to %d; grow n_embd and n_head "
                              "together so n_embd / n_head stays %d" % (old.head_dim, new.head_dim, old.head_dim))
    if new.tie_embeddings != old.tie_embeddings:
        raise CheckpointError("Config.tie_embeddings changed; a trained model cannot be re-tied")
    if new.rope_base != old.rope_base:
        raise CheckpointError("Config.rope_base changed; the trained attention depends on it")
    if new.max_delta_modules < n_deltas:
        raise CheckpointError("Config.max_delta_modules (%d) is below the %d delta modules already trained"
                              % (new.max_delta_modules, n_deltas))


def _embed_rows(old, fresh, scale):
    """Old values in the top-left of fresh's shape; the rest is fresh * scale."""
    out = []
    for i, frow in enumerate(fresh):
        orow = old[i] if i < len(old) else []
        out.append(list(orow) + [v * scale for v in frow[len(orow):]])
    return out


def grow_model(model, opt, cfg, seed=0):
    """A model of the larger cfg whose function is close to `model`'s (see GROW_SCALE)."""
    old_cfg = model.cfg
    check_growth(old_cfg, cfg, model.n_deltas)
    grown = GPT(cfg, model.vocab_size, seed + 1)
    for d in model.lm_head.deltas:
        grown.add_delta()
        for _, lin in grown.linears():
            lin.deltas[-1].alpha = d.alpha
    old_params = dict(model.named_params())
    norm_fix = math.sqrt(old_cfg.n_embd / cfg.n_embd)   # keeps rms-normalized old dims unchanged
    new_opt = Adam(cfg)
    for name, t in grown.named_params():
        old = old_params.get(name)
        if old is None:                                # a whole new layer: near-identity block
            if name.endswith((".wo", ".fc2")):
                t.data = scale_rows(t.data, GROW_SCALE)
            continue
        if name.endswith(".A"):
            scale = 0.0                                # new delta columns stay exact no-ops
        elif name.endswith(".B"):
            scale = 1.0
        else:
            scale = GROW_SCALE
        data = _embed_rows(old.data, t.data, scale)
        if name.endswith(("ln1", "ln2", "lnf")) and norm_fix != 1.0:
            n = len(old.data[0])
            data = [[v * norm_fix for v in r[:n]] + r[n:] for r in data]
        t.data = data
        st = opt.state.get(name)
        if st is not None:
            zero_m = zeros(len(t.data), len(t.data[0]))
            counts = st.t + [0] * (len(t.data) - len(st.t))
            new_opt.state[name] = AdamState(_embed_rows(st.m, zero_m, 0.0), _embed_rows(st.v, zero_m, 0.0), counts)
    if any(t.frozen_rows for _, t in model.base_params()):
        grown.freeze_base()                            # new rows and layers too: bursts train only deltas
    grown.rng.setstate(model.rng.getstate())             # later rows continue the old stream
    return grown, new_opt



# ======================================================================================
# Sampler: small pure filters over a probability list, chained, then one seeded draw.
# ======================================================================================
# Every filter takes probabilities (zeros for excluded tokens) and returns a renormalized
# list of the same length. None of them can empty the set: the most likely token survives.

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "entropy_low", "entropy_high",
                 "entropy_temp_boost", "entropy_temp_focus", "repetition_guard", "min_gen_tokens",
                 "max_gen_tokens")


def normalize(probs):
    total = sum(probs)
    if total <= 0:                                     # nothing left: fall back to uniform
        return [1.0 / len(probs)] * len(probs)
    return [p / total for p in probs]


def softmax(logits, temperature=1.0):
    return softmax_row(logits, 1.0 / temperature)


def entropy(probs):
    """Shannon entropy in nats."""
    return -sum(p * math.log(p) for p in probs if p > 0)


def apply_temperature(probs, temperature):
    """p^(1/T), renormalized: the same as dividing logits by T."""
    if temperature == 1.0:
        return list(probs)
    inv = 1.0 / temperature
    top = max(probs)
    return normalize([(p / top) ** inv if p > 0 else 0.0 for p in probs])


def adaptive_temperature(probs, temperature, s):
    """Boost the temperature on peaked distributions, focus it on flat ones (s: settings)."""
    h = entropy(probs)
    if h < s.entropy_low:
        return temperature * s.entropy_temp_boost
    if h > s.entropy_high:
        return temperature * s.entropy_temp_focus
    return temperature


def _keep(probs, kept):
    out = [0.0] * len(probs)
    for i in kept:
        out[i] = probs[i]
    return normalize(out)


def filter_min_p(probs, min_p):
    """Drop tokens below min_p * max p (0 disables)."""
    if min_p <= 0:
        return list(probs)
    threshold = min_p * max(probs)
    return _keep(probs, [i for i, p in enumerate(probs) if p >= threshold and p > 0])


def filter_typical(probs, typical_p):
    """Keep tokens in order of |-log p - H| until their mass reaches typical_p (1 disables)."""
    if typical_p >= 1:
        return list(probs)
    h = entropy(probs)
    order = sorted((i for i, p in enumerate(probs) if p > 0), key=lambda i: (abs(-math.log(probs[i]) - h), i))
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += probs[i]
        if mass >= typical_p:
            break
    return _keep(probs, kept)


def filter_top_k(probs, k):
    """Keep the k most likely tokens, ties to the lower id (0 disables)."""
    if k <= 0:
        return list(probs)
    order = sorted((i for i, p in enumerate(probs) if p > 0), key=lambda i: (-probs[i], i))
    return _keep(probs, order[:k])


def filter_top_p(probs, top_p):
    """Nucleus: the most likely tokens until their mass reaches top_p (1 disables)."""
    if top_p >= 1:
        return list(probs)
    order = sorted((i for i, p in enumerate(probs) if p > 0), key=lambda i: (-probs[i], i))
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return _keep(probs, kept)


def repetition_blocklist(history, n):
    """Tokens that would complete an n-gram already present in history (n < 2 disables).

    [5, 6, 7, 5, 6], n=3 -> {7}: the last two tokens (5, 6) were once followed by 7.
    """
    if n < 2 or len(history) < n:
        return set()
    tail = tuple(history[len(history) - n + 1:])
    return {history[i + n - 1] for i in range(len(history) - n + 1)
            if tuple(history[i:i + n - 1]) == tail}


class Sampler:
    """temperature (entropy-adaptive) -> min_p -> typical_p -> top_k -> top_p -> seeded draw."""

    def __init__(self, settings, seed=0):
        self.s = settings                             # a Config (or anything with its fields)
        self.rng = random.Random(seed)

    def filtered(self, probs, history=()):
        s = self.s
        blocked = repetition_blocklist(list(history), s.repetition_guard)
        if blocked:
            masked = [0.0 if i in blocked else p for i, p in enumerate(probs)]
            if sum(masked) > 0:                       # never block every candidate
                probs = normalize(masked)
        probs = apply_temperature(probs, adaptive_temperature(probs, s.temperature, s))
        probs = filter_min_p(probs, s.min_p)
        probs = filter_typical(probs, s.typical_p)
        probs = filter_top_k(probs, s.top_k)
        return filter_top_p(probs, s.top_p)

    def sample(self, probs, history=()):
        probs = self.filtered(probs, history)
        r = self.rng.random()
        acc = 0.0
        last = 0
        for i, p in enumerate(probs):
            if p > 0:
                acc += p
                last = i
                if r < acc:
                    return i
        return last


def validate_setting(cfg, name, text):
    """'/set top_k 20' -> a new Config, or MacroError with a one-line reason."""
    if name not in SAMPLING_KEYS:
        raise MacroError("unknown setting %r; choose one of: %s" % (name, ", ".join(SAMPLING_KEYS)))
    kind = {"int": int, "float": float}[field_kind(name)]     # the field's type, not the value's
    try:
        value = kind(text)
    except ValueError:
        raise MacroError("%s needs %s, got %r" % (name, "an integer" if kind is int else "a number", text))
    if kind is float and not math.isfinite(value):
        raise MacroError("%s must be a finite number" % name)
    try:
        return dataclasses.replace(cfg, **{name: value})
    except ConfigError as e:
        raise MacroError(str(e))



# ======================================================================================
# Corpus field: an interpolated Kneser-Ney n-gram model over tokens that speaks from second one.
# ======================================================================================
# Order-k counts: the top order uses raw counts c(h w); lower orders use continuation
# counts N1+(. h w), the number of distinct tokens seen before h w. Each order mixes in
# the one below it:
#     P_k(w | h) = max(c(h w) - D, 0) / c(h) + D * types(h) / c(h) * P_{k-1}(w | h')
# and P_0 is uniform over the vocabulary. An unseen context h passes P_{k-1} through.
# Every count is updated per added or removed n-gram, so incremental changes equal a
# rebuild exactly: a continuation count moves only when a raw k-gram appears or vanishes.

class NGramField:
    def __init__(self, order, vocab_size, discount=0.75):
        self.order = order
        self.vocab_size = vocab_size
        self.discount = discount
        self.clear()

    def clear(self):
        # tables[k][context tuple of k-1 tokens] = {token: count}; totals mirror the sums
        self.tables = [None] + [{} for _ in range(self.order)]
        self.totals = [None] + [{} for _ in range(self.order)]
        self.seen = [None] + [{} for _ in range(self.order)]   # raw k-gram -> count (k >= 2)
        self.n_tokens = 0

    def _bump(self, k, gram, by=1):
        ctx, w = gram[:-1], gram[-1]
        row = self.tables[k].setdefault(ctx, {})
        row[w] = row.get(w, 0) + by
        self.totals[k][ctx] = self.totals[k].get(ctx, 0) + by
        if not row[w]:                                        # gone: forget it, so a rebuild compares equal
            del row[w]
            if not row:
                del self.tables[k][ctx], self.totals[k][ctx]

    def _grams(self, ids):
        N = self.order
        seq = [BOS] * (N - 1) + list(ids) + [EOS]
        return [tuple(seq[i - N + 1:i + 1]) for i in range(N - 1, len(seq))]

    def add(self, ids, by=1):
        """Count one line of token ids, framed by BOS padding and a closing EOS (by=-1 removes it)."""
        N = self.order
        for top in self._grams(ids):
            for k in range(2, N + 1):
                gram = top[N - k:]
                seen = self.seen[k]
                before = seen.get(gram, 0)
                if before + by:
                    seen[gram] = before + by
                else:
                    del seen[gram]
                if not before or not before + by:             # gram[1:] gained or lost a left extension
                    self._bump(k - 1, gram[1:], by)
            self._bump(N, top, by)
        self.n_tokens += by * (len(ids) + 1)

    def remove(self, ids):
        """Exactly undo add(ids) of a line counted earlier."""
        self.add(ids, by=-1)

    def rebuild(self, seqs):
        """The counts of adding every line, computed in bulk: each distinct k-gram is counted
        in C (Counter over zipped slices) and bumped once, instead of once per occurrence."""
        self.clear()
        N = self.order
        grams = [None] + [Counter() for _ in range(N)]         # grams[k]: raw k-gram counts
        for ids in seqs:
            seq = [BOS] * (N - 1) + list(ids) + [EOS]
            for k in range(1, N + 1):
                tail = seq[N - k:]                             # k-grams ending at every position
                grams[k].update(zip(*[tail[j:] for j in range(k)]))
            self.n_tokens += len(ids) + 1
        self._fill(N, grams[N])
        for k in range(2, N + 1):
            self.seen[k] = dict(grams[k])
            self._fill(k - 1, Counter(map(operator.itemgetter(slice(1, None)), grams[k])))   # left extensions

    def _fill(self, k, counts):
        """Order k's table from {k-gram: count} (a fresh table only)."""
        table = self.tables[k]
        for gram, c in counts.items():
            row = table.get(gram[:-1])
            if row is None:
                row = table[gram[:-1]] = {}
            row[gram[-1]] = c
        self.totals[k] = {ctx: sum(row.values()) for ctx, row in table.items()}

    def grow_vocab(self, vocab_size):
        self.vocab_size = max(self.vocab_size, vocab_size)

    def _context(self, context):
        N = self.order
        ctx = [BOS] * (N - 1) + list(context[-(N - 1):] if N > 1 else [])
        return tuple(ctx[len(ctx) - (N - 1):]) if N > 1 else ()

    def probs(self, context):
        """P(. | last order-1 tokens of context) over the whole vocabulary; sums to 1."""
        full = self._context(context)
        D, V = self.discount, self.vocab_size
        p = [1.0 / V] * V
        for k in range(1, self.order + 1):
            ctx = full[len(full) - (k - 1):] if k > 1 else ()
            row = self.tables[k].get(ctx)
            if not row:
                continue
            total = self.totals[k][ctx]
            gamma = D * len(row) / total
            p = [gamma * v for v in p]
            for w, c in row.items():
                p[w] += (c - D) / total
        return p

    def prob(self, context, token):
        """P(token | context), the same recursion for one token."""
        full = self._context(context)
        D = self.discount
        p = 1.0 / self.vocab_size
        for k in range(1, self.order + 1):
            ctx = full[len(full) - (k - 1):] if k > 1 else ()
            row = self.tables[k].get(ctx)
            if not row:
                continue
            total = self.totals[k][ctx]
            p = D * len(row) / total * p + max(row.get(token, 0) - D, 0.0) / total
        return p

    def novelty(self, ids, n=3):
        """Share of the line's n-grams (n = min(3, order)) the field has never counted."""
        n = min(n, self.order)
        seq = [BOS] * (n - 1) + list(ids) + [EOS]
        grams = [tuple(seq[i - n + 1:i + 1]) for i in range(n - 1, len(seq))]
        if n == 1:
            unigrams = self.tables[1].get((), {})
            return sum(1 for g in grams if g[0] not in unigrams) / len(grams)
        return sum(1 for g in grams if g not in self.seen[n]) / len(grams)


def mix(p_model, p_field, lam):
    """lam * p_model + (1 - lam) * p_field."""
    mu = 1.0 - lam
    return [lam * a + mu * b for a, b in zip(p_model, p_field)]


LAMBDA_GRID = [i / 20 for i in range(21)]


def nll_of(probs):
    """Total negative log-likelihood (nats) of the probabilities given to the true tokens."""
    return -sum(math.log(max(p, 1e-300)) for p in probs)


def mix_nll(pairs, lam):
    """Total NLL (nats) of the mix lam * network + (1 - lam) * field, from (p_model, p_field) pairs."""
    return nll_of([lam * a + (1.0 - lam) * b for a, b in pairs])


def best_lambda(pairs):
    """The mixing weight that minimizes held-out NLL, from (p_model, p_field) of each true token."""
    if not pairs:
        return 0.0
    return min(LAMBDA_GRID, key=lambda lam: mix_nll(pairs, lam))


def bits_per_byte(nll_nats, n_bytes):
    return nll_nats / math.log(2) / max(1, n_bytes)


# Recall and Lexicon: two more things the corpus knows, a topic and its words.

WORD_RE = re.compile(r"[^\W\d_]{3,}")


def content_words(text):
    return set(w.lower() for w in WORD_RE.findall(text))


class Recall:
    """Which corpus answers follow questions that share rare words with a message.

    It gives the field a topic: the answers found become a small local field mixed into
    the global one, so a first-second reply is about what was asked, not only fluent.
    A pair is an "H:" line and the "A:" line stored right after it (ids i and i + 1), so
    adding or removing one line changes only its own pair, exactly as a rebuild would.
    """

    def __init__(self, lines=()):
        self.questions = {}                        # id -> H: line
        self.answers = {}                          # id -> A: line whose question is id - 1
        self.words = {}                            # answer id -> its question's content words
        self.index = {}                            # word -> answer ids
        for i, line in enumerate(lines):
            self.add(i, line)

    def add(self, i, line):
        if line.startswith("H:"):
            self.questions[i] = line
        elif line.startswith("A:") and i - 1 in self.questions:
            self.answers[i] = line
            self.words[i] = content_words(self.questions[i - 1])
            for w in self.words[i]:
                self.index.setdefault(w, set()).add(i)

    def remove(self, i):
        self.questions.pop(i, None)
        for a in (i, i + 1):                       # its own pair, or the pair it asked
            if a in self.answers:
                del self.answers[a]
                for w in self.words.pop(a):
                    self.index[w].discard(a)
                    if not self.index[w]:
                        del self.index[w]

    def answers_for(self, text, k=4):
        scores = {}
        for w in content_words(text):
            hits = self.index.get(w, ())
            if hits:
                idf = math.log(1.0 + len(self.answers) / len(hits))
                for i in hits:
                    scores[i] = scores.get(i, 0.0) + idf
        best = sorted(scores, key=lambda i: (-scores[i], -i))[:k]
        return [self.answers[i] for i in best]


LETTERS_RE = re.compile(r"[^\W\d_]+")
TRAILING_LETTERS_RE = re.compile(r"[^\W\d_]+$")


LEXICON_MAX_WORD = 40                      # longer letter runs (a pasted DNA string) are not words


def fold_case(text):
    """text.lower(), except that a final sigma becomes an ordinary one.

    str.lower() turns a capital sigma at the end of a word into "ς" and elsewhere into "σ", so a
    word lowercased whole would differ from the same word lowercased token by token.
    """
    return text.lower().replace("ς", "σ")


class Lexicon:
    """The corpus's words and their prefixes (lowercased), so that a reply never coins a word.

    The field's back-off, and a young network, can join the start of one word to the end of
    another ("sure" + "tch" -> "suretch"). A token may continue the word in progress only if
    the result begins some known word, and may end it only if it is a known word. Tokens that
    are part of a UTF-8 character are let in only if some character the corpus uses can
    complete them acceptably, and never into bytes that are not UTF-8.
    """

    def __init__(self, lines=()):
        self.words, self.prefixes = set(), {""}
        self.next_letters = {}                     # prefix -> letters that continue it
        self.symbols = set()                       # non-ASCII characters that are not letters
        self._tokens = None                        # (tokenizer size, per-token letter runs)
        for line in lines:
            self.add(line)

    def add(self, text):
        text = fold_case(text)
        for w in LETTERS_RE.findall(text):
            if w not in self.words and len(w) <= LEXICON_MAX_WORD:   # prefixes cost len(w)^2
                self.words.add(w)
                for i in range(len(w)):
                    self.prefixes.add(w[:i + 1])
                    self.next_letters.setdefault(w[:i], set()).add(w[i])
        self.symbols.update(c for c in text if ord(c) > 127 and not c.isalpha() and not 0xD800 <= ord(c) < 0xE000)

    def _classify(self, tok):
        """Token ids by shape, for `guard` (recomputed when the vocabulary grows).

        letters: (id, leading letter run, whether that is all of it, trailing run) of tokens
        that start with a letter; breaks: (id, trailing run) of the other whole-UTF-8 tokens
        (EOS among them); partials: (id, bytes, text of the whole characters or None if not
        UTF-8, bytes of an unfinished last character) of tokens that split a character.
        """
        if self._tokens is None or self._tokens[0] != tok.vocab_size:
            letters, breaks, partials = [], [], []
            for i in range(tok.vocab_size):
                if i in (BOS, PAD):
                    continue
                data = tok.token_bytes(i) if i != EOS else b""
                try:
                    text = fold_case(data.decode("utf-8"))
                except UnicodeDecodeError:
                    complete, rest = split_incomplete_utf8(data)
                    try:
                        added = fold_case(complete.decode("utf-8"))
                    except UnicodeDecodeError:
                        added = None
                    partials.append((i, data, added, rest))
                    continue
                lead = LETTERS_RE.match(text)
                trail = TRAILING_LETTERS_RE.search(text)
                if lead:
                    whole = lead.end() == len(text)
                    letters.append((i, lead.group(), whole, "" if whole or not trail else trail.group()))
                else:
                    breaks.append((i, trail.group() if trail else ""))
            self._tokens = (tok.vocab_size, letters, breaks, partials)
        return self._tokens[1:]

    def _fits(self, text):
        """Whether every letter run of text is a known word, the last one possibly a prefix."""
        for m in LETTERS_RE.finditer(text):
            if m.group() not in (self.prefixes if m.end() == len(text) else self.words):
                return False
        return True

    def _starts(self, tail, may_end):
        """Byte strings that begin a character allowed next: a letter continuing tail, or a symbol."""
        chars = set(self.next_letters.get(tail, ()))
        if may_end:
            chars |= self.symbols
        return {c.encode("utf-8")[:k] for c in chars for k in range(1, len(c.encode("utf-8")))}

    def _allows(self, tail, may_end, added, rest, starts):
        """Whether text `added` (None: not UTF-8) then the unfinished bytes `rest` may follow tail."""
        if added is None or (added and rest) or not self._fits(tail + added):
            return False
        return not rest or rest in starts

    def guard(self, probs, tok, data):
        """probs with every word-coining token removed; unchanged if that would remove them all.

        `data` is the reply so far as bytes; its trailing letters are the word in progress.
        """
        done, pending = split_incomplete_utf8(data)
        m = TRAILING_LETTERS_RE.search(fold_case(done.decode("utf-8", "replace")))
        tail = m.group() if m else ""
        may_end = not tail or tail in self.words
        starts = self._starts(tail, may_end)
        letters, breaks, partials = self._classify(tok)
        out = list(probs)
        if pending:                                # mid-character: decode what each token completes
            for i in range(tok.vocab_size):
                if i in (BOS, PAD):
                    continue
                raw = b"" if i == EOS else tok.token_bytes(i)
                complete, rest = split_incomplete_utf8(pending + raw)
                try:
                    added = fold_case(complete.decode("utf-8"))
                except UnicodeDecodeError:
                    added = None
                if not raw or not self._allows(tail, may_end, added, rest, starts):
                    out[i] = 0.0                   # (EOS may not cut a character in half)
        else:
            words, prefixes = self.words, self.prefixes
            banned = [i for i, lead, whole, trail in letters
                      if (tail + lead) not in (prefixes if whole else words) or (trail and trail not in prefixes)]
            banned += [i for i, trail in breaks if not may_end or (trail and trail not in prefixes)]
            banned += [i for i, raw, added, rest in partials
                       if not self._allows(tail, may_end, added, rest, starts)]
            for i in banned:
                out[i] = 0.0
        return out if sum(out) > 0.0 else probs


def split_incomplete_utf8(data):
    """bytes -> (bytes up to the last whole character, the start of an unfinished one)."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b < 0x80:
            break
        if b >= 0xC0:                              # a lead byte: how long should its sequence be?
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            if back < need:
                return data[:-back], data[-back:]
            break
    return data, b""


# ======================================================================================
# Memory: one SQLite file holds the conversation, the living corpus, events and the growth log.
# ======================================================================================
# Text is stored as UTF-8 BLOBs made by text_to_bytes, so stray bytes from a pipe survive a
# round trip that SQLite's TEXT type would refuse. Every statement is parameterized.

class MemoryStoreError(MacroError):
    pass


MEMORY_VERSION = 2
SCHEMA = """
CREATE TABLE messages (id INTEGER PRIMARY KEY, time REAL NOT NULL, role TEXT NOT NULL, text BLOB NOT NULL);
CREATE TABLE corpus (id INTEGER PRIMARY KEY, line BLOB NOT NULL UNIQUE, source TEXT NOT NULL, time REAL NOT NULL);
CREATE TABLE events (id INTEGER PRIMARY KEY, time REAL NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE growth (id INTEGER PRIMARY KEY, time REAL NOT NULL, step INTEGER, vocab INTEGER,
                     params INTEGER, deltas INTEGER, loss REAL, heldout_bpb REAL, tokens_per_s REAL,
                     note TEXT, network_bpb REAL, field_bpb REAL);
CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Statements that take schema version v to v + 1; a file is brought up to date when opened.
MIGRATIONS = {
    1: ("ALTER TABLE growth ADD COLUMN network_bpb REAL",       # heldout_bpb is the mix; these are
        "ALTER TABLE growth ADD COLUMN field_bpb REAL"),        # its two sources, for the chart
}
GROWTH_FIELDS = ("step", "vocab", "params", "deltas", "loss", "heldout_bpb", "tokens_per_s", "note",
                 "network_bpb", "field_bpb")
STATE_KINDS = {"seed_digest": str, "settings": dict, "burst_mark": int}   # what readers of each key expect


def _one_line(e):
    """An SQLite message for a one-line error: it quotes names from the file, which damage can break."""
    return str(e).replace("\n", "\\n")


def _guarded(method):
    """Memory's one error boundary: an SQLite failure after open (locked past the busy timeout,
    disk full, a damaged page) becomes one MemoryStoreError; the transaction is rolled back."""
    @functools.wraps(method)
    def guarded(self, *args, **kw):
        try:
            return method(self, *args, **kw)
        except sqlite3.Error as e:
            raise MemoryStoreError("database %s: %s" % (self.path, _one_line(e))) from None
    return guarded


class Memory:
    def __init__(self, path):
        self.path = path
        created = not os.path.exists(path)
        if created:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except OSError as e:
                raise MemoryStoreError("cannot create database %s: %s" % (path, e.strerror or e))
        try:
            self.db = sqlite3.connect(path, timeout=5.0, isolation_level=None)
        except sqlite3.Error as e:
            raise MemoryStoreError("cannot open database %s: %s" % (path, _one_line(e)))
        try:
            self._check_and_migrate(path)
        except BaseException:
            self.db.close()
            raise

    def _check_and_migrate(self, path):
        try:
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except (sqlite3.DatabaseError, UnicodeDecodeError) as e:   # a damaged byte in a table's name
            if _is_sqlite_file(path):
                raise MemoryStoreError("%s is damaged (%s); %s" % (path, _one_line(e), _damaged_hint(path)))
            raise MemoryStoreError("%s is not a macrogpt database (%s); move it aside or pass --db" % (path, _one_line(e)))
        if version > MEMORY_VERSION:
            raise MemoryStoreError("%s was written by a newer macrogpt (schema %d > %d)" % (path, version, MEMORY_VERSION))
        if version < 0 or version == 0 and tables:        # no macrogpt ever wrote a negative version
            raise MemoryStoreError("%s is an SQLite file but not a macrogpt database; pass another --db" % path)
        if version:
            self._check_intact(path, tables)
        try:
            self.db.execute("PRAGMA busy_timeout = 5000")
            self.db.execute("PRAGMA journal_mode = WAL")
            if version == 0:
                with self.transaction():
                    for stmt in SCHEMA.split(";"):
                        if stmt.strip():
                            self.db.execute(stmt)
                    self.db.execute("PRAGMA user_version = %d" % MEMORY_VERSION)
            elif version < MEMORY_VERSION:
                self._migrate(version)
        except sqlite3.Error as e:
            raise MemoryStoreError("cannot use database %s: %s" % (path, _one_line(e)))

    def _migrate(self, version):
        """All steps from `version` to MEMORY_VERSION in one transaction: a failure leaves the file as it was."""
        with self.transaction():
            for v in range(version, MEMORY_VERSION):
                for stmt in MIGRATIONS[v]:
                    self.db.execute(stmt)
            self.db.execute("PRAGMA user_version = %d" % MEMORY_VERSION)

    def _check_intact(self, path, tables):
        """Refuse a damaged file at open, before anything is written to it (quick_check: ~2 ms at 20,000 lines)."""
        hint = _damaged_hint(path)
        try:
            problems = [r[0] for r in self.db.execute("PRAGMA quick_check")]
            missing = sorted(set(re.findall(r"CREATE TABLE (\w+)", SCHEMA)) - tables)
            state = self.db.execute("SELECT key, value FROM state").fetchall() if not missing else []
            odd_ids = 0 if missing else self.db.execute(
                "SELECT COUNT(*) FROM corpus WHERE typeof(id) != 'integer'").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise MemoryStoreError("%s is damaged (%s); %s" % (path, _one_line(e), hint))
        if problems != ["ok"]:
            raise MemoryStoreError("%s is damaged (%s); %s" % (path, problems[0].splitlines()[-1], hint))
        if missing:
            raise MemoryStoreError("%s is damaged (table %s is missing); %s" % (path, missing[0], hint))
        if odd_ids:                                    # an edited schema: id is no longer the row's number
            raise MemoryStoreError("%s is damaged (%d corpus ids are not integers); %s" % (path, odd_ids, hint))
        for key, value in state:
            try:
                loaded = json.loads(value)
                ok = isinstance(loaded, STATE_KINDS.get(key, object)) and not (   # SQLite takes 64-bit integers only
                    isinstance(loaded, int) and not -2 ** 63 <= loaded < 2 ** 63)
            except (TypeError, ValueError, RecursionError):  # RecursionError: nested deeper than json can parse
                ok = False
            if not ok:
                raise MemoryStoreError("%s is damaged (state %r holds %.40r); delete that row of table state, or %s"
                                       % (path, key, value, hint))

    def transaction(self):
        return _Transaction(self.db)

    def close(self):
        if self.db is not None:
            self.db.close()
            self.db = None

    def _text(self, value):
        """A stored text: a BLOB as written, or TEXT as an edit by hand leaves it; a number is damage."""
        if isinstance(value, str):
            return value
        if not isinstance(value, bytes):
            raise MemoryStoreError("%s is damaged (a text holds %.40r); %s" % (self.path, value, _damaged_hint(self.path)))
        return bytes_to_text(value)

    # -- conversation ------------------------------------------------------------------------
    @_guarded
    def add_message(self, role, text):
        with self.transaction():
            self.db.execute("INSERT INTO messages (time, role, text) VALUES (?, ?, ?)",
                            (time.time(), role, text_to_bytes(text)))

    @_guarded
    def recent_messages(self, n):
        rows = self.db.execute("SELECT role, text FROM messages ORDER BY id DESC LIMIT ?", (n,)).fetchall()
        return [(role, self._text(text)) for role, text in reversed(rows)]

    @_guarded
    def message_count(self):
        return self.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]

    # -- living corpus -----------------------------------------------------------------------
    @_guarded
    def add_corpus_lines(self, lines, source):
        """Insert lines not already present -> [(id, line)] of those that were new, in order."""
        now, added = time.time(), []
        with self.transaction():
            for line in lines:
                cur = self.db.execute("INSERT OR IGNORE INTO corpus (line, source, time) VALUES (?, ?, ?)",
                                      (text_to_bytes(line), source, now))
                if cur.rowcount:
                    added.append((cur.lastrowid, line))
        return added

    @_guarded
    def remove_corpus_lines(self, lines):
        """Delete these lines from the corpus if present -> [(id, line)] of those removed.

        Only reads when none is present, so a start finds nothing to write (and no lock to wait for)."""
        found = []
        for line in lines:
            row = self.db.execute("SELECT id FROM corpus WHERE line = ?", (text_to_bytes(line),)).fetchone()
            if row:
                found.append((row[0], line))
        if found:
            with self.transaction():
                self.db.executemany("DELETE FROM corpus WHERE id = ?", [(i,) for i, _ in found])
        return found

    @_guarded
    def corpus_rows(self):
        """[(id, line)] of the whole corpus in id order."""
        return [(i, self._text(line)) for i, line in self.db.execute("SELECT id, line FROM corpus ORDER BY id")]

    @_guarded
    def corpus_lines(self):
        return [line for _, line in self.corpus_rows()]

    @_guarded
    def corpus_mark(self):
        """The newest corpus id: a burst records it, so a restart knows what is still unlearned."""
        return self.db.execute("SELECT COALESCE(MAX(id), 0) FROM corpus").fetchone()[0]

    @_guarded
    def chat_bytes_after(self, mark):
        """Bytes of conversation lines stored after corpus id `mark`."""
        return self.db.execute("SELECT COALESCE(SUM(LENGTH(line)), 0) FROM corpus WHERE source = 'chat' AND id > ?",
                               (mark,)).fetchone()[0]

    @_guarded
    def corpus_stats(self):
        lines, size = self.db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(line)), 0) FROM corpus").fetchone()
        chat = self.db.execute("SELECT COUNT(*) FROM corpus WHERE source = 'chat'").fetchone()[0]
        return {"lines": lines, "bytes": size, "chat_lines": chat}

    @_guarded
    def prune_corpus(self, ids, why):
        """Delete the corpus lines with these ids and log why, in one transaction."""
        with self.transaction():
            self.db.executemany("DELETE FROM corpus WHERE id = ?", [(i,) for i in ids])
            self.db.execute("INSERT INTO events (time, kind, detail) VALUES (?, 'prune', ?)", (time.time(), why))

    # -- logs and small state ------------------------------------------------------------------
    @_guarded
    def log_event(self, kind, detail):
        with self.transaction():
            self.db.execute("INSERT INTO events (time, kind, detail) VALUES (?, ?, ?)", (time.time(), kind, detail))

    @_guarded
    def log_growth(self, **row):
        values = [row.get(k) for k in GROWTH_FIELDS]
        with self.transaction():
            self.db.execute("INSERT INTO growth (time, %s) VALUES (?, %s)" % (", ".join(GROWTH_FIELDS),
                            ", ".join("?" * len(GROWTH_FIELDS))), [time.time()] + values)

    @_guarded
    def growth_rows(self):
        cur = self.db.execute("SELECT %s FROM growth ORDER BY id" % ", ".join(GROWTH_FIELDS))
        return [dict(zip(GROWTH_FIELDS, r)) for r in cur]

    @_guarded
    def rejected_bursts(self):
        return self.db.execute("SELECT COUNT(*) FROM growth WHERE note LIKE 'rejected%'").fetchone()[0]

    @_guarded
    def get_state(self, key, default=None):
        row = self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    @_guarded
    def set_state(self, key, value):
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, json.dumps(value)))


def _is_sqlite_file(path):
    with open(path, "rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


def _damaged_hint(path):
    return "move it aside to start a fresh memory (`sqlite3 %s .recover` may save what is left)" % path


class _Transaction:
    """BEGIN ... COMMIT, or ROLLBACK if the block raises (the connection is in autocommit mode)."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, tb):
        try:
            if kind is None:
                self.db.execute("COMMIT")
        finally:
            if self.db.in_transaction:                 # the block raised, or COMMIT failed (disk full)
                self.db.execute("ROLLBACK")
        return False


def read_corpus_file(path, what="corpus"):
    """The seed corpus (or an eval file): one utterance per non-blank line, stray bytes kept (surrogateescape)."""
    lines = [line.strip() for line in bytes_to_text(read_bytes(path, what)).splitlines()]
    return [line for line in lines if line]




# ======================================================================================
# Corpus: the living text and everything derived from it, kept current line by line.
# ======================================================================================
# The database holds the training lines; the Corpus holds their token ids, the training
# stream, the field, Recall, Lexicon and the held-out slice. A turn adds two lines and
# pruning drops a few, and each change updates every derived structure in place; only a
# BPE retrain re-encodes everything. Caches are keyed on `version`, which only goes up.
#
# The held-out slice is chosen by content: a seed line is held out when a hash of its text
# says so, so editing the file or changing `heldout_every` cannot move a trained line into
# the slice, and a held-out line never reaches the training side (database, field,
# stream, BPE text), not even when someone types it in chat.

HELDOUT_MAX_TOKENS = 2048                 # cap on the held-out slice scored per evaluation
TEACHER_TOP_K = 32                        # ids of the field's distribution kept per training target
TEACHER_CACHE_LINES = 6000                # lines whose teacher rows are kept (32 x 8 bytes per token)
TEACHER_SLICE_SECONDS = 0.01              # teacher work between two yields to the event loop


def is_heldout(line, every):
    """Whether a seed line is held out: one line in `every`, chosen by a hash of its text."""
    digest = hashlib.sha256(text_to_bytes(line)).digest()
    return int.from_bytes(digest[:8], "big") % every == 0


def split_heldout(lines, every):
    """-> (training lines, held-out lines), each in file order."""
    train, held = [], []
    for line in lines:
        (held if is_heldout(line, every) else train).append(line)
    return train, held


def top_k_distribution(probs, k):
    """The k likeliest ids of probs, renormalized -> (array of ids, array of weights)."""
    ids = heapq.nlargest(k, range(len(probs)), key=probs.__getitem__)
    z = sum(probs[i] for i in ids)
    return array.array("i", ids), array.array("f", [probs[i] / z for i in ids])


def format_turn(role, text):
    """A message as a corpus line: 'H: ...' or 'A: ...' with whitespace collapsed."""
    return ("H: " if role == "user" else "A: ") + " ".join(text.split())


@dataclass
class Heldout:
    """Held-out evidence: bits per byte of network, field and mix, and what set the mix."""
    model_bpb: float
    field_bpb: float
    mix_bpb: float
    lam: float                            # the mixing weight that minimized the mix's loss
    bytes: int
    nll: float                            # the network's total NLL (nats), for the forget guard

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d.setdefault("lam", d.pop("lambda", 0.0))              # checkpoints before the Corpus
        d.setdefault("nll", d["model_bpb"] * math.log(2) * d["bytes"])
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass
class Pending:
    """Conversation material not yet learned by a burst."""
    bytes: int = 0
    grams: int = 0                        # its token n-grams ...
    novel: float = 0.0                    # ... and how many the field had not seen

    @property
    def novelty(self):
        return self.novel / max(1, self.grams)


class Corpus:
    def __init__(self, cfg, memory, tok, heldout_lines, seed=0):
        self.cfg, self.memory, self.tok = cfg, memory, tok
        self.heldout_lines = list(heldout_lines)
        self.rng = random.Random(seed)    # pruning's sample
        self.version = 0                  # bumped on every change; the caches' key
        self.texts, self.ids = {}, {}     # corpus id -> line, and its token ids (ascending ids)
        self.n_bytes = 0
        self.recall, self.lexicon = Recall(), Lexicon()
        self.field = None
        self._stream = self._field_probs = None
        self.teacher = {}                 # corpus id -> the field's rows for the line (see teach)
        removed = memory.remove_corpus_lines(self.heldout_lines)   # a changed rule now holds them out
        if removed:
            memory.log_event("heldout", "removed %d held-out lines from the training side" % len(removed))
        for i, line in memory.corpus_rows():
            self.texts[i] = line
            self.n_bytes += len(text_to_bytes(line))
            self.recall.add(i, line)
            self.lexicon.add(line)
        self.pending = Pending(bytes=memory.chat_bytes_after(memory.get_state("burst_mark", 0)))
        self.reencode()

    def reencode(self):
        """Encode every line and the held-out slice with the current tokenizer; rebuild the field."""
        tok = self.tok
        self.ids = {i: tok.encode(line) for i, line in self.texts.items()}
        self.field = NGramField(self.cfg.field_order, tok.vocab_size, self.cfg.field_discount)
        self.field.rebuild(self.ids.values())
        self.teacher = {}
        # every n-th held-out line, so a slice larger than the cap is sampled across the whole file
        encoded = [tok.encode(line) + [EOS] for line in self.heldout_lines]
        every = max(1, -(-sum(map(len, encoded)) // HELDOUT_MAX_TOKENS))
        held = [t for ids in encoded[::every] for t in ids]
        self.heldout_stream = [EOS] + held[:HELDOUT_MAX_TOKENS]
        # bytes of text scored; each line end (EOS) counts as one byte, like a newline
        self.heldout_bytes = sum(len(tok.token_bytes(t)) or 1 for t in self.heldout_stream[1:])
        self.version += 1

    # -- lines in and out ---------------------------------------------------------------------
    def add(self, lines, source):
        """Store new lines (a held-out line never), learn them everywhere, prune -> lines added."""
        held = set(self.heldout_lines)
        added = self.memory.add_corpus_lines([l for l in lines if l and l not in held], source)
        for i, line in added:
            ids = self.tok.encode(line)
            if source == "chat":
                self.pending.novel += self.field.novelty(ids) * (len(ids) + 1)
                self.pending.grams += len(ids) + 1
                self.pending.bytes += len(text_to_bytes(line))
            self.texts[i], self.ids[i] = line, ids
            self.n_bytes += len(text_to_bytes(line))
            self.field.add(ids)
            self.recall.add(i, line)
            self.lexicon.add(line)
        self._prune()
        self.version += 1
        return len(added)

    def _prune(self):
        """Past max_corpus_lines: keep the newest half of it and a random sample of the older lines."""
        n, limit = len(self.texts), self.cfg.max_corpus_lines
        if n <= limit:
            return
        older = list(itertools.islice(self.texts, n - limit // 2))     # ids ascend: the oldest first
        drop = self.rng.sample(older, n - limit)
        self.memory.prune_corpus(drop, "removed %d of %d corpus lines" % (len(drop), n))
        for i in drop:
            self.n_bytes -= len(text_to_bytes(self.texts.pop(i)))
            self.field.remove(self.ids.pop(i))
            self.recall.remove(i)
            self.teacher.pop(i, None)

    def take_pending(self):
        """The material waiting for a burst, now handed to one."""
        pending, self.pending = self.pending, Pending()
        return pending

    def training_lines(self):
        return list(self.texts.values())

    # -- what the trainer reads --------------------------------------------------------------
    def stream(self):
        """The training lines as one token stream, EOS after every line."""
        return self._layout()[1]

    def _layout(self):
        """-> (version, stream, starts, keys): line n of the stream is corpus id keys[n], its
        tokens and EOS at positions starts[n] .. starts[n + 1] - 1."""
        if self._stream is None or self._stream[0] != self.version:
            out, starts, keys = [EOS], [], []
            for i, ids in self.ids.items():
                starts.append(len(out))
                keys.append(i)
                out.extend(ids)
                out.append(EOS)
            self._stream = (self.version, out, starts, keys)
        return self._stream

    # -- the field as a teacher ------------------------------------------------------------------
    # The network learns faster when part of each target is the field's distribution for the same
    # context (measured: 3-5% lower held-out loss at equal tokens). The field has counted every
    # training line, so a line's own rows are computed with the line taken out of the counts
    # (leave one out); else the teacher would hand over the answer. Rows are computed when a
    # line is first sampled, in slices between which the event loop runs, and kept until the
    # tokenizer changes; a line that came later does not update the rows of the lines before it.
    def _teach_line(self, i):
        ids = self.ids[i]
        self.field.remove(ids)
        try:
            rows = [top_k_distribution(self.field.probs(ids[:j]), TEACHER_TOP_K) for j in range(len(ids) + 1)]
        finally:
            self.field.add(ids)
        if len(self.teacher) >= TEACHER_CACHE_LINES:
            del self.teacher[next(iter(self.teacher))]          # the oldest rows go first
        self.teacher[i] = (array.array("i", chain.from_iterable(r[0] for r in rows)),
                           array.array("f", chain.from_iterable(r[1] for r in rows)))

    async def teach(self, stream, batches, length):
        """The field's rows for windows of `length` + 1 tokens at the start offsets in batches ->
        per batch, per window (ids, weights), TEACHER_TOP_K of each per predicted token; None if
        `stream` is no longer the corpus's stream. A line pruned meanwhile teaches the truth."""
        _, current, starts, keys = self._layout()
        if current is not stream:
            return None
        spans = [[self._spans(starts, keys, len(stream), s, length) for s in batch] for batch in batches]
        t0 = time.perf_counter()
        for i in {i for batch in spans for window in batch for i, _, _ in window}:
            if i not in self.teacher and i in self.ids:
                self._teach_line(i)
                if time.perf_counter() - t0 > TEACHER_SLICE_SECONDS:
                    await asyncio.sleep(0)
                    t0 = time.perf_counter()
        return [[self._rows(window, stream, start) for window, start in zip(batch, starts_of)]
                for batch, starts_of in zip(spans, batches)]

    @staticmethod
    def _spans(starts, keys, end, start, length):
        """The lines a window predicts: [(corpus id, first row, last row + 1)] in stream order."""
        out, j, stop = [], start + 1, min(end, start + length + 1)
        n = bisect.bisect_right(starts, j) - 1
        while j < stop:
            line_end = starts[n + 1] if n + 1 < len(starts) else end
            r1 = min(stop, line_end)
            out.append((keys[n], j - starts[n], r1 - starts[n]))
            j, n = r1, n + 1
        return out

    def _rows(self, window, stream, start):
        k, ids, ws = TEACHER_TOP_K, array.array("i"), array.array("f")
        j = start + 1
        for i, r0, r1 in window:
            rows = self.teacher.get(i)
            if rows is None:                                   # pruned meanwhile: the truth, weight 1
                for t in stream[j:j + r1 - r0]:
                    ids.extend([t] * k)
                    ws.extend([1.0] + [0.0] * (k - 1))
            else:
                ids.extend(rows[0][r0 * k:r1 * k])
                ws.extend(rows[1][r0 * k:r1 * k])
            j += r1 - r0
        return ids, ws

    def stream_offset(self, mark):
        """Where in the stream the lines stored after corpus id `mark` begin."""
        return 1 + sum(len(ids) + 1 for i, ids in self.ids.items() if i <= mark)

    def field_probs(self):
        """Field probability of every held-out token, context = the tokens earlier in its line."""
        if self._field_probs is None or self._field_probs[0] != self.version:
            out, line = [], []
            for cur, nxt in zip(self.heldout_stream, self.heldout_stream[1:]):
                line = [] if cur == EOS else line + [cur]
                out.append(self.field.prob(line, nxt))
            self._field_probs = (self.version, out)
        return self._field_probs[1]

    def evidence(self, model_probs):
        """The network's probabilities of the held-out tokens -> Heldout figures and lambda."""
        pairs = list(zip(model_probs, self.field_probs()))
        lam = best_lambda(pairs)
        n = self.heldout_bytes
        return Heldout(model_bpb=bits_per_byte(mix_nll(pairs, 1.0), n), field_bpb=bits_per_byte(mix_nll(pairs, 0.0), n),
                       mix_bpb=bits_per_byte(mix_nll(pairs, lam), n), lam=lam, bytes=n, nll=nll_of(model_probs))

    # -- the tokenizer grows with the text ----------------------------------------------------
    def bpe_due(self, done_chars):
        if self.cfg.bpe_num_merges == 0:
            return False
        if done_chars == 0:
            return self.n_bytes >= self.cfg.enable_bpe_after_chars
        return self.n_bytes - done_chars >= self.cfg.bpe_retrain_every_chars

    def update_tokenizer(self, progress):
        """If the text grew enough since progress.bpe_chars, append merges learned from the training
        lines and re-encode -> the new ids."""
        if not self.bpe_due(progress.bpe_chars):
            return []
        merges = self.cfg.bpe_retrain_merges if progress.bpe_chars else self.cfg.bpe_num_merges
        added = self.tok.train(self.training_lines(), merges)
        progress.bpe_chars = self.n_bytes
        if added:
            self.reencode()
            self.memory.log_event("bpe", "added %d merges; vocab %d" % (len(added), self.tok.vocab_size))
        return added


# ======================================================================================
# Brain: the network, its optimizer and tokenizer, and the progress that travels with them.
# ======================================================================================

@dataclass
class Progress:
    """What the trainer has achieved, saved inside the checkpoint beside the weights."""
    warmup_done: bool = False
    bpe_chars: int = 0                    # corpus bytes when BPE last trained
    lam: float = 0.0                      # the voice's mixing weight (0: the field speaks alone)
    bursts: int = 0
    idle_phases: int = 0                  # idle-learning phases judged (kept or rolled back)
    loss: float = None                    # mean training loss of the last job (nats)
    tokens_per_s: float = None
    heldout: Heldout = None               # figures of the state the voice uses
    best_nll: float = None                # the best accepted held-out NLL: the forget guard's bar

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        if "lambda" in d:                                      # checkpoints before the Corpus
            d["lam"] = d.pop("lambda")
        if d.get("heldout"):
            d["heldout"] = Heldout.from_dict(d["heldout"])
        known = {f.name for f in fields(cls)}
        progress = cls(**{k: v for k, v in d.items() if k in known})
        for obj in (progress, progress.heldout) if progress.heldout else (progress,):
            for f in fields(obj):                        # /status and the trainer format and compare these
                value, kind = getattr(obj, f.name), f.type if isinstance(f.type, str) else f.type.__name__
                if kind in _KIND_NAMES and not (_is_kind(value, kind) or value is None and f.default is None):
                    raise TypeError("%s is %.40r" % (f.name, value))
        return progress


class Brain:
    def __init__(self, model, opt, step, tok, progress):
        self.model = model
        self.opt = opt
        self.step = step                          # global optimizer step (drives the LR schedule)
        self.tok = tok
        self.progress = progress                  # Progress

    @classmethod
    def fresh(cls, cfg, seed=0):
        return cls(GPT(cfg, N_BASE_VOCAB, seed), Adam(cfg), 0, Tokenizer(), Progress())

    @classmethod
    def from_body(cls, body, cfg=None, seed=0):
        model, opt, step, extra = restore_checkpoint(body, cfg, seed)
        if not isinstance(extra, dict) or not isinstance(extra.get("tokenizer"), dict):
            raise CheckpointError("checkpoint has no tokenizer state")
        tok = Tokenizer.from_dict(extra["tokenizer"])
        if tok.vocab_size != model.vocab_size:
            raise CheckpointError("checkpoint is inconsistent: tokenizer has %d ids, model %d rows"
                                  % (tok.vocab_size, model.vocab_size))
        try:
            progress = Progress.from_dict(extra.get("progress", {}))
        except (KeyError, TypeError, ValueError, AttributeError) as e:   # ValueError: dict(["abc"])
            raise CheckpointError("checkpoint progress is damaged (%s)" % e)
        return cls(model, opt, step, tok, progress)

    @classmethod
    def from_bytes(cls, raw, cfg=None, seed=0):
        return cls.from_body(parse_checkpoint(raw), cfg, seed)

    @classmethod
    def load(cls, path, cfg=None, seed=0):
        return cls.from_body(read_checkpoint(path), cfg, seed)

    @classmethod
    def load_or_fresh(cls, path, cfg, seed=0):
        """The checkpoint at path if there is one, else a newborn brain."""
        if path and os.path.exists(path):
            return cls.load(path, cfg, seed)
        return cls.fresh(cfg, seed)

    def to_bytes(self):
        extra = {"tokenizer": self.tok.to_dict(), "progress": self.progress.to_dict()}
        return checkpoint_bytes(self.model, self.opt, self.step, extra)

    def save(self, path):
        atomic_write(path, self.to_bytes())


# ======================================================================================
# Workers: data-parallel training on every core, each worker holding a replica of the brain.
# ======================================================================================
# The brain is sent to the workers once, and again only after something outside changed it
# (BPE growth, a new delta, a rollback). Each step the trainer cuts the batch into one shard
# per worker. Every worker writes the gradient of its shard, weighted by the shard's share
# of the batch's tokens, into its own slot of a shared array; then each worker sums all
# slots in the same order and applies the same Adam update, so the replicas stay
# bit-identical and no weights cross a process boundary. With no worker processes the same
# Replica runs in the chat process (tests, and a machine where spawning fails).
#
# A worker that dies or hangs costs the step in flight: the coordinator notices (its pipe
# closes, or it misses a generous deadline), takes the weights from a surviving worker (or
# from the last state the trainer adopted), restarts the workers and goes on. Workers run
# at a lower priority than the chat process and leave when their parent is gone.

WORKER_NICE = 10                          # workers yield the CPU to the chat process
WORKER_TIMEOUT = 600.0                    # seconds without an answer before a worker counts as hung


def sample_starts(n_stream, n, length, rng, recent_from=None):
    """Start offsets of n windows of `length` + 1 tokens in a stream of n_stream tokens; if
    recent_from is set, half of them start there or later."""
    length = min(length, n_stream - 1)
    out = []
    for i in range(n):
        lo = 0
        if recent_from is not None and i % 2 == 0:
            lo = max(0, min(recent_from, n_stream - length - 1))
        out.append(rng.randint(lo, n_stream - length - 1))
    return out


def heldout_windows(stream, length):
    """Consecutive, non-overlapping windows covering the stream; each predicts all but its first token."""
    return [stream[i:i + length + 1] for i in range(0, max(1, len(stream) - 1), length)
            if len(stream[i:i + length + 1]) > 1]


def target_probs(model, windows):
    """Network probability of every true next token in the windows, in stream order."""
    out = []
    for w in windows:
        cache = model.new_cache()
        for cur, nxt in zip(w, w[1:]):
            out.append(softmax(model.step(cache, cur))[nxt])
    return out


class Replica:
    """One copy of the brain and the pieces of a data-parallel step that run beside it."""

    def __init__(self, raw, seed=0):
        self.brain = Brain.from_bytes(raw, seed=seed)
        self.rng = random.Random(seed)                 # dropout masks; each worker has its own seed

    def trainable(self, train_base):
        self.brain.model.set_trainable(train_base)
        return [t for _, t in self.brain.model.named_params() if t.requires_grad]

    def grad(self, shard, weight, train_base, teach=None, beta=0.0):
        """Gradient of weight * the shard's mean loss, flattened -> (loss, tokens, array('d')).
        teach: per window (ids, weights), TEACHER_TOP_K per predicted token (Corpus.teach)."""
        params = self.trainable(train_base)
        teacher, k = None, TEACHER_TOP_K
        if teach:
            teacher = [(ids[r:r + k], ws[r:r + k]) for (ids, ws), s in zip(teach, shard)
                       for r in range(0, (len(s) - 1) * k, k)]
        loss = backward_step(self.brain.model, [s[:-1] for s in shard], [s[1:] for s in shard], weight, self.rng,
                             teacher, beta)
        flat = array.array("d")
        for p in params:
            if p.grad is None:
                flat.extend(repeat(0.0, len(p.data) * len(p.data[0])))
            else:
                for row in p.grad:
                    flat.extend(row)
        return loss, sum(len(s) - 1 for s in shard), flat

    def apply(self, flat, lr, train_base):
        """Set the summed gradient and take one Adam step."""
        o = 0
        for p in self.trainable(train_base):
            cols = len(p.data[0])
            p.grad = [flat[o + r * cols:o + (r + 1) * cols] for r in range(len(p.data))]
            o += len(p.data) * cols
        with _NoCycleCollection():
            self.brain.opt.step(self.brain.model.named_params(), lr)
        self.brain.model.touch()
        self.brain.step += 1

    def grad_size(self, train_base):
        return sum(len(p.data) * len(p.data[0]) for p in self.trainable(train_base))

    def add_delta(self):
        return self.brain.model.add_delta()

    def score(self, windows):
        """-> one list of true-token probabilities per window."""
        return [target_probs(self.brain.model, [w]) for w in windows]

    def to_bytes(self):
        return self.brain.to_bytes()


def _sum_slots(view, n, capacity, size):
    """Slot 0 + slot 1 + ... in that order, so every worker gets the very same floats."""
    total = view[0:size].tolist()
    for k in range(1, n):
        total = list(map(operator.add, total, view[k * capacity:k * capacity + size].tolist()))
    return total


TERMINAL_SIGNALS = [getattr(signal, n) for n in ("SIGINT", "SIGHUP") if hasattr(signal, n)]


@contextlib.contextmanager
def _terminal_signals_blocked():
    """Block Ctrl+C and hang-up in this thread while a worker is spawned. The block survives the
    spawn, so the new process cannot die of one while it imports, and its traceback never reaches
    the terminal; the worker then ignores both (the parent decides what they mean) and unblocks."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINAL_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _worker_main(conn, shared, slot, capacity, seed):
    """A worker process: answer the coordinator's messages until told to stop or orphaned."""
    for sig in TERMINAL_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, TERMINAL_SIGNALS)
    if hasattr(os, "nice"):
        os.nice(WORKER_NICE)
    parent = os.getppid()
    view = memoryview(shared).cast("B").cast("d")
    replica = None
    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent:                 # the parent died (kill -9): leave with it
                return
            continue
        try:
            seq, kind, *args = conn.recv()
        except (EOFError, OSError):
            return
        if kind == "stop":
            return
        try:
            reply = None
            if kind == "load":
                replica = Replica(args[0], seed + 7919 * slot)
            elif kind == "grad":
                loss, tokens, flat = replica.grad(*args)
                if len(flat) > capacity:
                    raise MacroError("gradient of %d floats exceeds the shared slot of %d" % (len(flat), capacity))
                view[slot * capacity:slot * capacity + len(flat)] = flat
                reply = (loss, tokens)
            elif kind == "apply":
                n, lr, train_base = args
                replica.apply(_sum_slots(view, n, capacity, replica.grad_size(train_base)), lr, train_base)
            else:
                reply = getattr(replica, kind)(*args)   # add_delta, score, to_bytes
            answer = (seq, "ok", reply)
        except Exception as e:                         # the worker's boundary: report, stay alive
            answer = (seq, "error", "%s: %s" % (type(e).__name__, e))
        try:
            conn.send(answer)
        except OSError:                                # the parent is gone
            return


def worker_count(cfg):
    """Config.train_workers, where 0 means one per core."""
    return cfg.train_workers or os.cpu_count() or 1


class WorkerLost(Exception):
    """A worker died, hung, or failed a step."""


class Workers:
    """n worker processes that train one brain together; n = 0 runs a Replica in this process."""

    def __init__(self, n, seed=0):
        self.n, self.seed = n, seed
        self.procs, self.conns = [], []
        self.shared, self.capacity = None, 0
        self.local = None                          # the Replica when n = 0
        self.loaded = False
        self.restarts = 0
        self.last_failure = None                   # what happened, for /status
        self.closed = False
        self.seq = 0                               # numbers the calls

    # -- processes -------------------------------------------------------------------------
    def _start(self, capacity):
        self._stop()
        ctx = multiprocessing.get_context("spawn")
        self.capacity = capacity
        self.shared = ctx.RawArray("d", self.n * capacity)
        for slot in range(self.n):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(theirs, self.shared, slot, capacity, self.seed),
                            daemon=True, name="macrogpt-worker-%d" % slot)
            with _terminal_signals_blocked():
                p.start()
            theirs.close()
            self.procs.append(p)
            self.conns.append(mine)

    def _stop(self):
        for conn in self.conns:
            try:
                conn.send((0, "stop"))
            except OSError:
                pass
        deadline = time.monotonic() + 1.0
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill() if hasattr(p, "kill") else p.terminate()
                p.join(1.0)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []

    def close(self):
        """Stop every worker; returns within about two seconds whatever they are doing."""
        self.closed = True
        self._stop()

    def _call(self, messages):
        """Send messages[i] to worker i (None: skip) and wait for every answer -> replies.

        Each call has its own number, so an answer left over from a call cut short by a failure
        is recognised and dropped."""
        self.seq += 1
        waiting = {}
        for i, msg in enumerate(messages):
            if msg is not None:
                try:
                    self.conns[i].send((self.seq,) + msg)
                except OSError:
                    raise WorkerLost("worker %d is gone" % i)
                waiting[i] = None
        replies = {}
        deadline = time.monotonic() + WORKER_TIMEOUT
        conn_index = {id(c): i for i, c in enumerate(self.conns)}
        while len(replies) < len(waiting):
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerLost("a worker did not answer for %.0f s" % WORKER_TIMEOUT)
            ready = multiprocessing.connection.wait([self.conns[i] for i in waiting if i not in replies]
                                                    + [self.procs[i].sentinel for i in waiting if i not in replies],
                                                    min(left, 1.0))
            for obj in ready:
                i = conn_index.get(id(obj))
                if i is None:                          # a process sentinel: that worker exited
                    i = [k for k in waiting if self.procs[k].sentinel == obj][0]
                    if self.conns[i].poll():           # it answered just before exiting
                        continue
                    raise WorkerLost("worker %d exited (code %s)" % (i, self.procs[i].exitcode))
                try:
                    seq, status, value = self.conns[i].recv()
                except (EOFError, OSError):
                    raise WorkerLost("worker %d died (code %s)" % (i, self.procs[i].exitcode))
                if seq != self.seq:
                    continue
                if status != "ok":
                    raise WorkerLost("worker %d failed: %s" % (i, value))
                replies[i] = value
        return [replies.get(i) for i in range(len(messages))]

    # -- what the trainer asks ---------------------------------------------------------------
    def load(self, raw, n_params):
        """Give every worker this brain (checkpoint bytes)."""
        if self.n == 0:
            self.local = Replica(raw, self.seed)
        else:
            if not self.procs or n_params > self.capacity:
                self._start(int(n_params * 1.25) + 1024)   # room for some growth before a restart
            self._call([("load", raw)] * self.n)
        self.loaded = True

    def step(self, batch, lr, train_base, teach=None, beta=0.0):
        """One data-parallel step on the batch (windows of equal length), with teacher rows per
        window if teach is given (Replica.grad) -> (mean loss, tokens)."""
        if self.n == 0:
            loss, tokens, flat = self.local.grad(batch, 1.0, train_base, teach, beta)
            self.local.apply(flat, lr, train_base)
            return loss, tokens
        shards = [batch[k::self.n] for k in range(self.n)]
        active = [s for s in shards if s]
        total = sum(len(s) - 1 for s in batch)
        replies = self._call([("grad", s, sum(len(w) - 1 for w in s) / total, train_base,
                               teach and teach[k::self.n], beta) if s else None
                              for k, s in enumerate(shards)])
        self._call([("apply", len(active), lr, train_base)] * self.n)
        loss = sum(r[0] * r[1] for r in replies if r) / total
        return loss, total

    def ask(self, kind, *args):
        """A question every replica answers alike (add_delta) or one answers (score, to_bytes)."""
        if self.n == 0:
            return getattr(self.local, kind)(*args)
        if kind == "score":                            # split the windows: scoring is slow too
            windows = args[0]
            parts = self._call([("score", windows[k::self.n]) if windows[k::self.n] else None
                                for k in range(self.n)])
            per_window = [None] * len(windows)
            for k, part in enumerate(parts):
                for j, probs in enumerate(part or []):
                    per_window[k + j * self.n] = probs
            return per_window
        if kind == "to_bytes":
            return self._call([("to_bytes",)] + [None] * (self.n - 1))[0]
        return self._call([(kind,) + args] * self.n)[0]

    def note(self):
        return "workers: %d, restarted %d times (last: %s)" % (self.n, self.restarts, self.last_failure)

    def recover(self, fallback, reason):
        """After WorkerLost: reload every worker from a survivor's weights, else from `fallback`
        (checkpoint bytes) -> the step of the state reloaded."""
        self.restarts += 1
        self.last_failure = reason
        raw = None
        for i, p in enumerate(self.procs):
            if p.is_alive():
                try:
                    raw = self._call([("to_bytes",) if k == i else None for k in range(self.n)])[i]
                    break
                except WorkerLost:
                    continue
        raw = raw or fallback
        self._stop()
        brain = Brain.from_bytes(raw)
        self.load(raw, brain.model.num_params())
        return brain.step


# ======================================================================================
# Learner: training jobs on the workers, run in a thread beside the event loop.
# ======================================================================================
# A job (a few seconds to a minute of steps) runs in a thread that talks to the workers,
# so the event loop, and the prompt, never wait for it. The learner holds the accepted
# brain, the one the voice uses and the checkpoint stores, and keeps the workers in step
# with it: they are loaded again only after it changed here (BPE growth, a new delta, a
# rollback), and during warmup they run ahead of it until the next adopt.

@dataclass
class JobResult:
    losses: list                          # training loss of each step (nats)
    tokens: int
    seconds: float


class Learner:
    def __init__(self, cfg, brain, workers, seed=0):
        self.cfg, self.brain, self.workers, self.seed = cfg, brain, workers, seed
        self.rng = random.Random(seed + brain.step)     # windows and delta growth
        self.live_step = brain.step           # the workers' step
        self.synced = False                   # whether the workers hold brain (plus live steps)
        self.failures = []                    # worker failures in the last job, for the event log
        self.stopping = threading.Event()
        self._thread = None

    def changed(self):
        """The brain changed here (or a job was rolled back): the workers load it before the next job."""
        self.synced = False
        self.live_step = self.brain.step

    async def _beside(self, fn, *args):
        """fn(*args) in a thread (inline when the workers are this process) -> its result."""
        if self.workers.n == 0:
            return fn(*args)
        loop = asyncio.get_event_loop()
        fut = loop.create_future()

        def settle(ok, value):
            if not fut.done():
                (fut.set_result if ok else fut.set_exception)(value)

        def work():
            try:
                outcome = (True, fn(*args))
            except BaseException as e:             # handed to the awaiting task, which logs it
                outcome = (False, e)
            try:
                loop.call_soon_threadsafe(settle, *outcome)
            except RuntimeError:                   # the loop closed meanwhile (quitting): nobody waits
                pass
        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()
        return await fut

    # -- in the job thread ---------------------------------------------------------------------
    def _load(self):
        if not self.synced:
            self.workers.load(self.brain.to_bytes(), self.brain.model.num_params())
            self.live_step, self.synced = self.brain.step, True

    def _recover(self, error):
        """A worker was lost: go on from a survivor's weights; a third loss in a job gives up."""
        self.failures.append(str(error))
        if len(self.failures) > 2:
            raise error
        self.live_step = self.workers.recover(self.brain.to_bytes(), str(error))

    def _ask(self, kind, *args):
        self._load()
        try:
            return self.workers.ask(kind, *args)
        except WorkerLost as e:
            self._recover(e)
            return self.workers.ask(kind, *args)

    def plan(self, stream, steps, recent_from=None):
        """The start offsets of each step's windows, drawn before the job so the corpus can
        prepare their teacher rows."""
        cfg = self.cfg
        return [sample_starts(len(stream), cfg.batch_size, cfg.seq_len, self.rng, recent_from) for _ in range(steps)]

    def _train(self, stream, batches, teach, train_base, seconds, cycle=False):
        cfg, t0, losses, tokens = self.cfg, time.perf_counter(), [], 0
        length = min(cfg.seq_len, len(stream) - 1)
        self._load()
        while len(losses) < len(batches) and not self.stopping.is_set():
            batch = [stream[s:s + length + 1] for s in batches[len(losses)]]
            rows = teach[len(losses)] if teach else None
            try:
                lr = (idle_lr_at(self.live_step, len(losses), len(batches), cfg) if cycle
                      else lr_at(self.live_step, cfg))
                loss, k = self.workers.step(batch, lr, train_base, rows, cfg.distill_beta)
            except WorkerLost as e:
                self._recover(e)
                continue
            self.live_step += 1
            losses.append(loss)
            tokens += k
            if seconds is not None and time.perf_counter() - t0 >= seconds:
                break
        return JobResult(losses, tokens, time.perf_counter() - t0)

    def _pull(self):
        pulled = Brain.from_bytes(self._ask("to_bytes"), self.cfg, self.seed)    # about 0.1 s
        pulled.progress, pulled.tok = self.brain.progress, self.brain.tok     # ours, not the copy's
        return pulled

    # -- what the trainer awaits ---------------------------------------------------------------
    async def train(self, stream, batches, teach, train_base, seconds=None, cycle=False):
        """A step per batch of start offsets into the stream (plan), until `seconds` if given ->
        the worker failures met. teach: Corpus.teach's rows for the batches, or None. With cycle,
        the learning rate follows idle_lr_at across the steps."""
        result = await self._beside(self._train, stream, batches, teach, train_base, seconds, cycle)
        p = self.brain.progress
        p.loss = sum(result.losses) / max(1, len(result.losses))
        p.tokens_per_s = result.tokens / max(1e-9, result.seconds)
        return self.take_failures()

    def take_failures(self):
        failures, self.failures = self.failures, []
        return failures

    async def score(self, windows):
        """The workers' probability of every true next token of the windows, in order."""
        per_window = await self._beside(self._ask, "score", windows)
        return [p for w in per_window for p in w]

    async def add_delta(self):
        await self._beside(self._ask, "add_delta")

    async def adopt(self):
        """The workers' state becomes the accepted brain."""
        self.brain = await self._beside(self._pull)
        self.live_step = self.brain.step

    def shutdown(self, wait=2.0):
        """Stop after the step in flight; keep warmup steps taken since the last adopt if possible.

        After warmup the workers' steps since the last adopt belong to a burst or an idle phase
        that the held-out text has not judged, so they are dropped.
        """
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(wait)
            if self._thread.is_alive():
                return
        if self.synced and self.live_step > self.brain.step and not self.brain.progress.warmup_done:
            try:
                self.brain = self._pull()
            except WorkerLost:
                pass


# ======================================================================================
# Trainer: warmup, then bursts on new material and idle learning, judged on held-out text.
# ======================================================================================
# Warmup trains the whole network on the corpus. After it, a burst trains only the delta
# adapters on new conversation (half its windows start in the newest lines), and whenever
# no burst is due an idle phase trains the whole network on the whole living corpus: seed
# and every conversation kept, so what bursts learned is rehearsed rather than overwritten.
# Each burst and idle phase is judged on the held-out slice against the best state ever
# accepted: a burst that is worse by more than forget_tolerance is rolled back, and so is an
# idle phase that is worse at all, so neither one bad burst nor a slow drift (measured: a 2%
# allowance let rehearsal drift 2.5% above its best within 20 minutes) wears away what was learned.
# "Rolled back" means never adopted: after an idle phase not kept the workers train on from it
# (one phase worse is often noise), and only the third in a row sends them back to the best.
# Then the trainer rests and tries again as patiently: the best is the luckiest of many noisy
# phases, so a single phase from it rarely beats it (measured: 35 minutes of rest in an hour).

WARMUP_JOB_SECONDS = 20.0                 # a warmup job trains this long before the trainer looks up
IDLE_PATIENCE = 3                         # idle phases rolled back in a row before the trainer rests
IDLE_BACKOFF_MAX = 3600.0                 # longest pause between idle phases after rollbacks


def growth_row(brain, step, note):
    """A row of the growth log: sizes, training speed and the held-out figures of the brain."""
    p, h = brain.progress, brain.progress.heldout
    return dict(step=step, vocab=brain.model.vocab_size, params=brain.model.num_params(),
                deltas=brain.model.n_deltas, loss=p.loss, tokens_per_s=p.tokens_per_s, note=note,
                heldout_bpb=h and h.mix_bpb, network_bpb=h and h.model_bpb, field_bpb=h and h.field_bpb)


class Trainer:
    def __init__(self, cfg, corpus, memory, learner, ckpt_path=None, now=time.time):
        self.cfg, self.corpus, self.memory, self.learner = cfg, corpus, memory, learner
        self.ckpt_path, self.now = ckpt_path, now
        self.status, self.idle_rejects = "idle", 0       # idle_rejects: idle phases rolled back in a row
        self.plateaus = 0                                # times idle_rejects reached IDLE_PATIENCE in a row
        self.last_burst = self.last_save = self.idle_after = now()

    @property
    def brain(self):
        return self.learner.brain

    @property
    def step(self):
        return self.learner.live_step

    def shutdown(self):
        self.learner.shutdown()
        self.log_failures(self.learner.take_failures())

    def health(self):
        """A line for /status once workers were lost and replaced, else ''."""
        return self.learner.workers.note() if self.learner.workers.restarts else ""

    async def job(self, steps, train_base, recent_from=None, seconds=None, cycle=False):
        """Train up to `steps` steps (or about `seconds`) on the living corpus."""
        stream = self.corpus.stream()
        if seconds is not None:
            steps = min(steps, self.steps_in(seconds))
        batches = self.learner.plan(stream, steps, recent_from)
        teach = None
        if self.cfg.distill_beta:
            teach = await self.corpus.teach(stream, batches, self.cfg.seq_len)
        self.log_failures(await self.learner.train(stream, batches, teach, train_base, seconds, cycle))

    def steps_in(self, seconds):
        """Steps the last job's speed fits in `seconds`, with room to spare (the job stops at
        `seconds` anyway), so a timed job does not prepare teacher rows it never uses."""
        tps, cfg = self.brain.progress.tokens_per_s, self.cfg
        if not tps:
            return 4
        return max(1, int(1.5 * seconds * tps / (cfg.batch_size * cfg.seq_len)) + 1)

    def log_failures(self, failures):
        for failure in failures:
            self.memory.log_event("worker", "%s; workers restarted, training goes on" % failure)

    async def _evidence(self):
        windows = heldout_windows(self.corpus.heldout_stream, self.cfg.block_size)
        return self.corpus.evidence(await self.learner.score(windows))

    async def measure(self, note):
        """The workers' state becomes the reference of the voice (lambda) and of the forget guard."""
        h, p = await self._evidence(), self.brain.progress
        p.heldout, p.lam, p.best_nll = h, h.lam, h.nll
        self.log_growth(note)

    async def judge(self, label, tolerance, train_on=False):
        """Keep the workers' new state if held-out loss is at most `tolerance` above the best -> kept.

        A state not kept is never adopted; with train_on the workers go on from it (the next phase
        may carry it past the best), else they go back to the accepted brain.
        """
        h, best = await self._evidence(), self.brain.progress.best_nll
        change = (h.nll - best) / max(best, 1e-12) if best else 0.0
        kept = change <= tolerance
        if kept:
            await self.learner.adopt()
            p = self.brain.progress
            p.heldout, p.lam, p.best_nll = h, h.lam, min(best or h.nll, h.nll)
        elif not train_on:
            self.learner.changed()                     # the workers go back to the accepted brain
        self.log_growth("%s%s: held-out loss %+.1f%% vs the best" % ("" if kept else "rejected ", label, 100 * change))
        self.save()
        return kept

    def update_tokenizer(self):
        """Retrain BPE if the corpus grew enough and grow the model's rows -> whether ids were added."""
        added = self.corpus.update_tokenizer(self.brain.progress)
        if added:
            self.brain.model.grow_vocab(self.brain.tok.vocab_size)
            self.learner.changed()
        return bool(added)

    async def grow_tokenizer(self):
        if (self.corpus.bpe_due(self.brain.progress.bpe_chars) and self.learner.live_step != self.brain.step
                and not self.brain.progress.warmup_done):
            await self.learner.adopt()                 # keep the warmup steps the workers took
        grew = self.update_tokenizer()
        if grew and self.brain.progress.warmup_done:          # the held-out bar must be measured again
            await self.measure("vocabulary grew to %d" % self.brain.tok.vocab_size)
        return grew

    async def warmup(self):
        cfg = self.cfg
        self.status = "warmup"
        await self.job(cfg.warmup_steps - self.step, True, seconds=min(WARMUP_JOB_SECONDS, cfg.checkpoint_every_seconds))
        done = self.step >= cfg.warmup_steps
        if not done and self.now() - self.last_save < cfg.checkpoint_every_seconds:
            return
        await self.learner.adopt()
        if done:
            await self.measure("warmup done")
            self.brain.progress.warmup_done = True
            if cfg.freeze_base_after_warmup:
                self.brain.model.add_delta()           # bursts need something to train
                self.learner.changed()
        else:
            self.log_growth("warmup")
        self.save()

    def burst_due(self):
        cfg, pending = self.cfg, self.corpus.pending
        return (self.brain.progress.warmup_done and pending.bytes > 0
                and self.now() - self.last_burst >= cfg.qb_cooldown_seconds
                and (pending.bytes >= cfg.qb_min_bytes or pending.novelty >= cfg.qb_min_novelty))

    async def burst(self):
        """Train the deltas on the new material; keep it only if the held-out slice allows."""
        cfg = self.cfg
        self.status = "burst"
        mark = self.memory.corpus_mark()
        recent = self.corpus.stream_offset(self.memory.get_state("burst_mark", 0))
        self.corpus.take_pending()
        self.last_burst = self.now()
        if self.idle_rejects:                          # the workers may hold an idle state not kept
            self.learner.changed()
            self.idle_rejects = 0
        grow = self.learner.rng.random() < cfg.delta_grow_prob and self.brain.model.n_deltas < cfg.max_delta_modules
        if grow:
            await self.learner.add_delta()
        await self.job(cfg.micro_steps, not cfg.freeze_base_after_warmup, recent_from=recent)
        self.brain.progress.bursts += 1
        kept = await self.judge("burst +delta" if grow else "burst", cfg.forget_tolerance)
        self.memory.set_state("burst_mark", mark)     # kept or rolled back, this material is done
        return kept

    async def idle(self):
        """Train the whole network on the whole living corpus; after rollbacks in a row, rest a while."""
        self.status = "idle learning"
        await self.job(self.cfg.idle_steps, True, cycle=True)
        self.brain.progress.idle_phases += 1
        # rehearsal has no new material to excuse a loss; a phase not kept may be noise, so the
        # workers train on from it, and only the third in a row sends them back to the best
        patient = self.idle_rejects + 1 < IDLE_PATIENCE
        kept = await self.judge("idle", 0.0, train_on=patient)
        if kept:
            self.idle_rejects = self.plateaus = 0
        elif patient:
            self.idle_rejects += 1
        else:                                          # a plateau: rest, then try as patiently again
            self.idle_rejects, self.plateaus = 0, self.plateaus + 1
            self.idle_after = self.now() + min(IDLE_BACKOFF_MAX, 120.0 * 2 ** min(self.plateaus - 1, 5))
        return kept

    async def tick(self):
        """One unit of work -> True if something was done."""
        if await self.grow_tokenizer():
            return True
        if not self.brain.progress.warmup_done:
            await self.warmup()
        elif self.brain.progress.best_nll is None:            # imported, or from an older checkpoint
            await self.measure("measured")
        elif self.burst_due():
            await self.burst()
        elif self.cfg.idle_training and self.now() >= self.idle_after:
            await self.idle()
        else:
            self.status = "waiting for new material"
            return False
        return True

    def log_growth(self, note):
        self.memory.log_growth(**growth_row(self.brain, self.step, note))

    def save(self):
        if self.ckpt_path:
            self.brain.save(self.ckpt_path)
        self.last_save = self.now()


DATABASE_RETRY_SECONDS = 30.0             # a trainer that met a database fault tries again after this


async def train_forever(trainer, log):
    """The trainer's background task and top-level boundary: it never raises but cancellation.

    A database fault (locked by another program, disk full) pauses training and it tries again;
    any other error is logged and stops training, and the chat goes on without it.
    """
    while True:
        try:
            if not await trainer.tick():
                await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            raise
        except MemoryStoreError as e:
            trainer.status = "paused after a database fault (%s); retrying" % e
            await asyncio.sleep(DATABASE_RETRY_SECONDS)
        except Exception as e:
            trainer.status = "stopped after an error: %s" % e
            trainer.memory.log_event("error", "trainer: %s: %s" % (type(e).__name__, e))
            log("trainer stopped: %s (chat continues; see /status)" % e)
            return


# ======================================================================================
# Voice: the reply, sampled from the mix lambda * network + (1 - lambda) * field.
# ======================================================================================

FALLBACK_REPLY = "I have no words for that yet."
SENTENCE_ENDS = (".", "!", "?", "\u3002", "\uff01", "\uff1f")
HISTORY_MESSAGES = 6                       # earlier messages that go into the prompt
LOCAL_FIELD_WEIGHT = 0.5                   # share of the recalled answers in the field's voice


def clean_reply(text, finished):
    """First line, without a role prefix; cut back to a sentence end or a space if unfinished."""
    text = text.split("\n")[0]
    for stop in (" H:", "H: "):
        if stop in text:
            text = text[:text.index(stop)]
    text = text.strip()
    if text.startswith("A:"):
        text = text[2:].strip()
    if not finished and text:
        ends = [text.rfind(e) for e in SENTENCE_ENDS]
        cut = max(ends)
        if cut >= len(text) // 3:
            text = text[:cut + 1]
        elif " " in text:
            text = text[:text.rfind(" ")].rstrip(",;: ")
    return text


class Voice:
    def __init__(self, cfg, seed=0):
        self.cfg = cfg
        self.sampler = Sampler(cfg, seed)

    def settings(self, cfg):
        self.cfg = self.sampler.s = cfg

    def prompt_ids(self, tok, history, user_text):
        """The conversation as the corpus stream: lines ending in EOS, then 'A:' to continue."""
        ids = [EOS]
        for role, text in history + [("user", user_text)]:
            ids.extend(tok.encode(format_turn(role, text)) + [EOS])
        ids.extend(tok.encode("A:"))
        keep = self.cfg.block_size - self.cfg.max_gen_tokens // 2
        return ids[-max(8, keep):]

    def reply(self, brain, corpus, history, user_text, attempts=4):
        """A non-empty reply that does not repeat one of the recent ones (when avoidable).

        The corpus gives the field, the answers Recall finds for the message (a small local
        field), and the Lexicon; the brain gives the network and lambda.
        """
        field, local = corpus.field, None
        recalled = corpus.recall.answers_for(user_text)
        if recalled:
            local = NGramField(field.order, field.vocab_size, field.discount)
            for line in recalled:
                local.add(brain.tok.encode(line))
        said = {text for role, text in history if role == "assistant"}
        text = ""
        for _ in range(attempts):
            text = self.generate(brain, field, brain.progress.lam, history, user_text, local, corpus.lexicon) or text
            if text and text not in said:
                return text
        return text or FALLBACK_REPLY

    def generate(self, brain, field, lam, history, user_text, local=None, lexicon=None):
        cfg, tok, model = self.cfg, brain.tok, brain.model
        prompt = self.prompt_ids(tok, history, user_text)
        line = tok.encode("A:")                          # the field sees only the current line
        use_model = lam > 0
        if use_model:
            cache = model.new_cache()
            for t in prompt[:-1]:
                model.step(cache, t, logits=False)
            logits = model.step(cache, prompt[-1])
        out, finished = [], False
        for _ in range(cfg.max_gen_tokens):
            p = field.probs(line)
            if local is not None:
                p = mix(local.probs(line), p, LOCAL_FIELD_WEIGHT)
            if use_model:
                p = mix(softmax(logits), p, lam)
            p[BOS] = p[PAD] = 0.0
            if len(out) < 2:
                p[EOS] = 0.0                             # say something before stopping
            if lexicon is not None:
                p = lexicon.guard(p, tok, tok.decode_bytes(out))
            t = self.sampler.sample(normalize(p), history=out)
            if t == EOS:
                finished = True
                break
            out.append(t)
            line.append(t)
            text = tok.decode(out)
            if "\n" in text or " H:" in text:
                break
            if len(out) >= cfg.min_gen_tokens and text.rstrip().endswith(SENTENCE_ENDS):
                finished = True
                break
            if use_model:
                logits = model.step(cache, t)
        whole, _ = split_incomplete_utf8(tok.decode_bytes(out))   # out of tokens mid-character
        return clean_reply(whole.decode("utf-8", "replace"), finished)


# ======================================================================================
# Growth chart: the growth log drawn in the terminal, held-out bits per byte against step.
# ======================================================================================
# A pure renderer (rows in, text out). Series differ by glyph, not colour, so the chart
# survives any terminal, a pipe or a README; ASCII stands in where the output encoding
# cannot show the blocks.

GROWTH_HEIGHT = 12                         # plot rows of the chart
# drawn in this order, so where the mix equals a source (lambda 0 or 1) the source's glyph shows
GROWTH_SERIES = (("mix", "heldout_bpb"), ("field", "field_bpb"), ("network", "network_bpb"))
GROWTH_GLYPHS = {"network": ("\u2588", "#"), "field": ("\u2591", "-"), "mix": ("\u2592", "+"),
                 "burst": ("\u25b2", "^"), "rejected": ("\u00d7", "x"),
                 "axis": ("\u2502\u2524\u2514\u2500", "||+-")}       # (unicode, ascii)


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _burst_mark(note):
    """'burst' for a kept burst, 'rejected' for a rolled-back burst or idle phase, None for any other row."""
    note = note if isinstance(note, str) else ""          # a BLOB or number put there by hand marks nothing
    if note.startswith("rejected"):
        return "rejected"
    return "burst" if note.startswith("burst") else None


def _draw_line(grid, points, glyph):
    """Join consecutive (col, row) points with one cell per step along the longer axis."""
    segments = list(zip(points, points[1:])) or [(points[0], points[0])]     # a lone point is drawn too
    for (c1, r1), (c2, r2) in segments:
        n = max(abs(c2 - c1), abs(r2 - r1), 1)
        for i in range(n + 1):
            grid[round(r1 + (r2 - r1) * i / n)][round(c1 + (c2 - c1) * i / n)] = glyph


def _x_labels(first, last, width):
    """'0        step       1224' under a plot `width` columns wide."""
    left, right, mid = str(first), str(last), "step"
    gap = width - len(left) - len(right)
    if gap >= len(mid) + 2:
        pad = (gap - len(mid)) // 2
        return left + " " * pad + mid + " " * (gap - len(mid) - pad) + right
    if gap >= 1:
        return left + " " * gap + right
    return right[-width:]


def _wrapped(text, width):
    return textwrap.wrap(text, max(1, width), break_long_words=True) or [""]


def _packed(items, width, sep="  "):
    """Items joined by sep into lines <= width, never splitting an item that fits a line."""
    lines = []
    for item in items:
        if lines and len(lines[-1]) + len(sep) + len(item) <= width:
            lines[-1] += sep + item
        else:
            lines.extend(_wrapped(item, width))
    return lines


def render_growth(rows, width=80, height=GROWTH_HEIGHT, ascii=False):
    """Held-out bits per byte of network, field and mix against training step -> text lines <= width.

    rows are Memory.growth_rows() dicts; missing, None or NaN figures are skipped, and rows of a
    burst, or of a burst or idle phase that was rolled back, put a mark on the step axis.
    """
    g = {k: v[1 if ascii else 0] for k, v in GROWTH_GLYPHS.items()}
    bar, tick, corner, rule = g["axis"]
    rows = [r for r in rows if _finite(r.get("step"))]
    if not rows:
        return "\n".join(_wrapped("the growth log is empty: it fills in as the network trains", width))
    values = [v for r in rows for v in (r.get(key) for _, key in GROWTH_SERIES) if _finite(v)]
    if not values:
        return "\n".join(_wrapped("no held-out figures yet (the log reaches step %d): they are first measured "
                                  "when warmup ends" % max(r["step"] for r in rows), width))
    # warmup checkpoints carry no figure: the step axis starts where there is something to draw
    rows = [r for r in rows if _burst_mark(r.get("note")) or any(_finite(r.get(k)) for _, k in GROWTH_SERIES)]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    labels = ["%.2f" % hi, "%.2f" % ((hi + lo) / 2), "%.2f" % lo]
    lw = max(len(s) for s in labels)
    plot_w, height = width - lw - 2, max(3, height)
    if plot_w < 2:
        return "\n".join(_wrapped("too narrow for the growth chart", width))
    s0, s1 = min(r["step"] for r in rows), max(r["step"] for r in rows)

    def col(step):
        return 0 if s1 == s0 else round((step - s0) / (s1 - s0) * (plot_w - 1))

    def row(v):
        return round((hi - v) / (hi - lo) * (height - 1))
    grid = [[" "] * plot_w for _ in range(height)]
    for name, key in GROWTH_SERIES:
        points = [(col(r["step"]), row(r[key])) for r in rows if _finite(r.get(key))]
        if points:
            _draw_line(grid, points, g[name])
    axis = [rule] * plot_w
    for r in rows:
        mark = _burst_mark(r.get("note"))
        if mark and axis[col(r["step"])] != g["rejected"]:
            axis[col(r["step"])] = g[mark]
    label_at = {0: labels[0], (height - 1) // 2: labels[1], height - 1: labels[2]}
    out = _wrapped("held-out bits per byte by training step (lower is better)", width)
    for i, cells in enumerate(grid):
        out.append("%*s %s%s" % (lw, label_at.get(i, ""), tick if i in label_at else bar, "".join(cells)))
    out.append(" " * (lw + 1) + corner + "".join(axis))
    out.append(" " * (lw + 2) + _x_labels(s0, s1, plot_w))
    n_burst = sum(_burst_mark(r.get("note")) == "burst" for r in rows)
    n_rejected = sum(_burst_mark(r.get("note")) == "rejected" for r in rows)
    out.extend(_packed(["%s network" % g["network"], "%s field" % g["field"], "%s mix" % g["mix"],
                        "%s burst (%d)" % (g["burst"], n_burst),
                        "%s rolled back (%d)" % (g["rejected"], n_rejected)], width))
    return "\n".join(line.rstrip() for line in out)


def can_show(text, stream):
    """Whether stream's encoding can write text as it is."""
    try:
        text.encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def growth_chart(rows, stream=None):
    """The chart as this output can show it: at most 80 columns, ASCII if the encoding lacks the blocks."""
    stream = stream or sys.stdout
    unicode_glyphs = "".join(v[0] for v in GROWTH_GLYPHS.values())
    width = min(80, shutil.get_terminal_size().columns)
    return render_growth(rows, width, ascii=not can_show(unicode_glyphs, stream))


# ======================================================================================
# Session: the thin coordinator that wires memory, corpus, trainer and voice together.
# ======================================================================================

HELP = """commands:
  /help              this text
  /status            training progress, held-out figures, sizes
  /growth            chart of held-out bits per byte over training
  /set KEY VALUE     change a sampling setting (kept in memory.sqlite3): %s
  /save              write the checkpoint now
  /quit              save and exit (also Ctrl+D; Ctrl+C saves and exits, twice exits at once)""" % ", ".join(SAMPLING_KEYS)


def file_digest(lines):
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


class Session:
    def __init__(self, cfg, corpus_path, db_path, ckpt_path, seed=0, workers=None):
        seed_lines = read_corpus_file(corpus_path)             # errors before anything is written
        train_lines, heldout = split_heldout(seed_lines, cfg.heldout_every)
        if not train_lines:
            raise MacroError("corpus %s has no usable lines" % corpus_path)
        brain = Brain.load_or_fresh(ckpt_path, cfg, seed)
        self.memory = Memory(db_path)
        try:
            seed_key = "%s every %d" % (file_digest(seed_lines), cfg.heldout_every)
            if self.memory.get_state("seed_digest") != seed_key:
                self.memory.add_corpus_lines(train_lines, "seed")
                self.memory.set_state("seed_digest", seed_key)
            self.cfg = cfg = self.apply_saved_settings(cfg)
            self.corpus = Corpus(cfg, self.memory, brain.tok, heldout, seed)
            learner = Learner(cfg, brain, workers or Workers(0, seed), seed)
            self.trainer = Trainer(cfg, self.corpus, self.memory, learner, ckpt_path)
            self.trainer.update_tokenizer()                   # the tokenizer is ready from the first reply
            self.voice = Voice(cfg, seed + self.memory.message_count())   # restarts do not replay replies
        except BaseException:
            self.memory.close()
            raise

    @property
    def brain(self):
        return self.trainer.brain

    def apply_saved_settings(self, cfg):
        saved = self.memory.get_state("settings", {})
        for key, value in saved.items():
            try:
                cfg = validate_setting(cfg, key, str(value))
            except MacroError:
                pass                                           # a setting later versions dropped
        return cfg

    def respond(self, text):
        """Store the message, generate, store the reply, then learn from the turn -> reply."""
        self.memory.add_message("user", text)
        history = self.memory.recent_messages(HISTORY_MESSAGES + 1)[:-1]
        self.corpus.lexicon.add(text)                          # words you use are words it may use
        reply = self.voice.reply(self.brain, self.corpus, history, text)
        self.memory.add_message("assistant", reply)
        self.corpus.add([format_turn("user", text), format_turn("assistant", reply)], "chat")
        return reply

    def command(self, line):
        """A /command -> (text to show, whether to quit)."""
        parts = line.split()
        name = parts[0].lower()
        if name == "/help":
            return HELP, False
        if name == "/status":
            return self.status(), False
        if name == "/growth":
            return growth_chart(self.memory.growth_rows()), False
        if name == "/save":
            try:
                self.save()
            except MacroError as e:
                return "error: %s" % e, False
            return "saved", False
        if name in ("/quit", "/exit"):
            return None, True
        if name == "/set":
            if len(parts) != 3:
                return "usage: /set KEY VALUE (keys: %s)" % ", ".join(SAMPLING_KEYS), False
            try:
                self.cfg = validate_setting(self.cfg, parts[1], parts[2])
            except MacroError as e:
                return "error: %s" % e, False
            self.voice.settings(self.cfg)
            saved = self.memory.get_state("settings", {})
            saved[parts[1]] = getattr(self.cfg, parts[1])
            self.memory.set_state("settings", saved)
            return "%s = %s" % (parts[1], getattr(self.cfg, parts[1])), False
        return "unknown command %s; /help lists them" % name, False

    def status(self):
        b, cfg, p = self.brain, self.cfg, self.brain.progress
        tps, step = p.tokens_per_s, self.trainer.step
        if not p.warmup_done:
            left = max(0, cfg.warmup_steps - step)
            eta = left * cfg.batch_size * cfg.seq_len / tps if tps else None
            phase = "warmup step %d/%d | eta %s" % (step, cfg.warmup_steps, format_duration(eta))
        else:
            phase = "warmup done | step %d | bursts %d | idle phases %d | %d rolled back" % (
                step, p.bursts, p.idle_phases, self.memory.rejected_bursts())
        loss = "%.3f" % p.loss if p.loss is not None else "-"
        lines = ["%s | loss %s | %s tok/s | trainer: %s%s"
                 % (phase, loss, "%.0f" % tps if tps else "-", self.trainer.status,
                    " | " + self.trainer.health() if self.trainer.health() else "")]
        h = p.heldout
        if h:
            lines.append("held-out bits/byte: network %.3f | field %.3f | mix %.3f | lambda %.2f (%d bytes)"
                         % (h.model_bpb, h.field_bpb, h.mix_bpb, h.lam, h.bytes))
        else:
            lines.append("held-out bits/byte: not measured yet (after warmup); replies come from the field")
        st = self.memory.corpus_stats()
        lines.append("vocab %d | params %d | delta modules %d/%d | corpus %d lines, %.1f KB (%d from chat) | messages %d"
                     % (b.model.vocab_size, b.model.num_params(), b.model.n_deltas, cfg.max_delta_modules,
                        st["lines"], st["bytes"] / 1000, st["chat_lines"], self.memory.message_count()))
        return "\n".join(lines)

    def save(self):
        self.trainer.save()

    def close(self):
        self.memory.close()


def format_duration(seconds):
    if seconds is None:
        return "-"
    m = int(seconds // 60)
    return "%dh%02dm" % (m // 60, m % 60) if m >= 60 else "%dm%02ds" % (m, int(seconds % 60))


# ======================================================================================
# Progress notes: one fixed-format line about training, shown where the user already looks.
# ======================================================================================
# The REPL shows these after a reply, never over the line being typed, and only when
# something moved; long command-line work (--eval, --bench) keeps one line updated on
# stderr while it is a terminal.

def warmup_percent(step, cfg):
    return min(100, int(100 * step / max(1, cfg.warmup_steps)))


def progress_line(progress, cfg, step):
    """`[warmup 34% | step 410/1200 | eta 12m03s | held-out -]` from a Brain's Progress."""
    tps = progress.tokens_per_s
    left = max(0, cfg.warmup_steps - step)
    eta = left * cfg.batch_size * cfg.seq_len / tps if tps and left else None
    h = progress.heldout
    held = "%.2f bits/byte" % h.mix_bpb if h else "-"
    return "[warmup %d%% | step %d/%d | eta %s | held-out %s]" % (
        warmup_percent(step, cfg), step, cfg.warmup_steps, format_duration(eta), held)


class TrainingNotes:
    """Decides which progress notes the REPL shows after a reply; each is said at most once.

    A warmup line appears when the percentage moved by at least one point or a new held-out
    figure came in; the first time lambda rises above 0 the network's arrival is announced.
    """

    def __init__(self, cfg, progress):
        self.cfg = cfg
        self.shown = None                                   # (percent, held-out) of the last line
        self.warmup_over = progress.warmup_done            # a restart after warmup has none to show
        self.spoke = progress.lam > 0

    def lines(self, progress, step):
        out = []
        if not self.warmup_over:
            h = progress.heldout
            now = (warmup_percent(step, self.cfg), h and h.mix_bpb)
            if self.shown is None or now[0] - self.shown[0] >= 1 or now[1] != self.shown[1]:
                out.append(progress_line(progress, self.cfg, step))
                self.shown = now
            self.warmup_over = progress.warmup_done
        lam = progress.lam
        if not self.spoke and lam > 0:
            out.append("[the network now speaks: lambda %.2f]" % lam)
            self.spoke = True
        return out


class Meter:
    """`eval 34% | 41/120 | eta 12s`, rewritten in place on stderr while it is a terminal; else silent."""

    def __init__(self, label, total, enabled=True, stream=None, now=time.monotonic):
        self.stream = stream or sys.stderr
        self.label, self.total, self.now = label, total, now
        self.on = enabled and total > 0 and _is_terminal(self.stream)
        self.start, self.percent, self.width = now(), None, 0

    def update(self, done):
        if not self.on:
            return
        percent = int(100 * done / self.total)
        if percent == self.percent:
            return
        self.percent = percent
        elapsed = self.now() - self.start
        eta = elapsed / done * (self.total - done) if done else None
        self._write("%s %d%% | %d/%d | eta %s" % (self.label, percent, done, self.total, format_duration(eta)))

    def finish(self):
        if self.on and self.width:
            self._write("")

    def _write(self, text):
        self.stream.write("\r" + text.ljust(self.width) + ("\r" if not text else ""))
        self.stream.flush()
        self.width = len(text) if text else 0


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):          # no isatty, or already closed
        return False


# ======================================================================================
# REPL: a reader thread feeds lines to the event loop; the trainer runs beside it.
# ======================================================================================
# input() blocks, so it runs in a thread; the loop stays free for the trainer's futures.
# In a terminal the thread waits for each reply before showing the next "> " prompt, so
# nothing ever prints over the line being typed.

INTERRUPT = object()
CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")     # C0 but tab and newline, DEL, C1


class OutputError(MacroError):
    pass


def escape_controls(text):
    r"""Control characters as visible escapes, e.g. ESC -> \x1b: a corpus line or a reply must not
    retitle the terminal or move its cursor. Tab stays; newline stays because it separates the
    lines of one answer (/help, /status). Stored text keeps the characters as they came."""
    return CONTROLS.sub(lambda m: "\\x%02x" % ord(m.group()), text)


def say(text, stream=None):
    """Print text whatever it holds: stray bytes show as U+FFFD, control characters escaped,
    unencodable characters as '?'. A full or broken stream raises OutputError (BrokenPipeError as is)."""
    stream = stream or sys.stdout
    text = escape_controls(text_to_bytes(text).decode("utf-8", "replace"))
    enc = getattr(stream, "encoding", None) or "utf-8"
    try:
        stream.write(text.encode(enc, "replace").decode(enc) + "\n")
        stream.flush()
    except BrokenPipeError:
        raise                                      # `| head` closed the pipe: main() ends quietly
    except OSError as e:
        name = "standard error" if stream is sys.stderr else "standard output"
        raise OutputError("cannot write to %s: %s" % (name, e.strerror or e))


def say_if_possible(text):
    """For courtesy lines at exit: a closed terminal window (EIO) ends input before SIGHUP arrives."""
    try:
        say(text)
    except OutputError:
        pass                                       # nobody is left to read it; the exit code stays 0


class LineReader:
    def __init__(self, loop, queue, interactive):
        self.loop = loop
        self.queue = queue
        self.interactive = interactive
        self.go = threading.Event()
        self.go.set()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()

    def ready(self):
        self.go.set()

    def _put(self, item):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:                           # the loop has closed: the session is over
            pass

    def _run(self):
        while True:
            self.go.wait()
            self.go.clear()
            try:
                if self.interactive:
                    line = input("> ")
                else:
                    raw = sys.stdin.buffer.readline()
                    if not raw:
                        raise EOFError
                    line = bytes_to_text(raw.rstrip(b"\r\n"))
            except EOFError:
                self._put(None)
                return
            except (KeyboardInterrupt, OSError, ValueError):
                self._put(None)
                return
            self._put(line)


QUIT_SIGNALS = ("SIGTERM", "SIGHUP")       # `kill PID`, a closed terminal window: save and exit 0


async def chat(session, interactive, train, progress=None):
    loop = asyncio.get_event_loop()
    queue = asyncio.Queue()
    notes = []

    def log(msg):
        if interactive:
            notes.append(msg)
        else:
            say(msg, sys.stderr)

    interrupts = [0]

    def on_sigint():
        interrupts[0] += 1
        if interrupts[0] > 1:
            os._exit(130)                              # checkpoints are atomic: nothing tears
        queue.put_nowait(INTERRUPT)
    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except (NotImplementedError, RuntimeError):
        pass                                           # Windows: Ctrl+C raises KeyboardInterrupt
    hung_up = []

    def on_quit_signal(name):
        hung_up.append(name)                           # the terminal may be gone: say no goodbye
        queue.put_nowait(None)                         # then save and exit 0, as /quit does
    for name in QUIT_SIGNALS:
        if hasattr(signal, name):
            try:
                loop.add_signal_handler(getattr(signal, name), on_quit_signal, name)
            except (NotImplementedError, RuntimeError):
                pass
    reader = LineReader(loop, queue, interactive)
    reader.start()
    task = loop.create_task(train_forever(session.trainer, log)) if train else None
    if interactive:
        say("macrogpt %s: type a message, /help for commands, Ctrl+D to leave." % VERSION)
    try:
        while True:
            line = await queue.get()
            if line is None or line is INTERRUPT:
                if interactive and not hung_up:
                    say_if_possible("")
                break
            line = line.strip()
            if not line:
                reader.ready()
                continue
            try:
                if line.startswith("/"):
                    text, quit_now = session.command(line)
                    if quit_now:
                        break
                else:
                    text = session.respond(line)
            except MemoryStoreError as e:                # the session goes on; stored rows are intact
                text = "error: %s; %s" % (e, "not done" if line.startswith("/") else "no reply to this message")
            say(text)
            for note in notes:
                say("[%s]" % note)
            del notes[:]
            for note in progress.lines(session.brain.progress, session.trainer.step) if progress else ():
                say(note)
            reader.ready()
    finally:
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except MemoryStoreError as e:            # the trainer's boundary could not even log it
                say("trainer stopped: %s" % e, sys.stderr)
            try:
                session.trainer.shutdown()             # keeps the workers' latest warmup steps
            except MemoryStoreError as e:
                say("worker failures could not be logged: %s" % e, sys.stderr)
        session.save()
        if interactive and not hung_up:
            say_if_possible("saved. goodbye.")


# ======================================================================================
# Eval: held-out bits per byte of network, field and mix on a file, one document per line.
# ======================================================================================

def brain_for_reading(cfg, corpus_path, ckpt_path, seed=0):
    """The checkpoint's brain, or the one a first run would start with, without writing anything."""
    brain = Brain.load_or_fresh(ckpt_path, cfg, seed)
    if brain.tok.vocab_size == N_BASE_VOCAB:
        train, _ = split_heldout(read_corpus_file(corpus_path), cfg.heldout_every)
        train_first_tokenizer(brain.tok, cfg, train)
        brain.model.grow_vocab(brain.tok.vocab_size)
    return brain


def train_first_tokenizer(tok, cfg, train_lines):
    """The merges a first run learns from the seed's training lines (none below the threshold)."""
    if sum(len(text_to_bytes(l)) for l in train_lines) >= cfg.enable_bpe_after_chars:
        tok.train(train_lines, cfg.bpe_num_merges)
    return tok


def evaluate_file(path, cfg, corpus_path, ckpt_path, seed=0, out=print, show_progress=False):
    lines = read_corpus_file(path, "eval file")
    if not lines:
        raise MacroError("eval file %s has no non-blank lines to score" % path)
    brain = brain_for_reading(cfg, corpus_path, ckpt_path, seed)
    train, _ = split_heldout(read_corpus_file(corpus_path), cfg.heldout_every)
    field = NGramField(cfg.field_order, brain.tok.vocab_size, cfg.field_discount)
    for line in train:
        field.add(brain.tok.encode(line))
    pairs, n_bytes = [], 0
    meter = Meter("eval", len(lines), show_progress)
    for done, text in enumerate(lines):
        meter.update(done)
        ids = brain.tok.encode(text) + [EOS]
        pm = target_probs(brain.model, heldout_windows([EOS] + ids, cfg.block_size))
        pf = [field.prob(ids[:i], t) for i, t in enumerate(ids)]
        pairs.extend(zip(pm, pf))
        n_bytes += len(text_to_bytes(text)) + 1                # + 1 for the line end
    meter.finish()
    lam = brain.progress.lam
    result = {name: round(bits_per_byte(mix_nll(pairs, weight), n_bytes), 4)
              for name, weight in (("network", 1.0), ("field", 0.0), ("mix", lam))}
    result.update({"bytes": n_bytes, "lines": len(lines), "lambda": lam, "step": brain.step,
                   "checkpoint": ckpt_path if os.path.exists(ckpt_path) else None})
    out("%s: %d bytes in %d lines | bits/byte: network %.3f | field %.3f | mix %.3f (lambda %.2f, step %d)"
        % (path, n_bytes, len(lines), result["network"], result["field"], result["mix"], lam, brain.step))
    out(json.dumps(result, sort_keys=True))
    return result


# ======================================================================================
# Export: the Hugging Face Llama format, written and read with the standard library alone.
# ======================================================================================
# The network is a Llama in miniature (RMSNorm, rotate-half RoPE, SwiGLU, no biases), so the
# weights map one to one onto transformers' LlamaForCausalLM: q/k need no permutation, since
# macrogpt rotates the pairs (x[i], x[i + half]) with freqs base^(-2i/head_dim), as Llama does.
# Deltas are merged into their weights (W + sum alpha A B). A tied lm_head whose deltas moved
# it away from wte is exported untied, since Llama cannot tie a head that differs.
#
# The tokenizer becomes a `tokenizers` BPE over the GPT-2 byte alphabet (each byte shown as
# one printable character). PIECE_RE is rewritten with explicit code point ranges computed
# from this Python's own `re`, so the Oniguruma regex that `tokenizers` runs splits exactly
# as macrogpt does on every code point of this Python's Unicode version.

HF_SPECIALS = ((BOS, "<BOS>"), (EOS, "<EOS>"), (PAD, "<PAD>"))
HF_RMS_EPS = 1e-6                         # the eps of rmsnorm and _rmsnorm_row
HF_EXPORT_FORMAT = 1                      # version of the "macrogpt" block in config.json
HF_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}     # safetensors dtype -> bytes per value
HF_MAX_HEADER = 100 * 1024 * 1024         # safetensors' own limit on the JSON header
HF_ADAPTER_DIR = "adapter"                # where --export-lora puts the PEFT adapter inside DIR
HF_PROBE = ("".join(map(chr, range(0x20, 0x7F))) + " \t\n\x1c\xa0\u3000  x \u00e9e\u0301 \u00b2\u00bd\u2160 "
            "\u4e16\u754c\u3002 \u043c\u0438\u0440 \u0645\u0631\u062d\u0628\u0627 \u0663\u0664 \U0001F642\U0001F642 a_b1")
_HF_REGEX = []                            # hf_piece_regex(), once computed
HF_LINEAR_NAMES = (("wq", "self_attn.q_proj"), ("wk", "self_attn.k_proj"), ("wv", "self_attn.v_proj"),
                   ("wo", "self_attn.o_proj"), ("fc_g", "mlp.gate_proj"), ("fc_v", "mlp.up_proj"),
                   ("fc2", "mlp.down_proj"))


class HFError(MacroError):
    """A Hugging Face directory that cannot be written, or holds what macrogpt cannot represent."""


def byte_alphabet():
    """The 256 characters that stand for bytes 0..255 in a byte-level vocabulary (GPT-2's map).

    Printable Latin-1 bytes stand for themselves; the rest (controls, space, 0x7f-0xa0, 0xad)
    take 256, 257, ... in byte order, so every token string is printable and space-free.
    """
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _code_point_ranges(pattern):
    """[(first, last)] code points a one-character Python regex matches, surrogates left out."""
    gap = 0xE000 - 0xD800
    text = "".join(map(chr, chain(range(0xD800), range(0xE000, 0x110000))))
    out = []
    for m in re.finditer("(?:%s)+" % pattern, text):
        first, last = m.start(), m.end() - 1
        out.append((first + gap if first >= 0xD800 else first, last + gap if last >= 0xD800 else last))
    return out


def _onig_class(ranges, negate=False):
    """[(first, last)] -> an Oniguruma character class of \\x{HEX} escapes."""
    parts = ["\\x{%X}" % a if a == b else "\\x{%X}-\\x{%X}" % (a, b) for a, b in ranges]
    return "[%s%s]" % ("^" if negate else "", "".join(parts))


def hf_piece_regex():
    """PIECE_RE for `tokenizers` (Oniguruma): same alternatives, classes as explicit ranges.

    Python's \\w, \\d and \\s follow its own Unicode rules (e.g. \\s holds U+001C..U+001F,
    [^\\W\\d_] holds numerals such as U+00B2 and U+2160 but no combining marks), which
    Oniguruma's property classes do not reproduce, so the classes are listed range by range.
    Computed once per process (a scan of every code point, ~0.3 s).
    """
    if _HF_REGEX:
        return _HF_REGEX[0]
    letters, digits, spaces = (_code_point_ranges(p) for p in (r"[^\W\d_]", r"\d", r"\s"))
    others = _onig_class(sorted(letters + digits + spaces), negate=True)   # [^\w\s] or "_"
    space, not_space = _onig_class(spaces), _onig_class(spaces, negate=True)
    _HF_REGEX.append(" ?%s+| ?%s+| ?%s+|%s+(?!%s)|%s+" % (_onig_class(letters), _onig_class(digits),
                                                          others, space, not_space, space))
    return _HF_REGEX[0]


def hf_token_strings(tok):
    """Every id's string in the byte-level vocabulary; raises HFError if two ids share bytes."""
    alphabet = byte_alphabet()
    names = dict(HF_SPECIALS)
    out, seen = [], {}
    for i in range(tok.vocab_size):
        s = names.get(i) or "".join(alphabet[b] for b in tok.token_bytes(i))
        if s in seen:
            raise HFError("tokens %d and %d stand for the same bytes; the Hugging Face BPE format "
                          "gives one id per string" % (seen[s], i))
        seen[s] = i
        out.append(s)
    return out


def hf_tokenizer_json(tok):
    """The `tokenizers` JSON of macrogpt's tokenizer (the file transformers reads as tokenizer.json)."""
    strings = hf_token_strings(tok)
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in HF_SPECIALS]
    split = {"type": "Split", "pattern": {"Regex": hf_piece_regex()},
             "behavior": "Isolated", "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
             "vocab": {s: i for i, s in enumerate(strings)},
             "merges": ["%s %s" % (strings[a], strings[b]) for a, b in tok.merges]}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
            "post_processor": None, "decoder": dict(byte_level), "model": model}


def hf_linears(model):
    """[(Llama module path, Linear)] for every linear that carries deltas."""
    out = []
    for i, blk in enumerate(model.blocks):
        out.extend(("model.layers.%d.%s" % (i, hf), getattr(blk, ours)) for ours, hf in HF_LINEAR_NAMES)
    return out + [("lm_head", model.lm_head)]


def hf_tensors(model, merge=True):
    """[(Llama tensor name, shape, rows)], deltas merged unless merge is False (the LoRA's base).

    lm_head is written when it differs from wte, which a tied head does once its deltas are
    merged in, and always for a LoRA base.
    """
    def matrix(name, rows):
        return name, [len(rows), len(rows[0])], rows

    def vector(name, gain):                    # a (1, C) gain is a 1-D tensor in Llama
        return name, [len(gain.data[0])], gain.data
    out = [matrix("model.embed_tokens.weight", model.wte.data)]
    for i, blk in enumerate(model.blocks):
        pre = "model.layers.%d." % i
        out.append(vector(pre + "input_layernorm.weight", blk.ln1))
        out.extend(matrix(pre + hf + ".weight", _weight_of(getattr(blk, ours), merge)) for ours, hf in HF_LINEAR_NAMES)
        out.append(vector(pre + "post_attention_layernorm.weight", blk.ln2))
    out.append(vector("model.norm.weight", model.lnf))
    head = _weight_of(model.lm_head, merge)
    if head != model.wte.data or not merge:   # a LoRA head shared with wte would merge into both
        out.append(matrix("lm_head.weight", head))
    return out


def _weight_of(lin, merge):
    return lin.effective() if merge else lin.weight.data


def hf_lora_tensors(model):
    """[(PEFT tensor name, shape, rows)]: each linear's k deltas stacked into one LoRA of rank k*r.

    PEFT computes W x + (alpha / r) B (A x) with lora_A (r, in) and lora_B (out, r); with
    lora_alpha = r that is our sum alpha_k A_k (B_k x), our B's stacked into lora_A and each
    alpha_k A_k side by side in lora_B.
    """
    out = []
    for path, lin in hf_linears(model):
        lora_a = [row for d in lin.deltas for row in d.B.data]
        lora_b = [[d.alpha * v for d in lin.deltas for v in d.A.data[i]] for i in range(len(lin.weight.data))]
        pre = "base_model.model." + path
        out.append((pre + ".lora_A.weight", [len(lora_a), len(lora_a[0])], lora_a))
        out.append((pre + ".lora_B.weight", [len(lora_b), len(lora_b[0])], lora_b))
    return out


def hf_lora_config(model, base_path):
    rank = model.n_deltas * model.cfg.delta_rank
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
            "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
            "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
            "target_modules": sorted({path.rsplit(".", 1)[-1] for path, _ in hf_linears(model)})}


def hf_config(model, tied, progress, step):
    cfg = model.cfg
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": model.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": 4 * cfg.n_embd,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_head, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.block_size, "rms_norm_eps": HF_RMS_EPS,
            "rope_theta": cfg.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
            "rope_scaling": None, "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
            "mlp_bias": False, "tie_word_embeddings": tied, "initializer_range": cfg.init_std,
            "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, "use_cache": True,
            "torch_dtype": "float32", "dtype": "float32",
            "macrogpt": {"format": HF_EXPORT_FORMAT, "version": VERSION, "step": step,
                         "bpe_chars": progress.bpe_chars}}


def hf_generation_config(cfg):
    return {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, "do_sample": True,
            "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_gen_tokens}


def hf_tokenizer_files(cfg):
    """tokenizer_config.json and special_tokens_map.json: ids come from tokenizer.json alone."""
    names = {"bos_token": "<BOS>", "eos_token": "<EOS>", "pad_token": "<PAD>"}
    config = dict(names, tokenizer_class="PreTrainedTokenizerFast", model_max_length=cfg.block_size,
                  add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False)
    return config, names


# -- safetensors: 8-byte little-endian header length, JSON header, raw little-endian data ----

def safetensors_header(tensors):
    """[(name, shape, rows)] -> header bytes padded with spaces so the data starts 8-byte aligned."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, rows in tensors:
        size = 4 * len(rows) * len(rows[0])
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return text + b" " * (-len(text) % 8)


def write_safetensors(path, tensors):
    header = safetensors_header(tensors)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for _, _, rows in tensors:
            flat = array.array("f", [v for r in rows for v in r])
            if sys.byteorder != "little":
                flat.byteswap()
            f.write(flat.tobytes())
        f.flush()
        os.fsync(f.fileno())


def _decode_values(raw, dtype):
    """Little-endian bytes of one tensor -> a list of Python floats."""
    if dtype == "F16":
        return list(struct.unpack("<%de" % (len(raw) // 2), raw))
    if dtype == "BF16":                        # the top half of a float32
        halves = array.array("H", raw)
        if sys.byteorder != "little":
            halves.byteswap()
        widened = array.array("I", [h << 16 for h in halves])
        return array.array("f", widened.tobytes()).tolist()
    flat = array.array("f" if dtype == "F32" else "d", raw)
    if sys.byteorder != "little":
        flat.byteswap()
    return flat.tolist()


def _header_entries(path, header):
    """Validate each tensor entry -> [(begin, end, name)] sorted by begin."""
    out = []
    for name, t in header.items():
        if not name.isprintable():                     # every later message names the tensor on one line
            raise HFError("%s is damaged: a tensor name holds %.60r" % (path, name))
        try:
            (a, b), dtype = t["data_offsets"], t["dtype"]
            count = 1
            for d in t["shape"]:
                count *= int(d)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):   # OverflowError: int(-inf)
            raise HFError("%s is damaged: tensor %s has no valid dtype/shape/data_offsets" % (path, name))
        if not isinstance(dtype, str) or dtype not in HF_DTYPES:        # a list is unhashable; %r keeps one line
            raise HFError("%s: tensor %s is %.40r; macrogpt reads F32, F16, BF16 and F64" % (path, name, dtype))
        if not (isinstance(a, int) and isinstance(b, int)) or b - a != count * HF_DTYPES[dtype]:
            raise HFError("%s is damaged: tensor %s does not fit its data_offsets" % (path, name))
        out.append((a, b, name))
    return sorted(out)


def _checked_header(path, data):
    """Parse and validate a safetensors header -> (tensor entries, data start)."""
    if len(data) < 8:
        raise HFError("%s is not a safetensors file (too short)" % path)
    n = struct.unpack("<Q", data[:8])[0]
    if n > min(HF_MAX_HEADER, len(data) - 8):
        raise HFError("%s is not a safetensors file (header length %d)" % (path, n))
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (ValueError, RecursionError):            # RecursionError: nested deeper than json can parse
        raise HFError("%s is damaged: its header is not JSON" % path)
    if not isinstance(header, dict):
        raise HFError("%s is damaged: its header is not a JSON object" % path)
    header.pop("__metadata__", None)
    end = 0
    for a, b, name in _header_entries(path, header):
        if a != end:                           # the spec: no gaps, no overlaps
            raise HFError("%s is damaged: tensor %s does not start where the previous one ends" % (path, name))
        end = b
    if 8 + n + end != len(data):
        raise HFError("%s is damaged: the data is %d bytes, the header describes %d"
                      % (path, len(data) - 8 - n, end))
    return header, 8 + n


def read_safetensors(path):
    """A safetensors file -> {name: (shape, flat list of floats)}."""
    data = read_bytes(path, "", HFError)
    header, start = _checked_header(path, data)
    out = {}
    for name, t in header.items():
        a, b = t["data_offsets"]
        out[name] = (list(t["shape"]), _decode_values(data[start + a:start + b], t["dtype"]))
    return out


# -- export ----------------------------------------------------------------------------------

def _json_file(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _is_export_file(path):
    """A file an export writes, or the adapter folder of --export-lora holding only such files."""
    if os.path.basename(path) == HF_ADAPTER_DIR and os.path.isdir(path) and not os.path.islink(path):
        return all(_is_export_file(os.path.join(path, e)) and not os.path.isdir(os.path.join(path, e))
                   for e in os.listdir(path))
    return path.endswith((".json", ".safetensors")) and os.path.isfile(path)


def _check_export_target(out_dir, force):
    """Refuse a DIR that holds anything, unless --force and it holds only an earlier export's files."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise HFError("%s exists and is not a directory" % out_dir)
    entries = os.listdir(out_dir)
    if entries and not force:
        raise HFError("%s is not empty; pass --force to replace it" % out_dir)
    foreign = [e for e in entries if not _is_export_file(os.path.join(out_dir, e))]
    if foreign:
        raise HFError("%s holds %s, which no export writes; --force only replaces an earlier export"
                      % (out_dir, sorted(foreign)[0]))


def write_hf_dir(folder, brain, lora_base=None):
    """Every file of the export into an existing empty folder.

    With lora_base (the final path of the folder), the weights are the base alone and the
    deltas go to folder/adapter as a PEFT LoRA adapter whose base is that path.
    """
    model, cfg = brain.model, brain.model.cfg
    tensors = hf_tensors(model, merge=lora_base is None)
    tied = all(t[0] != "lm_head.weight" for t in tensors)
    tokenizer = hf_tokenizer_json(brain.tok)
    tok_config, specials = hf_tokenizer_files(cfg)
    _json_file(os.path.join(folder, "config.json"), hf_config(model, tied, brain.progress, brain.step))
    _json_file(os.path.join(folder, "generation_config.json"), hf_generation_config(cfg))
    _json_file(os.path.join(folder, "tokenizer.json"), tokenizer)
    _json_file(os.path.join(folder, "tokenizer_config.json"), tok_config)
    _json_file(os.path.join(folder, "special_tokens_map.json"), specials)
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
    if lora_base is not None:
        adapter = os.path.join(folder, HF_ADAPTER_DIR)
        os.mkdir(adapter)
        _json_file(os.path.join(adapter, "adapter_config.json"), hf_lora_config(model, lora_base))
        write_safetensors(os.path.join(adapter, "adapter_model.safetensors"), hf_lora_tensors(model))
    return tensors


def export_hf(brain, out_dir, force=False, lora=False):
    """Write the brain as a Hugging Face Llama directory -> [(name, shape, rows)] written.

    lora: the base unmerged, and the deltas as a PEFT adapter in DIR/adapter.
    DIR appears only once it is complete.
    The files go into a hidden folder beside DIR that is renamed into place at the end, so
    an interrupted export leaves DIR as it was (or absent) and never half written.
    """
    out_dir = os.path.normpath(out_dir)
    _check_export_target(out_dir, force)
    if lora and not brain.model.n_deltas:
        raise HFError("the checkpoint has no delta adapters yet; --export writes the whole model")
    tmp = _fresh_folder(out_dir)
    try:
        tensors = write_hf_dir(tmp, brain, os.path.abspath(out_dir) if lora else None)
        _swap_in(tmp, out_dir)
        return tensors
    except OSError as e:
        raise HFError("cannot write export %s: %s" % (out_dir, e.strerror or e))
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _fresh_folder(out_dir):
    """A new hidden folder beside out_dir, made with the user's umask (mkdtemp's is 0700)."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    for n in range(1000):
        tmp = os.path.join(parent, ".%s.export-%d-%d" % (os.path.basename(out_dir), os.getpid(), n))
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise HFError("cannot write to %s: %s" % (parent, e.strerror or e))
    raise HFError("cannot make a temporary folder in %s" % parent)


def _swap_in(tmp, out_dir):
    """Rename the finished folder to out_dir; an earlier export there is removed only after."""
    old = None
    if os.path.lexists(out_dir):
        old = tmp + ".old"
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- import ----------------------------------------------------------------------------------

def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except OSError as e:
        raise HFError("cannot read %s: %s" % (path, e.strerror or e))
    except (ValueError, RecursionError) as e:       # RecursionError: nested deeper than json can parse
        raise HFError("%s is not valid JSON: %s" % (path, e))
    if not isinstance(obj, dict):
        raise HFError("%s does not hold a JSON object" % path)
    return obj


def _shown(value):
    """str(value) for a one-line message; repr if it holds a newline or another control character."""
    text = str(value)
    return text if text.isprintable() else repr(text)


def _hf_rope_theta(hf, path):
    """rope_theta from either layout (transformers 4: rope_theta; 5: rope_parameters); plain RoPE only."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise HFError("%s: rope_parameters is not one plain RoPE setting" % path)
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default" or params.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFError("%s uses %s RoPE (partial or scaled); macrogpt has plain RoPE only" % (path, _shown(kind)))
    return params.get("rope_theta", hf.get("rope_theta", 10000.0))


def check_hf_config(hf, cfg, path):
    """Refuse, with one line, any config.json that macrogpt's network under cfg cannot represent."""
    if hf.get("architectures") != ["LlamaForCausalLM"] or hf.get("model_type", "llama") != "llama":
        archs = hf.get("architectures")                 # a float here was a TypeError, "a\nb" two lines
        name = "/".join(map(str, archs)) if isinstance(archs, list) and archs else "unknown"
        raise HFError("%s is a %s model; macrogpt imports LlamaForCausalLM only" % (path, _shown(name)))
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
        if not _is_kind(hf.get(key), "int") or hf[key] <= 0:
            raise HFError("%s: config.json has %s = %r; a positive integer is needed" % (path, key, hf.get(key)))
    heads = hf.get("num_attention_heads")
    fixed = (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
             ("num_key_value_heads", heads), ("rms_norm_eps", HF_RMS_EPS),
             ("intermediate_size", 4 * hf["hidden_size"]))
    for key, want in fixed:
        if hf.get(key, want) != want:
            raise HFError("%s has %s = %r; macrogpt's network needs %r" % (path, key, hf.get(key), want))
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if not _is_kind(head_dim, "int") or head_dim * heads != hf["hidden_size"]:   # {"a": 1} was a TypeError
        raise HFError("%s has head_dim %r; macrogpt needs hidden_size / num_attention_heads" % (path, hf.get("head_dim")))
    shapes = (("num_hidden_layers", "n_layer"), ("hidden_size", "n_embd"), ("num_attention_heads", "n_head"),
              ("max_position_embeddings", "block_size"))
    for key, field in shapes:
        if hf.get(key) != getattr(cfg, field):
            raise HFError('%s has %s %r but Config.%s is %r; put "%s": %s in a --config file'
                          % (path, key, hf.get(key), field, getattr(cfg, field), field, json.dumps(hf.get(key))))
    theta = _hf_rope_theta(hf, path)
    if theta != cfg.rope_base:
        raise HFError('%s has rope_theta %r but Config.rope_base is %r; put "rope_base": %s in a --config file'
                      % (path, theta, cfg.rope_base, json.dumps(theta)))


def _merge_pair_strings(entry):
    """A merges entry, "a b" (tokenizers < 0.20) or ["a", "b"] -> (a, b)."""
    parts = entry.split(" ") if isinstance(entry, str) else entry
    if not isinstance(parts, list) or len(parts) != 2:
        raise ValueError("%.40r" % (entry,))           # %r: an entry may hold a newline
    return parts


def _splits_like_piece_re(pattern):
    """Whether an exported split pattern behaves as PIECE_RE on a probe of many scripts.

    Compared by behavior, not text: the ranges of a pattern written by a Python with other
    Unicode tables differ only in characters assigned since, and macrogpt reads those with
    its own PIECE_RE anyway.
    """
    regex = pattern.get("Regex") if isinstance(pattern, dict) else None
    if not isinstance(regex, str):
        return False
    as_python = re.sub(r"\\x\{([0-9A-F]{1,6})\}", lambda m: "\\U%08X" % int(m.group(1), 16), regex)
    try:
        with warnings.catch_warnings():            # a foreign pattern's FutureWarning went to stderr, 2 lines
            warnings.simplefilter("ignore")
            return re.findall(as_python, HF_PROBE) == split_pieces(HF_PROBE)
    except (re.error, ValueError):                 # not a pattern Python can read: not ours
        return False


def _check_tokenizer_pipeline(tj, path):
    """Refuse a tokenizer.json whose steps around the BPE differ from an export's -> its model dict."""
    model, pre = tj.get("model"), tj.get("pre_tokenizer")
    if not isinstance(model, dict) or not isinstance(pre, dict):
        raise HFError("%s has no BPE model or pre-tokenizer" % path)
    options = {"type": "BPE", "byte_fallback": False, "continuing_subword_prefix": None,
               "end_of_word_suffix": None, "dropout": None}
    if any(model.get(k, v if k != "type" else None) != v for k, v in options.items()) or model.get("ignore_merges"):
        raise HFError("%s is not a plain byte-level BPE; macrogpt imports its own tokenizer layout only" % path)
    steps = pre.get("pretokenizers") or []
    if not isinstance(steps, list) or not all(isinstance(st, dict) for st in steps):
        steps = []
    if (tj.get("normalizer") is not None or pre.get("type") != "Sequence" or len(steps) != 2
            or steps[0].get("type") != "Split" or steps[0].get("behavior") != "Isolated"
            or steps[1].get("type") != "ByteLevel" or steps[1].get("add_prefix_space") or steps[1].get("use_regex")):
        raise HFError("%s pre-tokenizes differently from macrogpt (a normalizer, or not Split + ByteLevel)" % path)
    if not _splits_like_piece_re(steps[0].get("pattern")):
        raise HFError("%s splits text into pieces differently from macrogpt" % path)
    return model


def tokenizer_from_hf(tj, path):
    """tokenizer.json -> Tokenizer, if it is macrogpt's layout: bytes, BOS/EOS/PAD, merges in id order."""
    model = _check_tokenizer_pipeline(tj, path)
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise HFError("%s has no BPE vocab and merges" % path)
    expected = byte_alphabet() + [s for _, s in HF_SPECIALS]
    if any(vocab.get(s) != i for i, s in enumerate(expected)) or len(vocab) != N_BASE_VOCAB + len(merges):
        raise HFError("%s does not start with macrogpt's 256 bytes and <BOS>, <EOS>, <PAD>" % path)
    pairs = []
    try:
        for rank, entry in enumerate(merges):
            a, b = _merge_pair_strings(entry)
            if vocab[a + b] != N_BASE_VOCAB + rank:
                raise ValueError("%.40r" % (entry,))
            pairs.append((vocab[a], vocab[b]))
        return Tokenizer(pairs)
    except (KeyError, TypeError, ValueError) as e:
        raise HFError("%s: merge %s does not make the next id in order, as macrogpt's merges do" % (path, e))


def read_hf_weights(hf_dir):
    """model.safetensors, or the shards its index names -> {name: (shape, flat floats)}."""
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(single):
        return read_safetensors(single)
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if not os.path.exists(index):
        raise HFError("%s has no model.safetensors (save with safe_serialization; .bin files are not read)" % hf_dir)
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise HFError("%s has no weight_map" % index)
    out = {}
    for shard in sorted(set(weight_map.values())):
        out.update(read_safetensors(os.path.join(hf_dir, os.path.basename(str(shard)))))
    return out


def _take(tensors, name, shape, where):
    """Pop one tensor of the given shape as rows ((1, n) for a 1-D gain)."""
    if name not in tensors:
        raise HFError("%s has no tensor %s" % (where, name))
    got, flat = tensors.pop(name)
    if got != shape:
        raise HFError("%s: %s has shape %s, expected %s" % (where, name, got, shape))
    cols = shape[-1]
    return [flat[i:i + cols] for i in range(0, len(flat), cols)]


def _fill_model(model, tensors, tied_hf, where):
    """Copy Llama tensors into a fresh GPT; refuse biases, leftovers and a head Config cannot hold."""
    bias = sorted(n for n in tensors if n.endswith(".bias"))
    if bias:
        raise HFError("%s has bias tensors (%s); macrogpt's layers have none" % (where, bias[0]))
    cfg, V = model.cfg, model.vocab_size
    C, H = cfg.n_embd, 4 * cfg.n_embd
    model.wte.data = _take(tensors, "model.embed_tokens.weight", [V, C], where)
    shapes = {"wq": [C, C], "wk": [C, C], "wv": [C, C], "wo": [C, C], "fc_g": [H, C], "fc_v": [H, C], "fc2": [C, H]}
    for i, blk in enumerate(model.blocks):
        pre = "model.layers.%d." % i
        blk.ln1.data = _take(tensors, pre + "input_layernorm.weight", [C], where)
        blk.ln2.data = _take(tensors, pre + "post_attention_layernorm.weight", [C], where)
        for ours, hf_name in HF_LINEAR_NAMES:
            getattr(blk, ours).weight.data = _take(tensors, pre + hf_name + ".weight", shapes[ours], where)
    model.lnf.data = _take(tensors, "model.norm.weight", [C], where)
    if tied_hf:
        tensors.pop("lm_head.weight", None)        # transformers ignores it too: the head is embed_tokens
    head = _take(tensors, "lm_head.weight", [V, C], where) if "lm_head.weight" in tensors else None
    if head is None and not tied_hf:
        raise HFError("%s is untied but has no lm_head.weight" % where)
    if cfg.tie_embeddings and head is not None and head != model.wte.data:
        raise HFError('%s has an lm_head that differs from its embeddings but Config.tie_embeddings is true; '
                      'put "tie_embeddings": false in a --config file' % where)
    if not cfg.tie_embeddings:
        model.lm_head.weight.data = head if head is not None else [list(r) for r in model.wte.data]
    leftover = sorted(n for n in tensors if not n.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise HFError("%s has tensors macrogpt has no place for (%s)" % (where, leftover[0]))
    model.touch()


def brain_from_hf(hf_dir, cfg, seed=0):
    """A Brain from a Hugging Face Llama directory, ready for the organism to go on living.

    The model arrives merged (no deltas) and counts as warmed up: the base is frozen and one
    empty delta appended, exactly as after warmup, so the organism continues with bursts and
    never retrains the base it was given. lambda starts at 0 (the weights may have changed
    elsewhere, so old evidence is void) until the first burst measures the held-out slice.
    """
    hf = _read_json(os.path.join(hf_dir, "config.json"))
    check_hf_config(hf, cfg, hf_dir)
    tok = tokenizer_from_hf(_read_json(os.path.join(hf_dir, "tokenizer.json")), hf_dir)
    if hf.get("vocab_size") != tok.vocab_size:
        raise HFError("%s has vocab_size %r but its tokenizer has %d ids" % (hf_dir, hf.get("vocab_size"), tok.vocab_size))
    model = GPT(cfg, tok.vocab_size, seed, init=False)
    _fill_model(model, read_hf_weights(hf_dir), hf.get("tie_word_embeddings", True), hf_dir)
    meta = hf.get("macrogpt") if isinstance(hf.get("macrogpt"), dict) else {}
    step = meta["step"] if _is_kind(meta.get("step"), "int") and meta["step"] >= 0 else cfg.warmup_steps
    progress = Progress(warmup_done=True)
    if _is_kind(meta.get("bpe_chars"), "int") and meta["bpe_chars"] >= 0:
        progress.bpe_chars = meta["bpe_chars"]
    if cfg.freeze_base_after_warmup:
        model.freeze_base()
        model.add_delta()
    return Brain(model, Adam(cfg), step, tok, progress)


def import_hf(hf_dir, ckpt, cfg, force=False, seed=0):
    """Read a Hugging Face Llama directory into the checkpoint file ckpt -> the Brain."""
    if os.path.exists(ckpt) and not force:
        raise HFError("checkpoint %s exists; pass --force to replace it, or name another --ckpt" % ckpt)
    if not os.path.isdir(hf_dir):
        raise HFError("%s is not a directory" % hf_dir)
    brain = brain_from_hf(hf_dir, cfg, seed)
    brain.save(ckpt)
    return brain


def run_hf(args, cfg):
    """--export DIR or --import DIR: one line of what was done."""
    chosen = [a for a in (args.export, args.export_lora, args.import_dir) if a is not None]
    if len(chosen) > 1:
        raise HFError("--export, --export-lora and --import go one at a time")
    if args.import_dir is None:
        out_dir, lora = (args.export, False) if args.export is not None else (args.export_lora, True)
        if not os.path.exists(args.ckpt):
            raise HFError("no checkpoint %s to export (chat first, or name one with --ckpt)" % args.ckpt)
        brain = Brain.load(args.ckpt, cfg, args.seed)
        tensors = export_hf(brain, out_dir, args.force, lora)
        tied = all(name != "lm_head.weight" for name, _, _ in tensors)
        n_params = sum(len(rows) * len(rows[0]) for _, _, rows in tensors)
        say("exported %s to %s: %d tensors, %d parameters (%s), vocab %d, %s embeddings"
            % (args.ckpt, out_dir, len(tensors), n_params,
               "base; deltas as a rank-%d LoRA in %s" % (brain.model.n_deltas * cfg.delta_rank, HF_ADAPTER_DIR)
               if lora else "deltas merged", brain.model.vocab_size,
               "tied" if tied else "untied"))
        return 0
    brain = import_hf(args.import_dir, args.ckpt, cfg, args.force, args.seed)
    say("imported %s into %s: vocab %d, %d layers; warmup done%s"
        % (args.import_dir, args.ckpt, brain.model.vocab_size, cfg.n_layer,
           ", base frozen, bursts train a delta" if cfg.freeze_base_after_warmup else ""))
    return 0


# ======================================================================================
# Bench: `python macrogpt.py --bench` measures training, generation and a naive reference.
# ======================================================================================

def forward_macs_per_token(cfg, vocab_size, T, n_deltas=0):
    """Multiply-adds of one token's forward pass at sequence length T (attention averaged)."""
    C, H, r = cfg.n_embd, 4 * cfg.n_embd, cfg.delta_rank
    shapes = [(C, C)] * 4 + [(H, C), (H, C), (C, H)]          # (out, in) of each block linear
    per_layer = sum(o * i + n_deltas * r * (o + i) for o, i in shapes)
    per_layer += (T + 1) * C                                  # q.k and p.v over (T+1)/2 keys
    head = vocab_size * C + n_deltas * r * (vocab_size + C)
    return cfg.n_layer * per_layer + head


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def bench_naive_mflops(N, k, M, repeats=3):
    """The plain sum(map(mul, a, b)) matmul on (N, k) x (M, k): the reference for this machine."""
    rng = random.Random(0)
    X = [[rng.random() for _ in range(k)] for _ in range(N)]
    W = [[rng.random() for _ in range(k)] for _ in range(M)]
    mul, times = operator.mul, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        [[sum(map(mul, x, w)) for w in W] for x in X]
        times.append(time.perf_counter() - t0)
    return 2.0 * N * k * M / _median(times) / 1e6


def bench_model(cfg, vocab_size, steps=5, n_seq=4, T=64, gen_tokens=200, prompt_tokens=16, out=print):
    rng = random.Random(0)
    model = GPT(cfg, vocab_size, seed=0)
    opt = Adam(cfg)
    rates = []
    for i in range(steps + 1):                                # the first step is a warm-up
        seqs = [[rng.randrange(vocab_size) for _ in range(T + 1)] for _ in range(n_seq)]
        t0 = time.perf_counter()
        loss = train_step(model, opt, [s[:-1] for s in seqs], [s[1:] for s in seqs], lr_at(i, cfg))
        dt = time.perf_counter() - t0
        if i:
            rates.append(n_seq * T / dt)
            out("train step %d/%d | loss %.3f | %.0f tok/s" % (i, steps, loss, rates[-1]))
    cache = model.new_cache()
    for tok in [rng.randrange(vocab_size) for _ in range(prompt_tokens)]:
        logits = model.step(cache, tok)
    t0 = time.perf_counter()
    for _ in range(gen_tokens):
        logits = model.step(cache, max(range(len(logits)), key=logits.__getitem__))
    gen_rate = gen_tokens / (time.perf_counter() - t0)
    return {"train_tokens_per_s": round(_median(rates), 1), "gen_tokens_per_s": round(gen_rate, 1),
            "params": model.num_params(),
            "train_flops_per_token": 3 * 2 * forward_macs_per_token(cfg, vocab_size, T)}


def bench_workers(cfg, n, tok, steps=4, n_seq=4, T=64, out=print):
    """Training tokens/s of n worker processes sharing each n_seq x T batch (median; one warm-up step)."""
    brain = Brain.fresh(cfg)
    brain.tok = tok
    brain.model.grow_vocab(tok.vocab_size)
    workers = Workers(n)
    rng, rates = random.Random(0), []
    try:
        workers.load(brain.to_bytes(), brain.model.num_params())
        for i in range(steps + 1):
            b = [[rng.randrange(tok.vocab_size) for _ in range(T + 1)] for _ in range(n_seq)]
            t0 = time.perf_counter()
            workers.step(b, lr_at(i, cfg), True)
            if i:
                rates.append(n_seq * T / (time.perf_counter() - t0))
                out("%d worker%s step %d/%d | %.0f tok/s" % (n, "s" if n > 1 else "", i, steps, rates[-1]))
    finally:
        workers.close()
    return round(_median(rates), 1)


def bench_tokenizer(lines, num_merges):
    """Seconds to learn num_merges merges on lines, and encode throughput (bytes/s) after
    -> (figures, the tokenizer)."""
    tok = Tokenizer()
    t0 = time.perf_counter()
    tok.train(lines, num_merges)
    train_s = time.perf_counter() - t0
    n_bytes = sum(len(text_to_bytes(l)) + 1 for l in lines)
    times, n_tokens = [], 0
    for _ in range(3):
        tok._cache.clear()                                    # measure cold encoding
        t0 = time.perf_counter()
        n_tokens = sum(len(tok.encode(l)) + 1 for l in lines)
        times.append(time.perf_counter() - t0)
    return {"bpe_train_seconds": round(train_s, 3), "bpe_merges": len(tok.merges),
            "encode_bytes_per_s": round(n_bytes / _median(times)), "corpus_bytes": n_bytes,
            "tokens_per_byte": round(n_tokens / n_bytes, 4)}, tok


def run_bench(cfg, corpus_path=None, out=print, show_progress=False):
    """Speeds of the model a first run trains: its vocabulary is the one the corpus teaches
    the tokenizer (bytes alone without a corpus), since the output layer grows with it."""
    t0 = time.perf_counter()
    meter = Meter("bench", 2, show_progress)                  # on the quiet phases only
    meter.update(0)
    result = {"python": sys.version.split()[0], "config": cfg.to_dict(),
              "kernel": "math.dist" if _dist is not None else "sum(map(mul))",
              "gen_kernel": "float" if cfg.exact_generation else "64-bit fixed point"}
    tok = Tokenizer()
    if corpus_path:
        lines = read_corpus_file(corpus_path)
        figures, trained = bench_tokenizer(lines, cfg.bpe_num_merges)
        result.update(figures)
        train, _ = split_heldout(lines, cfg.heldout_every)            # a first run's rule and text
        if sum(len(text_to_bytes(l)) for l in train) >= cfg.enable_bpe_after_chars:
            tok = trained
    result["vocab"] = tok.vocab_size
    meter.update(1)
    result["naive_mflops"] = round(bench_naive_mflops(256, cfg.n_embd, 4 * cfg.n_embd), 1)
    meter.finish()                                            # bench_model prints a line per step itself
    result.update(bench_model(cfg, tok.vocab_size, out=out))
    result["train_mflops"] = round(result["train_tokens_per_s"] * result["train_flops_per_token"] / 1e6, 1)
    n = result["train_workers"] = worker_count(cfg)
    result["train_tokens_per_s_1"] = bench_workers(cfg, 1, tok, n_seq=cfg.batch_size, T=cfg.seq_len, out=out)
    result["train_tokens_per_s_all"] = (bench_workers(cfg, n, tok, n_seq=cfg.batch_size, T=cfg.seq_len, out=out)
                                        if n > 1 else result["train_tokens_per_s_1"])
    result["bench_seconds"] = round(time.perf_counter() - t0, 1)
    out("python %s | kernel %s, generation %s | %d params, vocabulary %d"
        % (result["python"], result["kernel"], result["gen_kernel"], result["params"], result["vocab"]))
    out("train %.0f tok/s (%.0f MFLOP/s) | generate %.0f tok/s | naive matmul %.0f MFLOP/s"
        % (result["train_tokens_per_s"], result["train_mflops"], result["gen_tokens_per_s"],
           result["naive_mflops"]))
    out("data-parallel training: %.0f tok/s with 1 worker, %.0f with %d (x%.2f)"
        % (result["train_tokens_per_s_1"], result["train_tokens_per_s_all"], n,
           result["train_tokens_per_s_all"] / max(1e-9, result["train_tokens_per_s_1"])))
    if corpus_path:
        out("tokenizer: %d merges in %.2f s | encode %.0f KB/s | %.3f tokens per byte on %d bytes"
            % (result["bpe_merges"], result["bpe_train_seconds"], result["encode_bytes_per_s"] / 1000,
               result["tokens_per_byte"], result["corpus_bytes"]))
    out(json.dumps(result, sort_keys=True))
    return result


# ======================================================================================
# Folder lock: one organism per folder, so two processes never train over each other's checkpoint.
# ======================================================================================
# The lock is the OS's (flock, or a Windows byte-range lock), so it dies with its process and
# kill -9 leaves nothing stale. The file holds the owner's PID only for the message; it is
# removed while still locked, and a locker checks that the file it locked is still the one at
# the path (otherwise it locked a removed file and tries again).

WINDOWS_LOCK_OFFSET = 1 << 20             # Windows locks a byte past the PID, so others can read it


class LockedError(MacroError):
    pass


def _try_lock(fd):
    """A non-blocking exclusive lock on an open file -> False if another process holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            os.lseek(fd, WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except (BlockingIOError, PermissionError):
        return False
    return True


def _same_file(fd, path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


class FolderLock:
    """An exclusive OS lock on `<path>.lock` for as long as this process lives or until release()."""

    def __init__(self, path):
        self.path = path + ".lock"
        self.fd = None

    def acquire(self):
        for _ in range(100):                           # each retry means another process just released
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as e:
                raise MacroError("cannot create lock file %s: %s" % (self.path, e.strerror or e))
            if not _try_lock(fd):
                os.lseek(fd, 0, os.SEEK_SET)
                owner = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise LockedError("another macrogpt (PID %s) is using %s; wait for it to end, or give this "
                                  "one its own --db and --ckpt" % (owner, os.path.abspath(self.path[:-5])))
            if fcntl is None or _same_file(fd, self.path):
                break
            os.close(fd)
        else:
            raise MacroError("cannot lock %s: it keeps being replaced" % self.path)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"%d\n" % os.getpid())
        self.fd = fd
        return self

    def release(self):
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        if fcntl is not None:
            _remove_quietly(self.path)             # while still locked: see the section note
            os.close(fd)
        else:
            os.lseek(fd, WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
            os.close(fd)
            _remove_quietly(self.path)             # fails harmlessly if another process has it open

    def __enter__(self):
        return self.acquire()

    def __exit__(self, kind, value, tb):
        self.release()
        return False


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def remove_stale_temps(path):
    """Remove `<path>.<pid>.tmp` (and the older `<path>.tmp`) left by killed writers -> how many.

    Call it only while holding the lock on `path`: then no other process is writing one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    pattern = re.compile(re.escape(base) + r"(\.\d+)?\.tmp\Z")
    removed = 0
    for name in os.listdir(folder):
        if pattern.match(name) and os.path.join(folder, name) != os.path.abspath(temp_name(path)):
            _remove_quietly(os.path.join(folder, name))
            removed += 1
    return removed


# ======================================================================================
# CLI: argparse, paths in the current directory, one-line errors with exit code 2.
# ======================================================================================

def default_corpus_path():
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nonames.txt")
    return "nonames.txt" if os.path.exists("nonames.txt") else here


def load_config(path):
    """Config() with the overrides of a JSON object file (--config)."""
    cfg = Config()
    if path is None:
        return cfg
    try:
        with open(path, encoding="utf-8") as f:
            overrides = json.load(f)
    except (OSError, ValueError, RecursionError) as e:   # RecursionError: nested deeper than json can parse
        raise ConfigError("cannot read config %s: %s" % (path, e))
    if not isinstance(overrides, dict):
        raise ConfigError("config %s must hold a JSON object of Config fields" % path)
    known = {f.name: f.type for f in fields(Config)}
    for key in overrides:
        if key not in known:
            raise ConfigError("config %s: unknown field %r" % (path, key))
    try:
        return Config(**overrides)
    except TypeError as e:
        raise ConfigError("config %s: %s" % (path, e))


def build_parser():
    p = argparse.ArgumentParser(prog="macrogpt", description="A small GPT that chats and keeps learning.")
    p.add_argument("--corpus", default=None, help="seed corpus (default: nonames.txt here or beside the script)")
    p.add_argument("--db", default="memory.sqlite3", help="SQLite memory (default: %(default)s)")
    p.add_argument("--ckpt", default="macrogpt.ckpt", help="checkpoint file (default: %(default)s)")
    p.add_argument("--config", default=None, metavar="FILE", help="JSON file of Config overrides")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and sampling")
    p.add_argument("--no-train", action="store_true", help="chat without background training")
    p.add_argument("--bench", action="store_true", help="measure training, generation and tokenizer speed")
    p.add_argument("--eval", metavar="FILE", help="held-out bits per byte of network, field and mix on FILE")
    p.add_argument("--tokenize", metavar="TEXT", help="show how TEXT is split into tokens")
    p.add_argument("--prompt", metavar="TEXT", help="answer TEXT once and exit")
    p.add_argument("--growth", action="store_true", help="draw the growth log of the database (--db) and exit")
    p.add_argument("--quiet", action="store_true", help="no progress notes in the chat or on stderr")
    p.add_argument("--export", metavar="DIR", help="write the checkpoint as a Hugging Face Llama directory")
    p.add_argument("--export-lora", metavar="DIR",
                   help="like --export, but the deltas as a PEFT LoRA adapter in DIR/adapter, unmerged")
    p.add_argument("--import", "--from-hf", dest="import_dir", metavar="DIR",
                   help="make the checkpoint from a Hugging Face Llama directory (as --export writes)")
    p.add_argument("--force", action="store_true", help="let --export replace DIR, --import replace --ckpt")
    p.add_argument("--version", action="version", version="macrogpt " + VERSION)
    return p


def run(args):
    if args.growth:
        return print_growth(args.db)
    cfg = load_config(args.config)
    corpus = args.corpus or default_corpus_path()
    check_paths(args)
    if args.bench:
        run_bench(cfg, corpus, out=say, show_progress=not args.quiet)
        return 0
    if args.eval:
        evaluate_file(args.eval, cfg, corpus, args.ckpt, args.seed, out=say, show_progress=not args.quiet)
        return 0
    if args.export is not None or args.export_lora is not None or args.import_dir is not None:
        return run_hf(args, cfg)
    if args.tokenize is not None:
        say(format_tokenization(brain_for_reading(cfg, corpus, args.ckpt, args.seed).tok, args.tokenize))
        return 0
    if args.prompt is None and sys.stdin is None:
        raise MacroError("standard input is closed; pipe messages in, or give --prompt TEXT")
    with FolderLock(args.db), FolderLock(args.ckpt):         # before anything is written
        remove_stale_temps(args.ckpt)
        return run_session(cfg, corpus, args)


def check_paths(args):
    if not args.db or not args.ckpt:
        raise MacroError("--db and --ckpt need a file name")
    if os.path.abspath(args.db) == os.path.abspath(args.ckpt):
        raise MacroError("--db and --ckpt must be different files")


def run_session(cfg, corpus, args):
    """Chat, or answer --prompt once: the work that writes, done while holding the folder lock."""
    if args.prompt is not None:
        session = Session(cfg, corpus, args.db, args.ckpt, args.seed)
        try:
            text = args.prompt.strip()
            if text.startswith("/"):
                shown, _ = session.command(text)
                if shown:
                    say(shown)
            else:
                say(session.respond(text) if text else FALLBACK_REPLY)
            session.save()
        finally:
            session.close()
        return 0
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive:
        try:
            import readline                                   # noqa: F401  line editing and history
        except ImportError:
            pass
    train = not args.no_train
    workers = Workers(worker_count(cfg), args.seed) if train else None
    try:
        session = Session(cfg, corpus, args.db, args.ckpt, args.seed, workers)
        try:
            notes = TrainingNotes(session.cfg, session.brain.progress) if interactive and train and not args.quiet else None
            asyncio.run(chat(session, interactive, train, notes))
            quit_on_signals()                                  # the loop's handlers went with it
        finally:
            session.close()
    finally:
        if workers is not None:
            workers.close()
    return 0


def print_growth(db_path):
    """--growth: draw the growth log without training or chatting (opening may upgrade its schema)."""
    if not os.path.exists(db_path):
        raise MacroError("no database %s here yet: chat first (python3 macrogpt.py), or pass --db" % db_path)
    memory = Memory(db_path)
    try:
        say(growth_chart(memory.growth_rows()))
    finally:
        memory.close()
    return 0


class Terminated(BaseException):
    """SIGTERM or SIGHUP outside the chat loop; like KeyboardInterrupt, no `except Exception` stops it."""


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def quit_on_signals():
    """SIGTERM and SIGHUP outside the chat loop end the program quietly -> a function restoring the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    if signal.getsignal(signal.SIGINT) == signal.SIG_DFL:
        signal.signal(signal.SIGINT, signal.default_int_handler)   # set to SIG_DFL for the imports
    old = {}
    for name in QUIT_SIGNALS:
        if hasattr(signal, name):
            sig = getattr(signal, name)
            old[sig] = signal.signal(sig, _raise_terminated)

    def restore():
        for sig, handler in old.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    return restore


def plug_closed_streams():
    """Put /dev/null on a closed fd 0, 1 or 2, so no file we open lands there and is written by print.

    sys.stdin and sys.stdout stay None, which run() reads as "closed"; a closed stderr just goes quiet.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)


def _quiet_stdout():
    """Point fd 1 at /dev/null, so the exit-time flush of what could not be written stays silent."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)


def main(argv=None):
    restore = None
    try:
        plug_closed_streams()
        restore = quit_on_signals()
        args = build_parser().parse_args(argv)
        if sys.stdout is None:
            raise OutputError("standard output is closed; nothing could be shown")
        return run(args)
    except MacroError as e:
        if isinstance(e, OutputError):
            _quiet_stdout()
        try:
            say("macrogpt: error: %s" % e, sys.stderr)
        except (OutputError, BrokenPipeError):
            pass                                   # stderr is gone too: the exit code is all we have
        return 2
    except BrokenPipeError:                        # `| head` closed our output: nothing left to say
        _quiet_stdout()
        return 1
    except KeyboardInterrupt:                      # Ctrl+C before the chat loop took it over
        return 130
    except Terminated:                             # before the loop: nothing new to save yet
        return 0
    finally:
        if restore is not None:
            restore()


if __name__ == "__main__":
    sys.exit(main())
