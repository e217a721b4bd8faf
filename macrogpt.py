"""macrogpt: a small GPT in one standard-library Python file that chats and keeps learning.

Contract
  * `python macrogpt.py` chats in the terminal. It answers at once from the corpus field (an n-gram
    model of the living corpus), trains its network in the background, and hands the voice over to
    the network as held-out evidence says it has earned it.
  * Training runs data-parallel in worker processes, one per core, never in the chat's way.
  * The field also teaches the network: part of each training target is its next-token distribution.
  * New conversation is learned in bursts by appended low-rank delta adapters over the base, which
    the burst leaves untouched; when no burst is due, idle learning rehearses the whole living
    corpus. Every burst and idle phase is judged on a held-out slice of whole exchanges against
    the best state so far, and rolled back if worse.
  * What the user said is stored and indexed; before each reply the statements that bear on the
    message are remembered: the network reads them, and a pointer in the voice copies from them.
  * Text is byte-level BPE whose vocabulary only grows; no trained weight is ever invalidated.
  * The network moves to and from the Hugging Face Llama format (--export, --import).
  * Standard library only, CPython 3.7 to 3.13.

Deliberately left out: GPUs, numpy, batching across users, anything that needs a network.

The file reads in four bands, in the order data flows: numerics (Config, kernels, autograd,
tokenizer, model, optimizer, sampler, the corpus field with mixing and held-out scoring), storage
(folder lock, checkpoints, SQLite memory), the organism (corpus, brain, pool, trainer) and the
face (voice, growth chart, progress notes, session, REPL, eval, export, bench, CLI).

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


_RANGES = (                               # (fields, test, what they must be), for Config.__post_init__
    ("n_layer n_embd n_head block_size delta_rank max_delta_modules lr_warmup_steps lr_decay_steps "
     "batch_size seq_len micro_steps max_corpus_lines field_order max_gen_tokens idle_steps init_std lr "
     "rope_base temperature grad_clip adam_eps entropy_temp_boost entropy_temp_focus", lambda v: v > 0, "> 0"),
    ("top_k repetition_guard min_gen_tokens qb_min_bytes warmup_steps train_workers enable_bpe_after_chars "
     "bpe_retrain_every_chars bpe_num_merges bpe_retrain_merges lr_min idle_lr forget_tolerance "
     "qb_cooldown_seconds", lambda v: v >= 0, ">= 0"),
    ("beta1 beta2 dropout field_discount", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("top_p min_p typical_p delta_grow_prob qb_min_novelty distill_beta", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("heldout_every", lambda v: v >= 2, "at least 2 (1 would hold out every line)"),
)


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

    def __post_init__(self):                  # validates, here and in dataclasses.replace
        for f in fields(self):
            kind, value = field_kind(f.name), getattr(self, f.name)
            if not _is_kind(value, kind):
                raise ConfigError("Config.%s must be %s, got %r" % (f.name, _KIND_NAMES[kind], value))
        for names, ok, rule in _RANGES:
            for name in names.split():
                if not ok(getattr(self, name)):
                    raise ConfigError("Config.%s must be %s, got %r" % (name, rule, getattr(self, name)))
        if self.n_embd % self.n_head:
            raise ConfigError("Config.n_embd (%d) must be divisible by n_head (%d)" % (self.n_embd, self.n_head))
        if self.head_dim % 2:
            raise ConfigError("Config.n_head: head_dim = n_embd / n_head = %d must be even for RoPE" % self.head_dim)
        if self.seq_len > self.block_size:
            raise ConfigError("Config.seq_len (%d) must not exceed block_size (%d)" % (self.seq_len, self.block_size))
        if self.lr_min > self.lr:
            raise ConfigError("Config.lr_min must be in [0, lr], got %r" % self.lr_min)
        if self.entropy_low > self.entropy_high:
            raise ConfigError("Config.entropy_low must not exceed entropy_high")
        if self.field_order > MAX_FIELD_ORDER:          # the counts grow as order squared per token
            raise ConfigError("Config.field_order must be at most %d, got %r" % (MAX_FIELD_ORDER, self.field_order))

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
    __slots__ = ("data", "grad", "parents", "backward_fn", "requires_grad")

    def __init__(self, data, parents=(), backward_fn=None, requires_grad=None):
        self.data = data                  # list of rows
        self.grad = None                  # same shape as data once backward has reached it
        self.parents = parents
        self.backward_fn = backward_fn
        self.requires_grad = any(p.requires_grad for p in parents) if requires_grad is None else requires_grad

    def backward(self):
        """Accumulate d(self)/d(node) into every node's .grad; self must be a 1x1 scalar."""
        self.grad = [[1.0]]
        for node in reversed(_topological_order(self)):
            if node.backward_fn is None or node.grad is None:
                continue
            grads = node.backward_fn(node.grad)
            for parent, g in zip(node.parents, grads):
                if g is None or not parent.requires_grad:
                    continue
                parent.grad = g if parent.grad is None else add_rows(parent.grad, g)
            if node.parents:
                node.grad = None          # free interior gradients as soon as they are used


def param(data):
    return Tensor(data, requires_grad=True)


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
        dense = zeros(len(table), len(table[0]))
        for i, gr in zip(ids, g):
            dense[i] = list(map(operator.add, dense[i], gr))
        return (dense,)
    return Tensor(out, (wte,), backward_fn)


def attention(qkv, n_seq, T, n_head, table):
    """Causal multi-head attention with RoPE, fused: (n_seq*T, 3C) rows [q|k|v] -> (n_seq*T, C);
    row b*T + t is token t of sequence b at absolute position t."""
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
        for b in range(n_seq):
            for h in range(n_head):
                Q, K, V, P = saved[b * n_head + h]
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


def cross_entropy(logits, targets, teacher=None, beta=0.0):
    """Per-row (1 - beta) * -log p[target] + beta * sum_j w_j * -log p[id_j] -> (N, 1), fused with
    the log-softmax; teacher[r] = (ids, weights) is a teacher's distribution over a few ids for
    row r (None: plain cross-entropy)."""
    if teacher is None:
        teacher, beta = [((), ())] * len(targets), 0.0
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
    cols = len(x.data[0])
    n = len(x.data) * cols
    value = sum(sum(r) for r in x.data) / n

    def backward_fn(g):
        return ([[g[0][0] / n] * cols for _ in x.data],)
    return Tensor([[value]], (x,), backward_fn)


@dataclass(eq=False)
class Delta:
    """One low-rank adapter: adds alpha * A (B x); A starts at zero so appending is a no-op."""
    A: Tensor                             # (out, rank) parameter
    B: Tensor                             # (rank, in) parameter
    alpha: float


@dataclass(eq=False)
class Linear:
    """A weight matrix W (out, in) plus appended deltas: y = W x + sum_k alpha_k A_k (B_k x)."""
    weight: Tensor
    deltas: list = dataclasses.field(default_factory=list)

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
    W, parents = [], [x]
    for m in mods:
        W.extend(m.effective())
        parents.append(m.weight)
        for d in m.deltas:
            parents.extend((d.A, d.B))
    X = x.data
    out = matmul_nt(X, W)

    def backward_fn(g):
        grads = [matmul_nt(g, transpose(W)) if x.requires_grad else None]
        gT, XT = transpose(g), transpose(X)
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
        if not (0 <= a < len(self.vocab) and 0 <= b < len(self.vocab)) or {a, b} & {BOS, EOS, PAD}:
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
        return [i for piece in split_pieces(text) for i in self._encode_piece(text_to_bytes(piece))]

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
        freq = Counter(text_to_bytes(piece) for line in lines for piece in split_pieces(line))
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
        out = [("h%d.%s" % (i, n), getattr(blk, n)) for i, blk in enumerate(self.blocks) for n in LINEAR_NAMES]
        return out + [("lm_head", self.lm_head)]

    def base_params(self):
        """(name, Tensor) of the base weights; a tied lm_head is listed once, as wte."""
        out = [("wte", self.wte)]
        for i, blk in enumerate(self.blocks):
            out += [("h%d.ln1" % i, blk.ln1), ("h%d.ln2" % i, blk.ln2)]
            out.extend(("h%d.%s" % (i, n), getattr(blk, n).weight) for n in LINEAR_NAMES)
        out.append(("lnf", self.lnf))
        if not self.cfg.tie_embeddings:
            out.append(("lm_head", self.lm_head.weight))
        return out

    def delta_params(self):
        out = []
        for name, lin in self.linears():
            for k, d in enumerate(lin.deltas):
                out += [("%s.d%d.A" % (name, k), d.A), ("%s.d%d.B" % (name, k), d.B)]
        return out

    def named_params(self):
        return self.base_params() + self.delta_params()

    def num_params(self):
        return sum(len(t.data) * len(t.data[0]) for _, t in self.named_params())

    @property
    def n_deltas(self):
        return len(self.lm_head.deltas)

    def set_trainable(self, base):
        """Train the base weights too (warmup, idle learning) or only the deltas (bursts): the
        choice is each job's, so nothing about it is saved."""
        for _, t in self.base_params():
            t.requires_grad = base

    def touch(self):
        self.version += 1

    # -- growth ------------------------------------------------------------------------
    def add_delta(self, alpha=None):
        """Append one delta module to every linear, scaled by alpha (default Config.delta_alpha);
        outputs are unchanged (A = 0)."""
        cfg = self.cfg
        if self.n_deltas >= cfg.max_delta_modules:
            return False
        r = cfg.delta_rank
        for _, lin in self.linears():
            out_dim, in_dim = len(lin.weight.data), len(lin.weight.data[0])
            A = param(zeros(out_dim, r))
            B = param(_randn(self.rng, r, in_dim, 1.0 / math.sqrt(in_dim)))
            lin.deltas.append(Delta(A, B, cfg.delta_alpha if alpha is None else alpha))
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
            t.data.extend(_randn(self.rng, new_size - old, C, std))
        for d in self.lm_head.deltas:
            d.A.data.extend(zeros(new_size - old, len(d.A.data[0])))
        self.touch()

    # -- training forward ----------------------------------------------------------------
    def forward(self, inputs, rng=None):
        """inputs: n_seq lists of T ids (equal lengths, T <= block_size) -> logits (n_seq*T, V);
        with rng (training), Config.dropout applies to what each attention and MLP adds."""
        n_seq, T = len(inputs), len(inputs[0])
        assert T <= self.cfg.block_size
        x = embed(self.wte, [i for seq in inputs for i in seq])   # (n_seq*T, C) rows
        for blk in self.blocks:
            x = blk(x, n_seq, T, self.cfg, self.rope, rng)
        return linear(rmsnorm(x, self.lnf), [self.lm_head])

    def loss(self, inputs, targets, rng=None, teacher=None, beta=0.0):
        """Mean next-token cross-entropy (nats) of targets (same shape as inputs); with a teacher
        (one (ids, weights) per target, in the same order) beta of it follows the teacher."""
        flat = [t for seq in targets for t in seq]
        return mean(cross_entropy(self.forward(inputs, rng), flat, teacher if beta else None, beta))

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
    progress = (step - cfg.lr_warmup_steps) / max(1, cfg.lr_decay_steps - cfg.lr_warmup_steps)
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


class Adam:
    """Adam over named parameters; moments and update counts are kept per row.

    The count is per row so that rows born late (a delta appended, token rows added by a
    BPE retrain, a resize) get their own bias correction instead of inheriting a count of
    thousands with zero moments, which would let them move at up to twice the intended rate.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.state = {}                   # name -> AdamState

    def update(self, named_params, lr):
        """Clip the global gradient norm, update trainable rows, clear grads -> the norm."""
        cfg = self.cfg
        live = [(n, p) for n, p in named_params if p.requires_grad and p.grad is not None]
        norm = math.sqrt(sum(sumsq(row) for _, p in live for row in p.grad))
        clip = min(1.0, cfg.grad_clip / (norm + 1e-12))
        b1, b2, eps = cfg.beta1, cfg.beta2, cfg.adam_eps
        c1, c2 = (1.0 - b1) * clip, (1.0 - b2) * clip * clip      # the clip folded in
        sqrt = math.sqrt
        for name, p in live:
            st = self.state.setdefault(name, AdamState([], [], []))
            m, v, counts = st.m, st.v, st.t
            while len(m) < len(p.data):                   # rows appended (vocabulary growth): no history
                m.append([0.0] * len(p.data[0]))
                v.append([0.0] * len(p.data[0]))
                counts.append(0)
            for i in range(len(p.data)):
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


def backward_step(model, inputs, targets, weight=1.0, rng=None, teacher=None, beta=0.0):
    """Forward and backward of weight * mean loss; gradients land in .grad -> the mean loss (nats).

    A data-parallel shard passes its share of the batch's tokens as weight, so the shards'
    gradients add up to the gradient of the whole batch's mean loss.
    """
    with _NoCycleCollection():
        loss = model.loss(inputs, targets, rng, teacher, beta)
        (scale(loss, weight) if weight != 1.0 else loss).backward()
    return loss.data[0][0]


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


def softmax(logits):
    return softmax_row(logits, 1.0)


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
    kept = set(kept)
    return normalize([p if i in kept else 0.0 for i, p in enumerate(probs)])


def filter_min_p(probs, min_p):
    """Drop tokens below min_p * max p (0 disables)."""
    if min_p <= 0:
        return list(probs)
    threshold = min_p * max(probs)
    return _keep(probs, [i for i, p in enumerate(probs) if p >= threshold and p > 0])


def _keep_mass(probs, order, mass):
    """Keep tokens in the given order until their probability reaches `mass`."""
    kept, total = [], 0.0
    for i in order:
        kept.append(i)
        total += probs[i]
        if total >= mass:
            break
    return _keep(probs, kept)


def filter_typical(probs, typical_p):
    """Keep tokens in order of |-log p - H| until their mass reaches typical_p (1 disables)."""
    if typical_p >= 1:
        return list(probs)
    h = entropy(probs)
    order = sorted((i for i, p in enumerate(probs) if p > 0), key=lambda i: (abs(-math.log(probs[i]) - h), i))
    return _keep_mass(probs, order, typical_p)


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
    return _keep_mass(probs, order, top_p)


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
        r, acc, last = self.rng.random(), 0.0, 0
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
    return dataclasses.replace(cfg, **{name: value})          # a ConfigError if out of range, nan or inf


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

def _ngrams(ids, n):
    """[5, 6], 2 -> [(BOS, 5), (5, 6), (6, EOS)]: a line's n-grams, framed by BOS padding and EOS."""
    seq = [BOS] * (n - 1) + list(ids) + [EOS]
    return list(zip(*[seq[j:] for j in range(n)]))


class NGramField:
    def __init__(self, order, vocab_size, discount=0.75):
        self.order, self.vocab_size, self.discount = order, vocab_size, discount
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

    def add(self, ids, by=1):
        """Count the n-grams of one line of token ids (by=-1 removes them)."""
        N = self.order
        for top in _ngrams(ids, N):
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
            for k in range(1, N + 1):
                grams[k].update(_ngrams(ids, k))
            self.n_tokens += len(ids) + 1
        self._fill(N, grams[N])
        for k in range(2, N + 1):
            self.seen[k] = dict(grams[k])
            self._fill(k - 1, Counter(map(operator.itemgetter(slice(1, None)), grams[k])))   # left extensions

    def _fill(self, k, counts):
        """Order k's table from {k-gram: count} (a fresh table only)."""
        table = self.tables[k]
        for gram, c in counts.items():
            table.setdefault(gram[:-1], {})[gram[-1]] = c
        self.totals[k] = {ctx: sum(row.values()) for ctx, row in table.items()}

    def _levels(self, context):
        """(row, total) of each order, lowest first, whose context was seen: the recursion's steps."""
        full = tuple([BOS] * self.order + list(context[-self.order:]))      # a line starts after BOS
        for k in range(1, self.order + 1):
            ctx = full[len(full) - (k - 1):]
            row = self.tables[k].get(ctx)
            if row:
                yield row, self.totals[k][ctx]

    def probs(self, context):
        """P(. | last order-1 tokens of context) over the whole vocabulary; sums to 1."""
        D, V = self.discount, self.vocab_size
        p = [1.0 / V] * V
        for row, total in self._levels(context):
            gamma = D * len(row) / total
            p = [gamma * v for v in p]
            for w, c in row.items():
                p[w] += (c - D) / total
        return p

    def prob(self, context, token):
        """P(token | context), the same recursion for one token."""
        D = self.discount
        p = 1.0 / self.vocab_size
        for row, total in self._levels(context):
            p = D * len(row) / total * p + max(row.get(token, 0) - D, 0.0) / total
        return p

    def novelty(self, ids):
        """Share of the line's n-grams (n = min(3, order)) the field has never counted."""
        n = min(3, self.order)
        known = self.seen[n] if n > 1 else {(w,) for w in self.tables[1].get((), {})}   # order 1 has no seen
        grams = _ngrams(ids, n)
        return sum(1 for g in grams if g not in known) / len(grams)


# ======================================================================================
# Scoring: the mix of network and field, and bits per byte of held-out text, for the
# trainer and --eval alike.
# ======================================================================================

def mix(p_model, p_field, lam):
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


# ======================================================================================
# Recall and Lexicon: two more things the corpus knows, a topic and its words.
# ======================================================================================

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
        for w in content_words(text) & self.index.keys():         # the index keeps no empty sets
            hits = self.index[w]
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


def _decode_folded(data):
    """bytes -> (case-folded text of the whole characters, or None if they are not UTF-8,
    the bytes of an unfinished last character)."""
    complete, rest = split_incomplete_utf8(data)
    try:
        return fold_case(complete.decode("utf-8")), rest
    except UnicodeDecodeError:
        return None, rest


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
        self._starts_of = {}                       # tail -> _starts(tail), until a word is added
        for line in lines:
            self.add(line)

    def add(self, text):
        text = fold_case(text)
        self._starts_of = {}
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
        (EOS among them); partials: (id,) + _decode_folded(bytes) of the other tokens.
        """
        if self._tokens is None or self._tokens[0] != tok.vocab_size:
            letters, breaks, partials = [], [], []
            for i in range(tok.vocab_size):
                if i in (BOS, PAD):
                    continue
                text, rest = _decode_folded(tok.token_bytes(i) if i != EOS else b"")
                if text is None or rest:
                    partials.append((i, text, rest))
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

    def _starts(self, tail):
        """Byte strings that begin a character allowed after tail: a letter continuing it, or a
        symbol where tail may end (kept until the next word is added)."""
        if tail not in self._starts_of:
            chars = self.next_letters.get(tail, set()) | (self.symbols if not tail or tail in self.words else set())
            self._starts_of[tail] = {c.encode("utf-8")[:k] for c in chars for k in range(1, len(c.encode("utf-8")))}
        return self._starts_of[tail]

    def _allows(self, tail, added, rest, starts):
        """Whether text `added` (None: not UTF-8) then the unfinished bytes `rest` may follow tail:
        every letter run a known word, the last one possibly a prefix."""
        if added is None:
            return False
        text = tail + added
        for m in LETTERS_RE.finditer(text):
            if m.group() not in (self.prefixes if m.end() == len(text) else self.words):
                return False
        if rest and added:                         # whole characters, then the start of another:
            m = TRAILING_LETTERS_RE.search(text)   # " \xd0" begins a Cyrillic word
            starts = self._starts(m.group() if m else "")
        return not rest or rest in starts

    def guard(self, probs, tok, data):
        """probs with every word-coining token removed; unchanged if that would remove them all.

        `data` is the reply so far as bytes; its trailing letters are the word in progress.
        """
        done, pending = split_incomplete_utf8(data)
        m = TRAILING_LETTERS_RE.search(fold_case(done.decode("utf-8", "replace")))
        tail = m.group() if m else ""
        may_end = not tail or tail in self.words
        starts = self._starts(tail)
        letters, breaks, partials = self._classify(tok)
        out = list(probs)
        if pending:                                # mid-character: decode what each token completes
            for i in range(tok.vocab_size):
                if i in (BOS, PAD):
                    continue
                raw = b"" if i == EOS else tok.token_bytes(i)
                added, rest = _decode_folded(pending + raw)
                if not raw or not self._allows(tail, added, rest, starts):
                    out[i] = 0.0                   # (EOS may not cut a character in half)
        else:
            words, prefixes = self.words, self.prefixes
            banned = [i for i, lead, whole, trail in letters
                      if (tail + lead) not in (prefixes if whole else words) or (trail and trail not in prefixes)]
            banned += [i for i, trail in breaks if not may_end or (trail and trail not in prefixes)]
            banned += [i for i, added, rest in partials
                       if not self._allows(tail, added, rest, starts)]
            for i in banned:
                out[i] = 0.0
        return out if sum(out) > 0.0 else probs


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


class FolderLock:
    """An exclusive OS lock on `<path>.lock` for as long as this process lives or until release()."""

    def __init__(self, path):
        self.path, self.fd = path + ".lock", None

    def acquire(self):
        for _ in range(100):                           # each retry means another process just released
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as e:
                raise MacroError("cannot create lock file %s: %s" % (self.path, e.strerror or e))
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                else:
                    os.lseek(fd, WINDOWS_LOCK_OFFSET, os.SEEK_SET)
                    msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            except (BlockingIOError, PermissionError):
                os.lseek(fd, 0, os.SEEK_SET)
                owner = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise LockedError("another macrogpt (PID %s) is using %s; wait for it to end, or give this "
                                  "one its own --db and --ckpt" % (owner, os.path.abspath(self.path[:-5])))
            with contextlib.suppress(FileNotFoundError):
                if fcntl is None or os.path.samestat(os.fstat(fd), os.stat(self.path)):
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


def _remove_quietly(path):
    with contextlib.suppress(OSError):
        os.remove(path)


def remove_stale_temps(path):
    """Remove `<path>.<pid>.tmp` (and the older `<path>.tmp`) left by killed writers -> how many.
    Call it only while holding the lock on `path`: then no other process is writing one."""
    folder, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(base) + r"(\.\d+)?\.tmp\Z")
    ours = os.path.basename(temp_name(path))
    stale = [name for name in os.listdir(folder) if pattern.match(name) and name != ours]
    for name in stale:
        _remove_quietly(os.path.join(folder, name))
    return len(stale)


# ======================================================================================
# Checkpoints: one versioned file, written atomically, weights as base64 of float64 arrays.
# ======================================================================================
# Layout: a header line "macrogpt-checkpoint <version> <sha256 of body>" then one JSON body.
# The digest makes a torn or edited file fail loudly instead of loading wrong weights.

CKPT_MAGIC = "macrogpt-checkpoint"
CKPT_VERSION = 3                          # 2: Adam counts per row, the model's random state; 3: no frozen rows
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


def temp_name(path, pid=None):
    """Per process, so two writers never share a half-written file; see remove_stale_temps."""
    return "%s.%d.tmp" % (path, os.getpid() if pid is None else pid)


def atomic_write(path, data):
    """Write bytes so that a crash at any instant leaves either the old or the new file."""
    tmp = temp_name(path)
    try:
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        if hasattr(os, "O_DIRECTORY"):                 # make the rename itself durable
            dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except OSError as e:                           # no folder, disk full, another process's rename
        raise CheckpointError("cannot write checkpoint %s: %s" % (path, e.strerror or e))


def checkpoint_bytes(model, opt, step, extra=None):
    """Everything needed to resume: config, step, weights, deltas, Adam state."""
    params, adam = {}, {}
    for name, t in model.named_params():
        params[name] = pack_rows(t.data)
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
            model.add_delta(alpha)
        opt = Adam(saved_cfg)
        order = body["byteorder"]
        for name, t in model.named_params():
            data = unpack_rows(body["params"][name], order)
            if [len(data), len(data[0])] != [len(t.data), len(t.data[0])]:
                raise CheckpointError("checkpoint is damaged: %s has the wrong shape" % name)
            t.data = data
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
    padded = list(old) + [[]] * (len(fresh) - len(old))       # the rows only fresh has
    return [list(o) + [v * scale for v in f[len(o):]] for o, f in zip(padded, fresh)]


def grow_model(model, opt, cfg, seed=0):
    """A model of the larger cfg whose function is close to `model`'s (see GROW_SCALE)."""
    old_cfg = model.cfg
    check_growth(old_cfg, cfg, model.n_deltas)
    grown = GPT(cfg, model.vocab_size, seed + 1)
    for d in model.lm_head.deltas:
        grown.add_delta(d.alpha)
    old_params = dict(model.named_params())
    norm_fix = math.sqrt(old_cfg.n_embd / cfg.n_embd)   # keeps rms-normalized old dims unchanged
    new_opt = Adam(cfg)
    for name, t in grown.named_params():
        old = old_params.get(name)
        if old is None:                                # a whole new layer: near-identity block
            if name.endswith((".wo", ".fc2")):
                t.data = scale_rows(t.data, GROW_SCALE)
            continue
        scale = {".A": 0.0, ".B": 1.0}.get(name[-2:], GROW_SCALE)   # new delta columns stay exact no-ops
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
    grown.rng.setstate(model.rng.getstate())             # later rows continue the old stream
    return grown, new_opt


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

TERM_RE = re.compile(r"[^\W_]+")
RARE_SHARE = 0.02                         # a term in at most this share of the messages is rare
CJK_RE = re.compile("([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]+)")


def is_question(text):
    """A question tells nothing to remember: the index holds statements only."""
    return text.rstrip().endswith(("?", "\uff1f", "\u061f"))


def search_terms(text):
    """The terms a message is found by: case-folded words, and character pairs in scripts
    written without spaces between words (Chinese, Japanese) or with particles glued on (Korean).
    'My cat 小白猫' -> ['my', 'cat', '小白', '白猫']"""
    out = []
    for word in TERM_RE.findall(fold_case(text)):
        for k, part in enumerate(CJK_RE.split(word)):
            if k % 2 == 1:                             # a run of CJK characters
                out.extend([part[i:i + 2] for i in range(len(part) - 1)] or [part])
            elif part:
                out.append(part)
    return out


def _one_line(e):
    """An SQLite message for a one-line error: it quotes names from the file, which damage can break."""
    return str(e).replace("\n", "\\n")


def _guarded(cls):
    """Memory's one error boundary: an SQLite failure in a public method (locked past the busy
    timeout, disk full, a damaged page) becomes one MemoryStoreError; the transaction is rolled back."""
    def guard(method):
        @functools.wraps(method)
        def guarded(self, *args, **kw):
            try:
                return method(self, *args, **kw)
            except sqlite3.Error as e:
                raise MemoryStoreError("database %s: %s" % (self.path, _one_line(e))) from None
        return guarded
    for name, method in list(vars(cls).items()):
        if callable(method) and not name.startswith("_"):
            setattr(cls, name, guard(method))
    return cls


def _damaged(path, why, fix=""):
    return MemoryStoreError("%s is damaged (%s); %smove it aside to start a fresh memory "
                            "(`sqlite3 %s .recover` may save what is left)" % (path, why, fix, path))


@_guarded
class Memory:
    def __init__(self, path):
        self.path = path
        if not os.path.exists(path):
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
            with open(path, "rb") as f:
                if f.read(16) == b"SQLite format 3\x00":
                    raise _damaged(path, _one_line(e))
            raise MemoryStoreError("%s is not a macrogpt database (%s); move it aside or pass --db" % (path, _one_line(e)))
        if version > MEMORY_VERSION:
            raise MemoryStoreError("%s was written by a newer macrogpt (schema %d > %d)" % (path, version, MEMORY_VERSION))
        if version < 0 or version == 0 and tables:        # no macrogpt ever wrote a negative version
            raise MemoryStoreError("%s is an SQLite file but not a macrogpt database; pass another --db" % path)
        if version:
            self._check_intact(path, tables)
        try:
            self.db.execute("PRAGMA journal_mode = WAL")
            if version < MEMORY_VERSION:               # a new file gets the schema, an older one its migrations
                steps = [SCHEMA.split(";")] if version == 0 else [MIGRATIONS[v] for v in range(version, MEMORY_VERSION)]
                with self.transaction():               # all at once: a failure leaves the file as it was
                    for stmt in chain.from_iterable(steps):
                        if stmt.strip():
                            self.db.execute(stmt)
                    self.db.execute("PRAGMA user_version = %d" % MEMORY_VERSION)
            self.index = MessageIndex(self.db, self._text)
        except sqlite3.Error as e:
            raise MemoryStoreError("cannot use database %s: %s" % (path, _one_line(e)))

    def _check_intact(self, path, tables):
        """Refuse a damaged file at open, before anything is written to it (quick_check: ~2 ms at 20,000 lines)."""
        try:
            problems = [r[0] for r in self.db.execute("PRAGMA quick_check")]
            missing = sorted(set(re.findall(r"CREATE TABLE (\w+)", SCHEMA)) - tables)
            state = self.db.execute("SELECT key, value FROM state").fetchall() if not missing else []
            odd_ids = 0 if missing else self.db.execute(
                "SELECT COUNT(*) FROM corpus WHERE typeof(id) != 'integer'").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise _damaged(path, _one_line(e))
        if problems != ["ok"]:
            raise _damaged(path, problems[0].splitlines()[-1])
        if missing:
            raise _damaged(path, "table %s is missing" % missing[0])
        if odd_ids:                                    # an edited schema: id is no longer the row's number
            raise _damaged(path, "%d corpus ids are not integers" % odd_ids)
        for key, value in state:
            try:
                loaded = json.loads(value)
                ok = isinstance(loaded, STATE_KINDS.get(key, object)) and not (   # SQLite takes 64-bit integers only
                    isinstance(loaded, int) and not -2 ** 63 <= loaded < 2 ** 63)
            except (TypeError, ValueError, RecursionError):  # RecursionError: nested deeper than json can parse
                ok = False
            if not ok:
                raise _damaged(path, "state %r holds %.40r" % (key, value), "delete that row of table state, or ")

    def transaction(self):
        return _transaction(self.db)

    def close(self):
        if self.db is not None:
            self.db.close()
            self.db = None

    def _text(self, value):
        """A stored text: a BLOB as written, or TEXT as an edit by hand leaves it; a number is damage."""
        if isinstance(value, str):
            return value
        if not isinstance(value, bytes):
            raise _damaged(self.path, "a text holds %.40r" % (value,))
        return bytes_to_text(value)

    # -- conversation ------------------------------------------------------------------------
    def add_message(self, role, text):
        """Store a message (a user's is indexed for search) -> its id."""
        with self.transaction():
            i = self.db.execute("INSERT INTO messages (time, role, text) VALUES (?, ?, ?)",
                                (time.time(), role, text_to_bytes(text))).lastrowid
            if role == "user" and not is_question(text):
                self.index.add(i, text)
        return i

    def recent_messages(self, n):
        rows = self.db.execute("SELECT role, text FROM messages ORDER BY id DESC LIMIT ?", (n,)).fetchall()
        return [(role, self._text(text)) for role, text in reversed(rows)]

    def search_messages(self, text, k=3, before=None):
        return self.index.search(text, k, before)

    def message_count(self):
        return self.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]

    # -- living corpus -----------------------------------------------------------------------
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

    def corpus_ids(self, lines):
        """The ids of those of these lines the corpus holds."""
        rows = [self.db.execute("SELECT id FROM corpus WHERE line = ?", (text_to_bytes(line),)).fetchone()
                for line in lines]
        return [row[0] for row in rows if row]

    def corpus_rows(self):
        """[(id, line)] of the whole corpus in id order."""
        return [(i, self._text(line)) for i, line in self.db.execute("SELECT id, line FROM corpus ORDER BY id")]

    def corpus_mark(self):
        """The newest corpus id: a burst records it, so a restart knows what is still unlearned."""
        return self.db.execute("SELECT COALESCE(MAX(id), 0) FROM corpus").fetchone()[0]

    def chat_bytes_after(self, mark):
        return self.db.execute("SELECT COALESCE(SUM(LENGTH(line)), 0) FROM corpus WHERE source = 'chat' AND id > ?",
                               (mark,)).fetchone()[0]

    def corpus_stats(self):
        lines, size, chat = self.db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(line)), 0), "
                                            "COUNT(CASE WHEN source = 'chat' THEN 1 END) FROM corpus").fetchone()
        return {"lines": lines, "bytes": size, "chat_lines": chat}

    def prune_corpus(self, ids, kind, why):
        """Delete the corpus lines with these ids and log why (an event of this kind), in one transaction."""
        with self.transaction():
            self.db.executemany("DELETE FROM corpus WHERE id = ?", [(i,) for i in ids])
            self.db.execute("INSERT INTO events (time, kind, detail) VALUES (?, ?, ?)", (time.time(), kind, why))

    # -- logs and small state ------------------------------------------------------------------
    def log_event(self, kind, detail):
        with self.transaction():
            self.db.execute("INSERT INTO events (time, kind, detail) VALUES (?, ?, ?)", (time.time(), kind, detail))

    def log_growth(self, **row):
        values = [row.get(k) for k in GROWTH_FIELDS]
        with self.transaction():
            self.db.execute("INSERT INTO growth (time, %s) VALUES (?, %s)" % (", ".join(GROWTH_FIELDS),
                            ", ".join("?" * len(GROWTH_FIELDS))), [time.time()] + values)

    def growth_rows(self):
        cur = self.db.execute("SELECT %s FROM growth ORDER BY id" % ", ".join(GROWTH_FIELDS))
        return [dict(zip(GROWTH_FIELDS, r)) for r in cur]

    def rejected_bursts(self):
        return self.db.execute("SELECT COUNT(*) FROM growth WHERE note LIKE 'rejected%'").fetchone()[0]

    def get_state(self, key, default=None):
        row = self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_state(self, key, value):
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, json.dumps(value)))


class MessageIndex:
    """The user's statements, searchable by their words (see search_terms), in one connection.
    Derived data, rebuilt from the messages table whenever it lags behind: FTS5 (ranked by its
    BM25) where this SQLite has it, else a plain table of (term, message id) ranked by the sum of
    the shared terms' BM25 idf (term frequency taken as 1: messages are short)."""

    def __init__(self, db, text_of):
        """Nothing is written when the index is current (a database another program holds locked
        still opens). text_of: a stored text -> str (Memory._text)."""
        self.db, self.text_of = db, text_of
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master")}
        self.fts = "message_fts" in tables
        if not tables & {"message_fts", "message_terms"}:
            try:
                self.db.execute("CREATE VIRTUAL TABLE message_fts USING fts5(terms)")
                self.fts = True
            except sqlite3.OperationalError:                   # no FTS5 module
                self.db.execute("CREATE TABLE message_terms (term TEXT NOT NULL, id INTEGER NOT NULL)")
                self.db.execute("CREATE INDEX message_terms_term ON message_terms (term, id)")
        last = ("SELECT COALESCE(MAX(rowid), 0) FROM message_fts" if self.fts
                else "SELECT COALESCE(MAX(id), 0) FROM message_terms")
        done = self.db.execute(last).fetchone()[0]
        rows = self.db.execute("SELECT id, text FROM messages WHERE role = 'user' AND id > ? AND typeof(text) IN "
                               "('blob', 'text') ORDER BY id", (done,))    # a number is damage, refused when read
        statements = [(i, text) for i, text in ((i, text_of(raw)) for i, raw in rows) if not is_question(text)]
        if statements:                                 # messages a version without the index stored
            with _transaction(self.db):
                for i, text in statements:
                    self.add(i, text)

    def add(self, i, text):
        terms = search_terms(text)
        if self.fts:
            self.db.execute("INSERT INTO message_fts (rowid, terms) VALUES (?, ?)", (i, " ".join(terms)))
        else:
            self.db.executemany("INSERT INTO message_terms (term, id) VALUES (?, ?)", [(t, i) for t in set(terms)])

    def _term_counts(self, terms, before):
        """-> (messages indexed before id `before`, {term: how many of them hold it})."""
        if self.fts:
            n = self.db.execute("SELECT COUNT(*) FROM message_fts WHERE rowid < ?", (before,)).fetchone()[0]
            sql = "SELECT COUNT(*) FROM message_fts WHERE message_fts MATCH ? AND rowid < ?"
            return n, {t: self.db.execute(sql, ('"%s"' % t.replace('"', '""'), before)).fetchone()[0] for t in terms}
        n = self.db.execute("SELECT COUNT(DISTINCT id) FROM message_terms WHERE id < ?", (before,)).fetchone()[0]
        sql = "SELECT COUNT(*) FROM message_terms WHERE term = ? AND id < ?"
        return n, {t: self.db.execute(sql, (t, before)).fetchone()[0] for t in terms}

    def search(self, text, k, before):
        """The k user messages stored before id `before` that best share terms with text, best
        first -> [(id, text)]. A message qualifies by sharing a rare term (held by at most
        RARE_SHARE of the messages, or one): sharing "what" and "is" is no reason to recall it;
        and by leaving at most one of its own rare terms unasked: "my dog is called Rex" answers
        "what is my dog called?" with its one new term, "my aunt's name is Ann" tells nothing
        about "what is my wife's name?"."""
        before = before or 1 << 62
        asked = set(search_terms(text))
        n, df = self._term_counts(sorted(asked), before)
        rare = {t for t, c in df.items() if 0 < c <= max(1, RARE_SHARE * n)}
        if not rare:
            return []
        if self.fts:
            query = " OR ".join('"%s"' % t.replace('"', '""') for t in rare)
            ids = [r[0] for r in self.db.execute(
                "SELECT rowid FROM message_fts WHERE message_fts MATCH ? AND rowid < ? ORDER BY rank LIMIT ?",
                (query, before, 4 * k))]
        else:
            score = Counter()
            for t in sorted(rare):
                idf = math.log(1.0 + (n - df[t] + 0.5) / (df[t] + 0.5))        # BM25's idf, tf taken as 1
                for (i,) in self.db.execute("SELECT id FROM message_terms WHERE term = ? AND id < ?", (t, before)):
                    score[i] += idf
            ids = [i for i, _ in sorted(score.items(), key=lambda kv: (-kv[1], -kv[0]))[:4 * k]]
        rows = dict(self.db.execute("SELECT id, text FROM messages WHERE id IN (%s)" % ",".join("?" * len(ids)), ids))
        found = []
        for i in ids:
            line = self.text_of(rows[i])
            unasked = {t for t in search_terms(line) if not any(same_word(t, a) for a in asked)}
            counts = self._term_counts(sorted(unasked), before)[1]
            if sum(1 for t in unasked if counts[t] <= max(1, RARE_SHARE * n)) <= 1:
                found.append((i, line))
        return found[:k]


def same_word(a, b):
    """Equal, or one a prefix of the other and both of four letters or more: live, lives."""
    return a == b or (min(len(a), len(b)) >= 4 and (a.startswith(b) or b.startswith(a)))


@contextlib.contextmanager
def _transaction(db):
    """BEGIN ... COMMIT, or ROLLBACK if the block raises (the connection is in autocommit mode)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    finally:
        if db.in_transaction:                          # the block raised, or COMMIT failed (disk full)
            db.execute("ROLLBACK")


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


def exchanges(lines):
    """Lines in units: an 'H: ' line with the 'A: ' line after it, any other line alone."""
    units, i = [], 0
    while i < len(lines):
        n = 2 if lines[i].startswith("H: ") and i + 1 < len(lines) and lines[i + 1].startswith("A: ") else 1
        units.append(lines[i:i + n])
        i += n
    return units


def split_heldout(lines, every):
    """-> (training lines, held-out lines), each in file order. One exchange in `every` is held
    out, chosen by a hash of its question, so a held-out answer is scored after its own question."""
    train, held = [], []
    for unit in exchanges(lines):
        digest = hashlib.sha256(text_to_bytes(unit[0])).digest()
        (held if int.from_bytes(digest[:8], "big") % every == 0 else train).extend(unit)
    return train, held


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
        d = _renamed_lambda(d)
        d.setdefault("lam", 0.0)
        d.setdefault("nll", d["model_bpb"] * math.log(2) * d["bytes"])
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def _renamed_lambda(d):
    """A copy of a saved dict with "lambda" (checkpoints before the Corpus) renamed "lam"."""
    d = dict(d)
    if "lambda" in d:
        d["lam"] = d.pop("lambda")
    return d


@dataclass
class Pending:
    """Conversation material not yet learned by a burst."""
    bytes: int = 0
    grams: int = 0                        # its token n-grams ...
    novel: float = 0.0                    # ... and how many the field had not seen

    def enough(self, cfg):
        novelty = self.novel / max(1, self.grams)
        return self.bytes > 0 and (self.bytes >= cfg.qb_min_bytes or novelty >= cfg.qb_min_novelty)


class Corpus:
    def __init__(self, cfg, memory, tok, heldout_lines, seed=0):
        self.cfg, self.memory, self.tok = cfg, memory, tok
        self.heldout_lines = list(heldout_lines)
        self.rng = random.Random(seed)    # pruning's sample
        self.version = 0                  # bumped on every change; the caches' key
        self.recall, self.lexicon = Recall(), Lexicon()
        self._stream = self._field_probs = None
        held = memory.corpus_ids(self.heldout_lines)    # a changed rule now holds them out
        if held:                                        # else nothing is written (and no lock waited for)
            memory.prune_corpus(held, "heldout", "removed %d held-out lines from the training side" % len(held))
        self.texts = dict(memory.corpus_rows())         # corpus id -> line, ascending ids
        self.n_bytes = sum(len(text_to_bytes(line)) for line in self.texts.values())
        for i, line in self.texts.items():
            self.recall.add(i, line)
            self.lexicon.add(line)
        self.burst_mark = memory.get_state("burst_mark", 0)      # the last corpus id a burst has learned
        self.pending = Pending(bytes=memory.chat_bytes_after(self.burst_mark))
        self.reencode()

    def reencode(self):
        """Encode every line and the held-out slice with the current tokenizer; rebuild the field."""
        tok = self.tok
        self.ids = {i: tok.encode(line) for i, line in self.texts.items()}      # corpus id -> its token ids
        self.field = NGramField(self.cfg.field_order, tok.vocab_size, self.cfg.field_discount)
        self.field.rebuild(self.ids.values())
        self.teacher = {}                 # corpus id -> the field's rows for the line (see teach)
        # each held-out exchange is a window of its own (the answer read after its question, as
        # the voice reads it); every n-th, so a slice larger than the cap spans the whole file
        units = [[EOS] + [t for line in unit for t in tok.encode(line) + [EOS]] for unit in exchanges(self.heldout_lines)]
        every = max(1, -(-sum(len(u) - 1 for u in units) // HELDOUT_MAX_TOKENS))
        self.heldout_units, n = [], 0
        for unit in units[::every]:
            if n + len(unit) - 1 > HELDOUT_MAX_TOKENS:
                continue                               # a smaller one further on may fit
            self.heldout_units.append(unit)
            n += len(unit) - 1
        self.heldout_windows = [w for u in self.heldout_units for w in heldout_windows(u, self.cfg.block_size)]
        # bytes of text scored; each line end (EOS) counts as one byte, like a newline
        self.heldout_bytes = sum(len(tok.token_bytes(t)) or 1 for u in self.heldout_units for t in u[1:])
        self.version += 1

    # -- lines in and out ---------------------------------------------------------------------
    def add(self, lines, source):
        """Store new lines (a held-out line never), learn them everywhere, prune -> lines added."""
        held = set(self.heldout_lines)
        added = self.memory.add_corpus_lines([l for l in lines if l and l not in held], source)
        for i, line in added:
            ids, size = self.tok.encode(line), len(text_to_bytes(line))
            if source == "chat":
                self.pending.novel += self.field.novelty(ids) * (len(ids) + 1)
                self.pending.grams += len(ids) + 1
                self.pending.bytes += size
            self.texts[i], self.ids[i] = line, ids
            self.n_bytes += size
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
        self.memory.prune_corpus(drop, "prune", "removed %d of %d corpus lines" % (len(drop), n))
        for i in drop:
            self.n_bytes -= len(text_to_bytes(self.texts.pop(i)))
            self.field.remove(self.ids.pop(i))
            self.recall.remove(i)
            self.teacher.pop(i, None)

    def take_pending(self):
        """Hand the material waiting for a burst to one -> (where in the stream it begins, the
        mark to pass to mark_learned once the burst is over)."""
        self.pending = Pending()
        offset = 1 + sum(len(ids) + 1 for i, ids in self.ids.items() if i <= self.burst_mark)
        return offset, self.memory.corpus_mark()

    def mark_learned(self, mark):
        """The lines up to corpus id `mark` have had their burst (kept or rolled back)."""
        self.memory.set_state("burst_mark", mark)
        self.burst_mark = mark

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
        ids, top, weights = self.ids[i], array.array("i"), array.array("f")
        self.field.remove(ids)
        try:
            for j in range(len(ids) + 1):                      # the k likeliest ids, renormalized
                probs = self.field.probs(ids[:j])
                best = heapq.nlargest(TEACHER_TOP_K, range(len(probs)), key=probs.__getitem__)
                z = sum(probs[t] for t in best)
                top.extend(best)
                weights.extend(probs[t] / z for t in best)
        finally:
            self.field.add(ids)
        if len(self.teacher) >= TEACHER_CACHE_LINES:
            del self.teacher[next(iter(self.teacher))]          # the oldest rows go first
        self.teacher[i] = (top, weights)

    async def teach(self, stream, batches, length):
        """The field's rows for windows of `length` + 1 tokens at the start offsets in batches ->
        per batch, per window (ids, weights), TEACHER_TOP_K of each per predicted token; None if
        `stream` is no longer the corpus's stream. A line pruned meanwhile teaches the truth."""
        _, current, starts, keys = self._layout()
        if current is not stream:
            return None
        spans = [[self._spans(starts, keys, len(stream), s, length) for s in batch] for batch in batches]
        t0 = time.perf_counter()
        for i in {span[0] for batch in spans for window in batch for span in window}:
            if i not in self.teacher and i in self.ids:
                self._teach_line(i)
                if time.perf_counter() - t0 > TEACHER_SLICE_SECONDS:
                    await asyncio.sleep(0)
                    t0 = time.perf_counter()
        return [[self._rows(window, stream) for window in batch] for batch in spans]

    @staticmethod
    def _spans(starts, keys, end, start, length):
        """The lines a window predicts: [(corpus id, stream position, first row, last row + 1)] in stream order."""
        out, j, stop = [], start + 1, min(end, start + length + 1)
        n = bisect.bisect_right(starts, j) - 1
        while j < stop:
            line_end = starts[n + 1] if n + 1 < len(starts) else end
            r1 = min(stop, line_end)
            out.append((keys[n], j, j - starts[n], r1 - starts[n]))
            j, n = r1, n + 1
        return out

    def _rows(self, window, stream):
        k, ids, ws = TEACHER_TOP_K, array.array("i"), array.array("f")
        for i, j, r0, r1 in window:
            rows = self.teacher.get(i)
            if rows is None:                                   # pruned meanwhile: the truth, weight 1
                for t in stream[j:j + r1 - r0]:
                    ids.extend([t] * k)
                    ws.extend([1.0] + [0.0] * (k - 1))
            else:
                ids.extend(rows[0][r0 * k:r1 * k])
                ws.extend(rows[1][r0 * k:r1 * k])
        return ids, ws

    def field_probs(self):
        """Field probability of every held-out token, context = the tokens earlier in its line."""
        if self._field_probs is None or self._field_probs[0] != self.version:
            out = []
            for u in self.heldout_units:
                line = []
                for cur, nxt in zip(u, u[1:]):
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


# ======================================================================================
# Brain: the network, its optimizer and tokenizer, and the progress that travels with them.
# ======================================================================================
# The Brain is the one owner of these five: only its methods replace the model, optimizer
# and step (one step = one optimizer update) or grow the tokenizer; only the Trainer writes
# Progress. The trainer holds the accepted brain, which the voice uses and the checkpoint
# stores; the workers hold copies, whose weights it takes back when a job's result is accepted.

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

    @classmethod
    def from_dict(cls, d):
        d = _renamed_lambda(d)
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


def bpe_merges_due(cfg, n_bytes, done_chars):
    """Merges the tokenizer should learn now from `n_bytes` of training text, when it last
    trained at `done_chars` bytes (0: never) -> a count, 0 when none is due."""
    if cfg.bpe_num_merges == 0:
        return 0
    if done_chars == 0:
        return cfg.bpe_num_merges if n_bytes >= cfg.enable_bpe_after_chars else 0
    return cfg.bpe_retrain_merges if n_bytes - done_chars >= cfg.bpe_retrain_every_chars else 0


class Brain:
    def __init__(self, model, opt, step, tok, progress):
        self.model, self.opt, self.tok, self.progress = model, opt, tok, progress
        self.step = step                          # optimizer steps taken (drives the LR schedule)

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
    def load_or_fresh(cls, path, cfg, seed=0):
        if path and os.path.exists(path):
            return cls.from_body(read_checkpoint(path), cfg, seed)
        return cls.fresh(cfg, seed)

    def to_bytes(self):
        extra = {"tokenizer": self.tok.to_dict(), "progress": asdict(self.progress)}
        return checkpoint_bytes(self.model, self.opt, self.step, extra)

    def save(self, path):
        atomic_write(path, self.to_bytes())

    def grow_tokenizer(self, lines, merges):
        """Learn up to `merges` merges from lines and give the model rows for them -> merges added."""
        added = self.tok.train(lines, merges)
        self.model.grow_vocab(self.tok.vocab_size)
        return added

    def update(self, lr):
        """One optimizer step with the gradients the model holds."""
        with _NoCycleCollection():
            self.opt.update(self.model.named_params(), lr)
        self.model.touch()
        self.step += 1

    def take_weights(self, other):
        """Adopt another copy's model, optimizer and step; tokenizer and progress stay ours."""
        assert other.tok.vocab_size == self.tok.vocab_size
        self.model, self.opt, self.step = other.model, other.opt, other.step


# ======================================================================================
# Pool: data-parallel training on every core, each worker holding a replica of the brain.
# ======================================================================================
# The brain is sent to the workers once, and again only after something outside changed it
# (BPE growth, a new delta, a rollback). Each step every worker writes the gradient of its
# shard of the batch, weighted by the shard's share of the tokens, into its own slot of a
# shared array; then each sums all slots in the same order and applies the same Adam update,
# so the replicas stay bit-identical and no weights cross a process boundary. With no worker
# processes the same Replica runs in the chat process (tests, or where spawning fails).
#
# A message to a worker names one of the WORKER_OPS functions. A worker that dies or hangs
# costs the step in flight: the pool notices (its pipe closes, or it misses a generous
# deadline), reloads the workers from a survivor (or from the trainer's brain) and goes on.
# Jobs run in a thread beside the event loop, so the prompt never waits; workers run at a
# lower priority than the chat process and leave when their parent is gone.

WORKER_NICE = 10                          # workers yield the CPU to the chat process
WORKER_TIMEOUT = 600.0                    # seconds without an answer before a worker counts as hung
LOAD_TIMEOUT = 120.0                      # ... at least, for a load (a new process imports, then parses)


def sample_starts(n_stream, n, length, rng, recent_from=None):
    """Start offsets of n windows of `length` + 1 tokens in a stream of n_stream tokens; if
    recent_from is set, half of them start there or later."""
    last = n_stream - min(length, n_stream - 1) - 1         # the last start with room for a window
    recent = 0 if recent_from is None else max(0, min(recent_from, last))
    return [rng.randint(recent if i % 2 == 0 else 0, last) for i in range(n)]


class Replica:
    """One copy of the brain and the two halves of a data-parallel step that run beside it."""

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
        self.brain.update(lr)

    def grad_size(self, train_base):
        return sum(len(p.data) * len(p.data[0]) for p in self.trainable(train_base))

    def score(self, windows):
        """-> one list of true-token probabilities per window."""
        return [target_probs(self.brain.model, [w]) for w in windows]


def _sum_slots(view, n, capacity, size):
    """Slot 0 + slot 1 + ... in that order, so every worker gets the very same floats."""
    total = view[0:size].tolist()
    for k in range(1, n):
        total = list(map(operator.add, total, view[k * capacity:k * capacity + size].tolist()))
    return total


@dataclass
class WorkerSlot:
    """What a worker process holds: its replica and its slot of the shared gradient array."""
    view: memoryview
    slot: int
    capacity: int
    seed: int
    replica: Replica = None


def op_load(w, raw):
    w.replica = Replica(raw, w.seed + 7919 * w.slot)


def op_grad(w, shard, weight, train_base, teach, beta):
    loss, tokens, flat = w.replica.grad(shard, weight, train_base, teach, beta)
    if len(flat) > w.capacity:
        raise MacroError("gradient of %d floats exceeds the shared slot of %d" % (len(flat), w.capacity))
    w.view[w.slot * w.capacity:w.slot * w.capacity + len(flat)] = flat
    return loss, tokens


def op_apply(w, n, lr, train_base):
    w.replica.apply(_sum_slots(w.view, n, w.capacity, w.replica.grad_size(train_base)), lr, train_base)


def op_add_delta(w):
    w.replica.brain.model.add_delta()


def op_score(w, windows):
    return w.replica.score(windows)


def op_to_bytes(w):
    return w.replica.brain.to_bytes()


def op_stop(w):
    raise AssertionError("handled by the worker loop")


WORKER_OPS = (op_load, op_grad, op_apply, op_add_delta, op_score, op_to_bytes, op_stop)

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
    """A worker process: run the ops the pool sends until told to stop or orphaned."""
    for sig in TERMINAL_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, TERMINAL_SIGNALS)
    if hasattr(os, "nice"):
        os.nice(WORKER_NICE)
    parent = os.getppid()
    w = WorkerSlot(memoryview(shared).cast("B").cast("d"), slot, capacity, seed)
    while os.getppid() == parent:                      # else the parent died (kill -9): leave with it
        if not conn.poll(1.0):
            continue
        try:
            seq, op, *args = conn.recv()
            if op is op_stop:
                return
            try:
                assert op in WORKER_OPS, op
                answer = (seq, "ok", op(w, *args))
            except Exception as e:                     # the worker's boundary: report, stay alive
                answer = (seq, "error", "%s: %s" % (type(e).__name__, e))
            conn.send(answer)
        except (EOFError, OSError):                    # the parent is gone
            return


def worker_count(cfg):
    """Config.train_workers, where 0 means one per core."""
    return cfg.train_workers or os.cpu_count() or 1


class WorkerLost(Exception):
    """A worker died, hung, or failed a step."""


def _gather(conns, procs, seq, waiting, timeout):
    """Wait for the answer to call `seq` of every worker in `waiting` -> {worker: value}.
    An answer left over from a call cut short by a failure has another number and is dropped."""
    replies, deadline = {}, time.monotonic() + timeout
    conn_index = {id(c): i for i, c in enumerate(conns)}
    while len(replies) < len(waiting):
        left = deadline - time.monotonic()
        if left <= 0:
            raise WorkerLost("a worker did not answer for %.0f s" % timeout)
        pending = [i for i in waiting if i not in replies]
        for obj in multiprocessing.connection.wait([conns[i] for i in pending] + [procs[i].sentinel for i in pending],
                                                   min(left, 1.0)):
            i = conn_index.get(id(obj))
            if i is None:                              # a process sentinel: that worker exited
                i = [k for k in pending if procs[k].sentinel == obj][0]
                if conns[i].poll():                    # it answered just before exiting
                    continue
                raise WorkerLost("worker %d exited (code %s)" % (i, procs[i].exitcode))
            try:
                got, status, value = conns[i].recv()
            except (EOFError, OSError):
                raise WorkerLost("worker %d died (code %s)" % (i, procs[i].exitcode))
            if got != seq:
                continue
            if status != "ok":
                raise WorkerLost("worker %d failed: %s" % (i, value))
            replies[i] = value
    return replies


class Pool:
    """n worker processes that train one brain together; n = 0 runs a Replica in this process."""

    def __init__(self, n, seed=0):
        self.n, self.seed = n, seed
        self.procs, self.conns = [], []
        self.shared, self.capacity = None, 0
        self.local = None                          # the Replica when n = 0
        self.synced = False                        # whether the replicas hold the brain (plus `step`)
        self.step = 0                              # the replicas' optimizer steps: ahead of the brain's in a job
        self.restarts, self.last_failure = 0, None  # for /status
        self.failures = []                         # worker failures of the last job, for the event log
        self.seq = 0                               # numbers the calls
        self.stopping = threading.Event()
        self._thread = None

    # -- processes -------------------------------------------------------------------------
    def _start(self, capacity):
        self.close()
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

    def close(self):
        """Stop every worker; returns within about two seconds whatever they are doing."""
        for conn in self.conns:
            with contextlib.suppress(OSError):         # that worker is gone already
                conn.send((0, op_stop))
        deadline = time.monotonic() + 1.0
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1.0)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []

    def _call(self, messages, timeout=None):
        """Send messages[i] (an op and its arguments) to worker i (None: skip) -> their answers."""
        self.seq += 1
        waiting = [i for i, msg in enumerate(messages) if msg is not None]
        for i in waiting:
            try:
                self.conns[i].send((self.seq,) + messages[i])
            except OSError:
                raise WorkerLost("worker %d is gone" % i)
        replies = _gather(self.conns, self.procs, self.seq, waiting, timeout or WORKER_TIMEOUT)
        return [replies.get(i) for i in range(len(messages))]

    def _each(self, op, *args):
        """The same op on every replica -> the first one's answer."""
        if self.n == 0:
            return op(WorkerSlot(None, 0, 0, self.seed, self.local), *args)
        return self._call([(op,) + args] * self.n)[0]

    # -- what the trainer asks -------------------------------------------------------------
    def load(self, brain):
        raw, n_params = brain.to_bytes(), brain.model.num_params()
        if self.n == 0:
            self.local = Replica(raw, self.seed)
        else:
            if not self.procs or n_params > self.capacity:
                self._start(int(n_params * 1.25) + 1024)   # room for some growth before a restart
            self._call([(op_load, raw)] * self.n, max(WORKER_TIMEOUT, LOAD_TIMEOUT))
        self.synced, self.step = True, brain.step

    def reset(self, brain):
        """The brain changed outside (or a job was rolled back): reload it before the next job."""
        self.synced, self.step = False, brain.step

    def train_step(self, batch, lr, train_base, teach=None, beta=0.0):
        """One data-parallel optimizer step on the batch (windows of equal length), with teacher
        rows per window if teach is given (Replica.grad) -> (mean loss, tokens)."""
        if self.n == 0:
            loss, tokens, flat = self.local.grad(batch, 1.0, train_base, teach, beta)
            self.local.apply(flat, lr, train_base)
        else:
            shards = [batch[k::self.n] for k in range(self.n)]
            tokens = sum(len(s) - 1 for s in batch)
            replies = self._call([(op_grad, s, sum(len(w) - 1 for w in s) / tokens, train_base,
                                   teach and teach[k::self.n], beta) if s else None
                                  for k, s in enumerate(shards)])
            self._call([(op_apply, sum(1 for s in shards if s), lr, train_base)] * self.n)
            loss = sum(r[0] * r[1] for r in replies if r) / tokens
        self.step += 1
        return loss, tokens

    def score(self, windows):
        """The replicas' probability of every true next token of the windows, in order; the
        windows are split among the workers (scoring is slow too)."""
        if self.n == 0:
            return [p for w in self.local.score(windows) for p in w]
        parts = self._call([(op_score, windows[k::self.n]) if windows[k::self.n] else None
                            for k in range(self.n)])
        per_window = [None] * len(windows)
        for k, part in enumerate(parts):
            if part:
                per_window[k::self.n] = part
        return [p for w in per_window for p in w]

    def pull(self):
        """The replicas' state as checkpoint bytes."""
        return self._each(op_to_bytes)

    def add_delta(self):
        self._each(op_add_delta)

    def recover(self, fallback, reason):
        """After WorkerLost: reload every worker from a survivor's weights, else from the brain
        `fallback`; the pool's step becomes that of the state reloaded."""
        self.restarts, self.last_failure = self.restarts + 1, reason
        self.failures.append(reason)
        raw = None
        for i, p in enumerate(self.procs):
            if p.is_alive():
                with contextlib.suppress(WorkerLost):
                    raw = self._call([(op_to_bytes,) if k == i else None for k in range(self.n)])[i]
                    break
        self.close()
        self.load(Brain.from_bytes(raw) if raw else fallback)

    def take_failures(self):
        failures, self.failures = self.failures, []
        return failures

    def note(self):
        return "workers: %d, restarted %d times (last: %s)" % (self.n, self.restarts, self.last_failure)

    # -- beside the event loop -------------------------------------------------------------
    async def beside(self, fn, *args):
        """fn(*args) in a thread (inline when the workers are this process) -> its result."""
        if self.n == 0:
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
            with contextlib.suppress(RuntimeError):    # the loop closed meanwhile (quitting): nobody waits
                loop.call_soon_threadsafe(settle, *outcome)
        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()
        return await fut

    def stop(self):
        """Stop after the step in flight -> whether the job thread has finished (waits up to 2 s)."""
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(2.0)
        return self._thread is None or not self._thread.is_alive()


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
# "Rolled back" means never adopted; IdlePatience decides when the workers go back to the best.

WARMUP_JOB_SECONDS = 20.0                 # a warmup job trains this long before the trainer looks up
IDLE_PATIENCE = 3                         # idle phases rolled back in a row before the trainer rests
IDLE_BACKOFF_MAX = 3600.0                 # longest pause between idle phases after rollbacks


def growth_row(brain, step, note):
    """A row of the growth log: sizes, training speed and the held-out figures of the brain."""
    p, h = brain.progress, brain.progress.heldout
    return dict(step=step, vocab=brain.model.vocab_size, params=brain.model.num_params(),
                deltas=brain.model.n_deltas, loss=p.loss, tokens_per_s=p.tokens_per_s, note=note,
                heldout_bpb=h and h.mix_bpb, network_bpb=h and h.model_bpb, field_bpb=h and h.field_bpb)


def steps_in(cfg, tokens_per_s, seconds):
    """Steps the last job's speed fits in `seconds`, with room to spare (the job stops at
    `seconds` anyway), so a timed job does not prepare teacher rows it never uses."""
    if not tokens_per_s:
        return 4
    return max(1, int(1.5 * seconds * tokens_per_s / (cfg.batch_size * cfg.seq_len)) + 1)


def run_job(pool, brain, cfg, stream, batches, teach, train_base, seconds=None, cycle=False):
    """In the job thread: a step per batch of start offsets into the stream, until `seconds` if
    given -> (losses, tokens, seconds). With cycle the learning rate follows idle_lr_at across
    the steps. A lost worker is replaced from a survivor; a third loss in a job gives up."""
    t0, losses, tokens = time.perf_counter(), [], 0
    length = min(cfg.seq_len, len(stream) - 1)
    if not pool.synced:
        pool.load(brain)
    while len(losses) < len(batches) and not pool.stopping.is_set():
        batch = [stream[s:s + length + 1] for s in batches[len(losses)]]
        lr = idle_lr_at(pool.step, len(losses), len(batches), cfg) if cycle else lr_at(pool.step, cfg)
        try:
            loss, k = pool.train_step(batch, lr, train_base, teach[len(losses)] if teach else None, cfg.distill_beta)
        except WorkerLost as e:
            if len(pool.failures) >= 2:
                raise
            pool.recover(brain, str(e))
            continue
        losses.append(loss)
        tokens += k
        if seconds is not None and time.perf_counter() - t0 >= seconds:
            break
    return losses, tokens, time.perf_counter() - t0


def pool_ask(pool, brain, method, *args):
    """In the job thread: a pool method after loading the brain if needed, once more after a loss."""
    for tries in (1, 2):
        try:
            if not pool.synced:
                pool.load(brain)
            return method(*args)
        except WorkerLost as e:
            if tries == 2:
                raise
            pool.recover(brain, str(e))


class IdlePatience:
    """Rehearsal has no new material to excuse a loss, yet a phase not kept may be noise: the
    workers train on from it, and only the IDLE_PATIENCE-th in a row sends them back to the best.
    Then the trainer rests, longer after each plateau, and tries as patiently again: the best is
    the luckiest of many noisy phases, so one phase from it rarely beats it (measured: 35 minutes
    of rest in an hour)."""

    def __init__(self, now):
        self.rejects = 0                      # idle phases rolled back in a row
        self.plateaus = 0                     # times rejects reached IDLE_PATIENCE, in a row
        self.after = now                      # no idle phase before this time

    def train_on(self):
        """Whether the workers go on from a phase if it is not kept."""
        return self.rejects + 1 < IDLE_PATIENCE

    def interrupt(self):
        """A burst ends the run of idle phases -> whether the workers went on from one not kept."""
        went_on, self.rejects = self.rejects > 0, 0
        return went_on

    def judged(self, kept, now):
        if kept:
            self.rejects = self.plateaus = 0
        elif self.train_on():
            self.rejects += 1
        else:
            self.rejects, self.plateaus = 0, self.plateaus + 1
            self.after = now + min(IDLE_BACKOFF_MAX, 120.0 * 2 ** min(self.plateaus - 1, 5))


class Trainer:
    def __init__(self, cfg, corpus, memory, brain, pool, ckpt_path=None, now=time.time, seed=0):
        self.cfg, self.corpus, self.memory, self.brain, self.pool = cfg, corpus, memory, brain, pool
        self.ckpt_path, self.now, self.seed = ckpt_path, now, seed
        self.rng = random.Random(seed + brain.step)      # windows and delta growth
        self.status, self.last_burst = "idle", now()
        self.last_save, self.patience = now(), IdlePatience(now())
        pool.reset(brain)

    def shutdown(self):
        """Stop the job in flight; keep the warmup steps taken since the last adopt if possible
        (after warmup they belong to a burst or idle phase not yet judged: they are dropped)."""
        if (self.pool.stop() and self.pool.synced and self.pool.step > self.brain.step
                and not self.brain.progress.warmup_done):
            with contextlib.suppress(WorkerLost):          # no worker left to ask: those steps are lost
                self.brain.take_weights(Brain.from_bytes(self.pool.pull(), self.cfg, self.seed))
        self.log_failures()

    async def job(self, steps, train_base, recent_from=None, seconds=None, cycle=False):
        """Train up to `steps` steps (or about `seconds`) on the living corpus."""
        cfg, stream, p = self.cfg, self.corpus.stream(), self.brain.progress
        if seconds is not None:
            steps = min(steps, steps_in(cfg, p.tokens_per_s, seconds))
        batches = [sample_starts(len(stream), cfg.batch_size, cfg.seq_len, self.rng, recent_from) for _ in range(steps)]
        teach = await self.corpus.teach(stream, batches, cfg.seq_len) if cfg.distill_beta else None
        try:
            losses, tokens, spent = await self.pool.beside(run_job, self.pool, self.brain, cfg, stream, batches,
                                                           teach, train_base, seconds, cycle)
        finally:
            self.log_failures()
        p.loss = sum(losses) / max(1, len(losses))
        p.tokens_per_s = tokens / max(1e-9, spent)

    def log_failures(self):
        for failure in self.pool.take_failures():
            self.memory.log_event("worker", "%s; workers restarted, training goes on" % failure)

    async def ask(self, method, *args):
        return await self.pool.beside(pool_ask, self.pool, self.brain, method, *args)

    async def _evidence(self):
        return self.corpus.evidence(await self.ask(self.pool.score, self.corpus.heldout_windows))

    async def adopt(self):
        """The workers' state becomes the accepted brain (about 0.1 s)."""
        self.brain.take_weights(Brain.from_bytes(await self.ask(self.pool.pull), self.cfg, self.seed))

    def accept(self, h, best=None):
        """Held-out figures h become the reference of the voice (lambda) and of the forget guard."""
        p = self.brain.progress
        p.heldout, p.lam, p.best_nll = h, h.lam, h.nll if best is None else min(best, h.nll)

    async def measure(self, note):
        self.accept(await self._evidence())
        self.log_growth(note)

    async def judge(self, label, tolerance, train_on=False):
        """Keep the workers' new state if held-out loss is at most `tolerance` above the best -> kept.
        A state not kept is never adopted; with train_on the workers go on from it."""
        h, best = await self._evidence(), self.brain.progress.best_nll
        change = (h.nll - best) / max(best, 1e-12) if best else 0.0
        kept = change <= tolerance
        if kept:
            await self.adopt()
            self.accept(h, best)
        elif not train_on:
            self.pool.reset(self.brain)                # the workers go back to the accepted brain
        self.log_growth("%s%s: held-out loss %+.1f%% vs the best" % ("" if kept else "rejected ", label, 100 * change))
        self.save()
        return kept

    def grow_tokenizer(self):
        """Retrain BPE if the corpus grew enough -> whether ids were added."""
        corpus, p = self.corpus, self.brain.progress
        merges = bpe_merges_due(self.cfg, corpus.n_bytes, p.bpe_chars)
        if not merges:
            return False
        added = self.brain.grow_tokenizer(corpus.training_lines(), merges)
        p.bpe_chars = corpus.n_bytes
        if added:
            corpus.reencode()
            self.memory.log_event("bpe", "added %d merges; vocab %d" % (len(added), self.brain.tok.vocab_size))
            self.pool.reset(self.brain)
        return bool(added)

    async def warmup(self):
        cfg, self.status = self.cfg, "warmup"
        await self.job(cfg.warmup_steps - self.pool.step, True, seconds=min(WARMUP_JOB_SECONDS, cfg.checkpoint_every_seconds))
        done = self.pool.step >= cfg.warmup_steps
        if not done and self.now() - self.last_save < cfg.checkpoint_every_seconds:
            return
        await self.adopt()
        if done:
            await self.measure("warmup done")
            self.brain.progress.warmup_done = True
            if cfg.freeze_base_after_warmup:
                self.brain.model.add_delta()           # bursts need something to train
                self.pool.reset(self.brain)
        else:
            self.log_growth("warmup")
        self.save()

    def burst_due(self):
        return (self.brain.progress.warmup_done and self.corpus.pending.enough(self.cfg)
                and self.now() - self.last_burst >= self.cfg.qb_cooldown_seconds)

    async def burst(self):
        """Train the deltas on the new material; keep it only if the held-out slice allows."""
        cfg, self.status = self.cfg, "burst"
        recent, mark = self.corpus.take_pending()
        self.last_burst = self.now()
        if self.patience.interrupt():                  # the workers may hold an idle state not kept
            self.pool.reset(self.brain)
        grow = self.rng.random() < cfg.delta_grow_prob and self.brain.model.n_deltas < cfg.max_delta_modules
        if grow:
            await self.ask(self.pool.add_delta)
        await self.job(cfg.micro_steps, not cfg.freeze_base_after_warmup, recent_from=recent)
        self.brain.progress.bursts += 1
        await self.judge("burst +delta" if grow else "burst", cfg.forget_tolerance)
        self.corpus.mark_learned(mark)                 # kept or rolled back, this material is done

    async def idle(self):
        """Train the whole network on the whole living corpus; after rollbacks in a row, rest a while."""
        self.status = "idle learning"
        await self.job(self.cfg.idle_steps, True, cycle=True)
        self.brain.progress.idle_phases += 1
        kept = await self.judge("idle", 0.0, train_on=self.patience.train_on())
        self.patience.judged(kept, self.now())

    async def tick(self):
        """One unit of work -> True if something was done."""
        p = self.brain.progress
        if bpe_merges_due(self.cfg, self.corpus.n_bytes, p.bpe_chars):
            if self.pool.step != self.brain.step and not p.warmup_done:
                await self.adopt()                     # keep the warmup steps the workers took
            if self.grow_tokenizer():
                if p.warmup_done:                      # the held-out bar must be measured again
                    await self.measure("vocabulary grew to %d" % self.brain.tok.vocab_size)
                return True
        if not p.warmup_done:
            await self.warmup()
        elif p.best_nll is None:                       # imported, or from an older checkpoint
            await self.measure("measured")
        elif self.burst_due():
            await self.burst()
        elif self.cfg.idle_training and self.now() >= self.patience.after:
            await self.idle()
        else:
            self.status = "waiting for new material"
            return False
        return True

    def log_growth(self, note):
        self.memory.log_growth(**growth_row(self.brain, self.pool.step, note))

    def save(self):
        if self.ckpt_path:
            self.brain.save(self.ckpt_path)
        self.last_save = self.now()


DATABASE_RETRY_SECONDS = 30.0             # a trainer that met a database fault tries again after this


async def train_forever(trainer, log):
    """The trainer's background task and top-level boundary: it never raises but cancellation.
    A database fault (locked by another program, disk full) pauses training and it tries again;
    any other error is logged and stops training, and the chat goes on without it."""
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
REMEMBERED_MESSAGES = 3                    # stored user messages retrieved for each reply
LOCAL_FIELD_WEIGHT = 0.5                   # share of the recalled answers in the field's voice
POINTER_WEIGHTS = (0.0, 0.8, 0.6, 0.8, 0.9)  # the pointer's share after a match of n tokens (n >= 4: last)
POINTER_START = 0.5                        # its share for the reply's first token


def pointer_probs(memory_lines, news, tail, at_start, vocab_size):
    """The pointer: a next-token distribution copied from the remembered lines -> (probabilities,
    the pointer's share of the voice), or (None, 0.0) when it has nothing to say.

    memory_lines: [(weight, token ids)], the best remembered line weighing most; news: the ids
    of the lines that say what the message being answered does not (news_ids). The reply may
    start with news, and a token of news is continued as it continues in its line. Any other
    token is continued only when the reply's last n >= 2 tokens occur in a line; the longest
    match wins, its followers counted by their lines' weights.
    [(1, [7, 8, 9, 5])], news {9, 5}, tail [.., 7, 8] -> {9: 1.0}, share POINTER_WEIGHTS[2]
    """
    for n in range(min(len(POINTER_WEIGHTS) - 1, len(tail)), 0, -1):
        key, followers = tail[-n:], Counter()
        if n == 1 and key[0] not in news:
            break
        for weight, ids in memory_lines:
            for j in range(n, len(ids)):
                if ids[j - n:j] == key:
                    followers[ids[j]] += weight
        if followers:
            return _normalized_counts(followers, vocab_size), POINTER_WEIGHTS[n]
    if at_start and news:
        starts = Counter()
        for weight, ids in memory_lines:
            for j, t in enumerate(ids):
                if t in news and ids[j - 1] not in news:
                    starts[t] += weight
        return _normalized_counts(starts, vocab_size), POINTER_START
    return None, 0.0


def news_ids(tok, memory_lines, message):
    """The ids of remembered lines whose text (spaces aside, case folded) the message lacks."""
    said = text_to_bytes(fold_case(message))
    return {t for _, ids in memory_lines for t in ids
            if t != EOS and text_to_bytes(fold_case(tok.decode([t]))).strip() not in said}


def _normalized_counts(counts, vocab_size):
    probs, total = [0.0] * vocab_size, sum(counts.values())
    for t, c in counts.items():
        probs[t] = c / total
    return probs


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

    def prompt_ids(self, tok, history, user_text, remembered=()):
        """What the network reads: the remembered messages, then the conversation as the corpus
        stream (lines ending in EOS), then 'A:' to continue. The remembered lines and the
        message always fit; the history fills what room is left, newest first."""
        room = max(8, self.cfg.block_size - self.cfg.max_gen_tokens // 2)
        head = [EOS] + [t for text in remembered for t in tok.encode(format_turn("user", text)) + [EOS]]
        tail = tok.encode(format_turn("user", user_text)) + [EOS] + tok.encode("A:")
        lines = []
        for role, text in reversed(history):
            line = tok.encode(format_turn(role, text)) + [EOS]
            if len(head) + len(tail) + len(line) + sum(map(len, lines)) > room:
                break
            lines.insert(0, line)
        return (head + [t for line in lines for t in line] + tail)[-room:]

    def reply(self, brain, corpus, history, user_text, remembered=(), attempts=4):
        """A non-empty reply that does not repeat one of the recent ones (when avoidable).

        The corpus gives the field, the answers Recall finds for the message (a small local
        field), and the Lexicon; the brain gives the network and lambda; `remembered` are the
        stored messages retrieved for this one, read by the network and the pointer.
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
            text = self.generate(brain, field, brain.progress.lam, history, user_text, local, corpus.lexicon,
                                 remembered) or text
            if text and text not in said:
                return text
        return text or FALLBACK_REPLY

    def generate(self, brain, field, lam, history, user_text, local=None, lexicon=None, remembered=()):
        cfg, tok, model = self.cfg, brain.tok, brain.model
        prompt = self.prompt_ids(tok, history, user_text, remembered)
        memory_lines = [(1.0, [EOS] + tok.encode(format_turn("user", text)) + [EOS]) for text in remembered[:1]]
        news = news_ids(tok, memory_lines, user_text)
        memory_lines = [(w, ids) for w, ids in memory_lines if news.intersection(ids)]   # nothing to add: no use
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
            copy, share = pointer_probs(memory_lines, news, line, not out, len(p))
            if copy is not None:
                p = mix(copy, p, share)
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
    left, right = str(first), str(last)
    gap = width - len(left) - len(right)
    if gap < 1:
        return right[-width:]
    mid = "step" if gap >= len("step") + 2 else ""
    pad = (gap - len(mid)) // 2
    return left + " " * pad + mid + " " * (gap - len(mid) - pad) + right


def _packed(items, width, sep="  "):
    """Items joined by sep into lines <= width, an item split only where it is longer than a line."""
    lines = []
    for item in items:
        if lines and len(lines[-1]) + len(sep) + len(item) <= width:
            lines[-1] += sep + item
        else:
            lines.extend(textwrap.wrap(item, max(1, width), break_long_words=True) or [""])
    return lines


def render_growth(rows, width=80, height=12, ascii=False):
    """Held-out bits per byte of network, field and mix against training step -> text lines <= width.
    rows are Memory.growth_rows() dicts; missing, None or NaN figures are skipped, and rows of a
    burst, or of a burst or idle phase that was rolled back, put a mark on the step axis."""
    g = {k: v[1 if ascii else 0] for k, v in GROWTH_GLYPHS.items()}
    bar, tick, corner, rule = g["axis"]
    rows = [r for r in rows if _finite(r.get("step"))]
    if not rows:
        return "\n".join(_packed(["the growth log is empty: it fills in as the network trains"], width))
    values = [v for r in rows for v in (r.get(key) for _, key in GROWTH_SERIES) if _finite(v)]
    if not values:
        return "\n".join(_packed(["no held-out figures yet (the log reaches step %d): they are first measured "
                                  "when warmup ends" % max(r["step"] for r in rows)], width))
    # warmup checkpoints carry no figure: the step axis starts where there is something to draw
    rows = [r for r in rows if _burst_mark(r.get("note")) or any(_finite(r.get(k)) for _, k in GROWTH_SERIES)]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    labels = ["%.2f" % hi, "%.2f" % ((hi + lo) / 2), "%.2f" % lo]
    lw = max(len(s) for s in labels)
    plot_w, height = width - lw - 2, max(3, height)
    if plot_w < 2:
        return "\n".join(_packed(["too narrow for the growth chart"], width))
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
    out = _packed(["held-out bits per byte by training step (lower is better)"], width)
    for i, cells in enumerate(grid):
        out.append("%*s %s%s" % (lw, label_at.get(i, ""), tick if i in label_at else bar, "".join(cells)))
    out += [" " * (lw + 1) + corner + "".join(axis), " " * (lw + 2) + _x_labels(s0, s1, plot_w)]
    marks = Counter(_burst_mark(r.get("note")) for r in rows)
    out.extend(_packed(["%s network" % g["network"], "%s field" % g["field"], "%s mix" % g["mix"],
                        "%s burst (%d)" % (g["burst"], marks["burst"]),
                        "%s rolled back (%d)" % (g["rejected"], marks["rejected"])], width))
    return "\n".join(line.rstrip() for line in out)


def growth_chart(rows, stream=None):
    """The chart as this output can show it: at most 80 columns, ASCII if the encoding lacks the blocks."""
    encoding = getattr(stream or sys.stdout, "encoding", None) or "ascii"
    ascii = True
    with contextlib.suppress(UnicodeEncodeError, LookupError):
        "".join(v[0] for v in GROWTH_GLYPHS.values()).encode(encoding)
        ascii = False                                      # the encoding can show the blocks
    return render_growth(rows, min(80, shutil.get_terminal_size().columns), ascii=ascii)


# ======================================================================================
# Progress notes: one fixed-format line about training, shown where the user already looks.
# ======================================================================================

def warmup_percent(step, cfg):
    return min(100, int(100 * step / max(1, cfg.warmup_steps)))


def warmup_eta(progress, cfg, step):
    """Seconds of warmup left at the last job's speed (None: unknown or done)."""
    tps, left = progress.tokens_per_s, max(0, cfg.warmup_steps - step)
    return left * cfg.batch_size * cfg.seq_len / tps if tps and left else None


def progress_line(progress, cfg, step):
    """`[warmup 34% | step 410/1200 | eta 12m03s | held-out -]` from a Brain's Progress."""
    h = progress.heldout
    return "[warmup %d%% | step %d/%d | eta %s | held-out %s]" % (
        warmup_percent(step, cfg), step, cfg.warmup_steps, format_duration(warmup_eta(progress, cfg, step)),
        "%.2f bits/byte" % h.mix_bpb if h else "-")


class TrainingNotes:
    """Decides which progress notes the REPL shows after a reply: a warmup line when the percentage
    moved or a new held-out figure came in, and once, when lambda first rises above 0, the network's arrival."""

    def __init__(self, cfg, progress):
        self.cfg = cfg
        self.shown = None                                   # (percent, held-out) of the last line
        self.warmup_over = progress.warmup_done            # a restart after warmup has none to show
        self.spoke = progress.lam > 0

    def lines(self, progress, step):
        out, h = [], progress.heldout
        now = (warmup_percent(step, self.cfg), h and h.mix_bpb)
        if not self.warmup_over and now != self.shown:
            out.append(progress_line(progress, self.cfg, step))
            self.shown = now
        self.warmup_over = progress.warmup_done
        if not self.spoke and progress.lam > 0:
            out.append("[the network now speaks: lambda %.2f]" % progress.lam)
            self.spoke = True
        return out


class Meter:
    """`eval 34% | 41/120 | eta 12s`, rewritten in place on stderr while it is a terminal; else silent."""

    def __init__(self, label, total, enabled=True, stream=None, now=time.monotonic):
        self.stream = stream or sys.stderr
        self.label, self.total, self.now = label, total, now
        tty = False
        with contextlib.suppress(AttributeError, ValueError):      # no isatty, or already closed
            tty = self.stream.isatty()
        self.on = enabled and total > 0 and tty
        self.start, self.percent, self.width = now(), None, 0

    def update(self, done):
        if not self.on:
            return
        percent = int(100 * done / self.total)
        if percent != self.percent:
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
    def __init__(self, cfg, corpus_path, db_path, ckpt_path, seed=0, pool=None):
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
            self.trainer = Trainer(cfg, self.corpus, self.memory, brain, pool or Pool(0, seed), ckpt_path, seed=seed)
            self.trainer.grow_tokenizer()                     # the tokenizer is ready from the first reply
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
        i = self.memory.add_message("user", text)
        history = self.memory.recent_messages(HISTORY_MESSAGES + 1)[:-1]
        remembered = [t for _, t in self.memory.search_messages(text, REMEMBERED_MESSAGES, before=i)]
        self.corpus.lexicon.add(text)                          # words you use are words it may use
        reply = self.voice.reply(self.brain, self.corpus, history, text, remembered)
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
        tps, step = p.tokens_per_s, self.trainer.pool.step
        if not p.warmup_done:
            eta = warmup_eta(p, cfg, step)
            phase = "warmup step %d/%d | eta %s" % (step, cfg.warmup_steps, format_duration(eta))
        else:
            phase = "warmup done | step %d | bursts %d | idle phases %d | %d rolled back" % (
                step, p.bursts, p.idle_phases, self.memory.rejected_bursts())
        loss = "%.3f" % p.loss if p.loss is not None else "-"
        lines = ["%s | loss %s | %s tok/s | trainer: %s%s"
                 % (phase, loss, "%.0f" % tps if tps else "-", self.trainer.status,
                    " | " + self.trainer.pool.note() if self.trainer.pool.restarts else "")]
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
# REPL: a reader thread feeds lines to the event loop; the trainer runs beside it.
# ======================================================================================
# input() blocks, so it runs in a thread; the loop stays free for the trainer's futures.
# In a terminal the thread waits for each reply before showing the next "> " prompt, so
# nothing ever prints over the line being typed.

class OutputError(MacroError):
    pass


def escape_controls(text):
    r"""Control characters as visible escapes, e.g. ESC -> \x1b, so no reply retitles the terminal or moves its
    cursor; tab stays, and newline, which separates the lines of one answer. Stored text keeps them all."""
    return re.sub("[\x00-\x08\x0b-\x1f\x7f-\x9f]", lambda m: "\\x%02x" % ord(m.group()), text)    # C0, DEL, C1


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


def say_if_possible(text, stream=None):
    """Last words, which nobody may be left to read: a closed terminal's EIO comes before its SIGHUP."""
    with contextlib.suppress(OutputError, BrokenPipeError):
        say(text, stream)


def read_lines(loop, queue, interactive, go):
    """The reader thread: each line of standard input onto the queue once `go` is set, then None."""
    line = ""
    while line is not None:
        go.wait()
        go.clear()
        try:
            if interactive:
                line = input("> ")
            else:
                raw = sys.stdin.buffer.readline()
                line = bytes_to_text(raw.rstrip(b"\r\n")) if raw else None
        except (EOFError, KeyboardInterrupt, OSError, ValueError):
            line = None
        with contextlib.suppress(RuntimeError):        # the loop has closed: the session is over
            loop.call_soon_threadsafe(queue.put_nowait, line)


# `kill PID`, a closed terminal window: save and exit 0 (Windows has neither)
QUIT_SIGNALS = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]


async def chat(session, interactive, train, progress=None):
    """Answer standard input until it ends, /quit or a signal; progress is TrainingNotes or None."""
    loop, queue = asyncio.get_event_loop(), asyncio.Queue()
    notes, interrupts, hung_up = [], [0], []

    def log(msg):
        if interactive:
            notes.append(msg)
        else:
            say(msg, sys.stderr)

    def on_sigint():
        interrupts[0] += 1
        if interrupts[0] > 1:
            os._exit(130)                              # checkpoints are atomic: nothing tears
        queue.put_nowait(None)

    def on_quit_signal():
        hung_up.append(True)                           # the terminal may be gone: say no goodbye
        queue.put_nowait(None)                         # then save and exit 0, as /quit does
    for sig, handler in [(signal.SIGINT, on_sigint)] + [(sig, on_quit_signal) for sig in QUIT_SIGNALS]:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows: Ctrl+C raises KeyboardInterrupt
            loop.add_signal_handler(sig, handler)
    go = threading.Event()                             # set: the reader may show the next prompt
    go.set()
    threading.Thread(target=read_lines, args=(loop, queue, interactive, go), daemon=True).start()
    task = loop.create_task(train_forever(session.trainer, log)) if train else None
    if interactive:
        say("macrogpt %s: type a message, /help for commands, Ctrl+D to leave." % VERSION)
    try:
        while True:
            line = await queue.get()
            if line is None:
                if interactive and not hung_up:
                    say_if_possible("")
                break
            line = line.strip()
            if not line:
                go.set()
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
            news = progress.lines(session.brain.progress, session.trainer.pool.step) if progress else []
            say("\n".join([text] + ["[%s]" % note for note in notes] + news))      # the reply, then the notes
            del notes[:]
            go.set()
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
# Eval: bits per byte of network, field and mix on a file, lines alone or in their conversation.
# ======================================================================================

def brain_for_reading(cfg, corpus_path, ckpt_path, seed=0):
    """The checkpoint's brain, or the one a first run would start with, without writing anything."""
    brain = Brain.load_or_fresh(ckpt_path, cfg, seed)
    if brain.tok.vocab_size == N_BASE_VOCAB:
        train, _ = split_heldout(read_corpus_file(corpus_path), cfg.heldout_every)
        merges = bpe_merges_due(cfg, sum(len(text_to_bytes(l)) for l in train), 0)
        if merges:
            brain.grow_tokenizer(train, merges)
    return brain


def read_conversations(path):
    """An eval file -> its conversations, lists of lines. A dialogue file (every line 'H: ' or
    'A: ', a blank line between conversations) keeps them; in any other file each line is alone."""
    convs, cur = [], []
    for raw in bytes_to_text(read_bytes(path, "eval file")).splitlines() + [""]:
        if raw.strip():
            cur.append(" ".join(raw.split()))
        elif cur:
            convs, cur = convs + [cur], []
    lines = [line for conv in convs for line in conv]
    if len(convs) > 1 and all(line.startswith(("H: ", "A: ")) for line in lines):
        return convs
    return [[line] for line in lines]


def line_probs(model, field, tok, before, text, block_size):
    """The network's and the field's probability of each token of a line and its EOS, the network
    reading the lines before it (as much as fits its window), the field the line so far."""
    ids = tok.encode(text) + [EOS]
    context = [EOS] + [t for line in before for t in tok.encode(line) + [EOS]]
    room = block_size + 1 - len(ids)
    if room > 0:
        pm = target_probs(model, [context[-room:] + ids])[-len(ids):]
    else:                                                      # longer than the window: alone
        pm = target_probs(model, heldout_windows([EOS] + ids, block_size))
    return list(zip(pm, [field.prob(ids[:i], t) for i, t in enumerate(ids)]))


def evaluate_file(path, cfg, corpus_path, ckpt_path, seed=0, show_progress=False):
    """Bits per byte of network, field and mix on a file: each line of a dialogue file with its
    conversation before it, as the voice's prompt has it (answers reported apart), else each line alone."""
    convs = read_conversations(path)
    if not convs:
        raise MacroError("eval file %s has no non-blank lines to score" % path)
    brain = brain_for_reading(cfg, corpus_path, ckpt_path, seed)
    train, _ = split_heldout(read_corpus_file(corpus_path), cfg.heldout_every)
    field = NGramField(cfg.field_order, brain.tok.vocab_size, cfg.field_discount)
    field.rebuild(brain.tok.encode(line) for line in train)
    pairs, answers, n_bytes, n_answer = [], [], 0, 0
    meter = Meter("eval", len(convs), show_progress)
    for done, conv in enumerate(convs):
        meter.update(done)
        for k, text in enumerate(conv):
            scored = line_probs(brain.model, field, brain.tok, conv[:k], text, cfg.block_size)
            pairs.extend(scored)
            n_bytes += len(text_to_bytes(text)) + 1            # + 1 for the line end
            if text.startswith("A: "):
                answers.extend(scored)
                n_answer += len(text_to_bytes(text)) + 1
    meter.finish()
    lam = brain.progress.lam

    def figures(pairs, n):
        return {name: round(bits_per_byte(mix_nll(pairs, weight), n), 4)
                for name, weight in (("network", 1.0), ("field", 0.0), ("mix", lam))}
    result = figures(pairs, n_bytes)
    result.update({"bytes": n_bytes, "lines": sum(map(len, convs)), "conversations": len(convs), "lambda": lam,
                   "step": brain.step, "checkpoint": ckpt_path if os.path.exists(ckpt_path) else None})
    say("%s: %d bytes in %d lines | bits/byte: network %.3f | field %.3f | mix %.3f (lambda %.2f, step %d)"
        % (path, n_bytes, result["lines"], result["network"], result["field"], result["mix"], lam, brain.step))
    if answers:
        result["answers"] = dict(figures(answers, n_answer), bytes=n_answer)
        a = result["answers"]
        say("answers with their conversation before them: %d bytes | network %.3f | field %.3f | mix %.3f"
            % (n_answer, a["network"], a["field"], a["mix"]))
    say(json.dumps(result, sort_keys=True))
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
HF_MAX_HEADER = 100 * 1024 * 1024         # safetensors' own limit on the JSON header
HF_ADAPTER_DIR = "adapter"                # where --export-lora puts the PEFT adapter inside DIR
# Exports are F32, but save_pretrained writes the dtype a model is held in: Llamas often F16/BF16.
HF_DTYPES = {"F32": "f", "F64": "d", "F16": "e", "BF16": "H"}     # -> struct code; BF16: an F32's top half
# Each Block part's Llama module under model.layers.N, in the order an export writes them.
HF_BLOCK_NAMES = (("ln1", "input_layernorm"), ("wq", "self_attn.q_proj"), ("wk", "self_attn.k_proj"),
                  ("wv", "self_attn.v_proj"), ("wo", "self_attn.o_proj"), ("fc_g", "mlp.gate_proj"),
                  ("fc_v", "mlp.up_proj"), ("fc2", "mlp.down_proj"), ("ln2", "post_attention_layernorm"))
HF_PROBE = ("".join(map(chr, range(0x20, 0x7F))) + " \t\n\x1c\xa0\u3000  x \u00e9e\u0301 \u00b2\u00bd\u2160 "
            "\u4e16\u754c\u3002 \u043c\u0438\u0440 \u0645\u0631\u062d\u0628\u0627 \u0663\u0664 \U0001F642\U0001F642 a_b1")


class HFError(MacroError):
    """A Hugging Face directory that cannot be written, or holds what macrogpt cannot represent."""


def byte_alphabet():
    """The 256 characters that stand for bytes 0..255 in a byte-level vocabulary (GPT-2's map)."""
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    moved = [b for b in range(256) if b not in keep]        # controls, space, 0x7f-0xa0, 0xad
    return [chr(b) if b in keep else chr(256 + moved.index(b)) for b in range(256)]


def _code_point_ranges(pattern):
    """[(first, last)] code points a one-character Python regex matches."""
    text = "".join(map(chr, range(0x110000)))
    return [(m.start(), m.end() - 1) for m in re.finditer("(?:%s)+" % pattern, text)]


def _onig_class(ranges, negate=False):
    """[(first, last)] -> an Oniguruma character class of \\x{HEX} escapes."""
    parts = ["\\x{%X}" % a if a == b else "\\x{%X}-\\x{%X}" % (a, b) for a, b in ranges]
    return "[%s%s]" % ("^" if negate else "", "".join(parts))


@functools.lru_cache(maxsize=None)
def hf_piece_regex():
    """PIECE_RE for `tokenizers` (Oniguruma): same alternatives, classes as explicit ranges.

    Python's \\w, \\d and \\s follow its own Unicode rules (e.g. \\s holds U+001C..U+001F,
    [^\\W\\d_] holds numerals such as U+00B2 and U+2160 but no combining marks), which
    Oniguruma's property classes do not reproduce, so the classes are listed range by range.
    Computed once per process (a scan of every code point, ~0.3 s).
    """
    letters, digits, spaces = (_code_point_ranges(p) for p in (r"[^\W\d_]", r"\d", r"\s"))
    others = _onig_class(sorted(letters + digits + spaces), negate=True)   # [^\w\s] or "_"
    space, not_space = _onig_class(spaces), _onig_class(spaces, negate=True)
    return " ?%s+| ?%s+| ?%s+|%s+(?!%s)|%s+" % (_onig_class(letters), _onig_class(digits),
                                                 others, space, not_space, space)


def hf_tokenizer_json(tok):
    """The `tokenizers` JSON of macrogpt's tokenizer; raises HFError if two ids share bytes."""
    alphabet, names, vocab = byte_alphabet(), dict(HF_SPECIALS), {}
    for i in range(tok.vocab_size):
        s = names.get(i) or "".join(alphabet[b] for b in tok.token_bytes(i))
        if s in vocab:
            raise HFError("tokens %d and %d stand for the same bytes; the Hugging Face BPE format "
                          "gives one id per string" % (vocab[s], i))
        vocab[s] = i
    strings = list(vocab)                       # in id order
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in HF_SPECIALS]
    split = {"type": "Split", "pattern": {"Regex": hf_piece_regex()},
             "behavior": "Isolated", "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
             "vocab": vocab, "merges": ["%s %s" % (strings[a], strings[b]) for a, b in tok.merges]}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
            "post_processor": None, "decoder": dict(byte_level), "model": model}


def hf_params(model):
    """[(Llama module name, Linear or Tensor)]: the one name table of export and import, lm_head last."""
    out = [("model.embed_tokens", model.wte)]
    for i, blk in enumerate(model.blocks):
        out.extend(("model.layers.%d.%s" % (i, hf), getattr(blk, ours)) for ours, hf in HF_BLOCK_NAMES)
    return out + [("model.norm", model.lnf), ("lm_head", model.lm_head)]


def hf_linears(model):
    """[(Llama module name, Linear)] for every linear that carries deltas."""
    return [(name, p) for name, p in hf_params(model) if isinstance(p, Linear)]


def hf_shape(name, rows):                       # Llama's norms hold our (1, C) gains as 1-D tensors
    return [len(rows[0])] if name.endswith("norm") else [len(rows), len(rows[0])]


def hf_tensors(model, merge=True):
    """[(Llama tensor name, shape, rows)], deltas merged unless merge is False (the LoRA's base)."""
    out = []
    for name, p in hf_params(model):
        if isinstance(p, Linear):
            rows = p.effective() if merge else p.weight.data
        else:
            rows = p.data
        if name == "lm_head" and merge and rows == model.wte.data:
            continue                            # tied; a LoRA head shared with wte would merge into both
        out.append((name + ".weight", hf_shape(name, rows), rows))
    return out


def hf_lora_tensors(model):
    """[(PEFT tensor name, shape, rows)]: each linear's k deltas stacked into one LoRA of rank k*r.

    PEFT computes W x + (alpha / r) B (A x) with lora_A (r, in) and lora_B (out, r); with
    lora_alpha = r that is our sum alpha_k A_k (B_k x), our B's stacked into lora_A and each
    alpha_k A_k side by side in lora_B.
    """
    out = []
    for name, lin in hf_linears(model):
        lora_a = [row for d in lin.deltas for row in d.B.data]
        lora_b = [[d.alpha * v for d in lin.deltas for v in d.A.data[i]] for i in range(len(lin.weight.data))]
        pre = "base_model.model." + name
        out.append((pre + ".lora_A.weight", [len(lora_a), len(lora_a[0])], lora_a))
        out.append((pre + ".lora_B.weight", [len(lora_b), len(lora_b[0])], lora_b))
    return out


def hf_lora_config(model, base_path):
    rank = model.n_deltas * model.cfg.delta_rank
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
            "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
            "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
            "target_modules": sorted({name.rsplit(".", 1)[-1] for name, _ in hf_linears(model)})}


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


# -- safetensors: 8-byte little-endian header length, JSON header, raw little-endian data ----

def write_safetensors(path, tensors):
    """[(name, shape, rows)] -> an F32 file whose header is padded with spaces to align the data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, rows in tensors:
        size = 4 * len(rows) * len(rows[0])
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for _, _, rows in tensors:
            flat = array.array("f", [v for r in rows for v in r])     # array saturates to inf; struct would raise
            if sys.byteorder != "little":
                flat.byteswap()
            f.write(flat.tobytes())
        f.flush()
        os.fsync(f.fileno())


def _json_object(data, what):
    """UTF-8 bytes -> a JSON object, or HFError saying what is not one."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except ValueError as e:                    # UnicodeDecodeError included
        raise HFError("%s is not JSON: %s" % (what, e))
    except RecursionError:
        raise HFError("%s is not JSON: nested too deeply" % what)
    if not isinstance(obj, dict):
        raise HFError("%s is not a JSON object" % what)
    return obj


def _checked_header(path, data):
    """Validate a safetensors file's bytes -> (its header without __metadata__, where the data starts)."""
    if len(data) < 8:
        raise HFError("%s is not a safetensors file (too short)" % path)
    n = struct.unpack("<Q", data[:8])[0]
    if n > min(HF_MAX_HEADER, len(data) - 8):
        raise HFError("%s is not a safetensors file (header length %d)" % (path, n))
    header = _json_object(data[8:8 + n], "%s is damaged: its header" % path)
    header.pop("__metadata__", None)
    spans = []
    for name, t in header.items():
        if not name.isprintable():                     # every later message names the tensor on one line
            raise HFError("%s is damaged: a tensor name holds %.60r" % (path, name))
        try:
            (a, b), dtype = t["data_offsets"], t["dtype"]
            count = 1
            for d in t["shape"]:
                count *= int(d)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
            raise HFError("%s is damaged: tensor %s has no valid dtype/shape/data_offsets" % (path, name))
        if not isinstance(dtype, str) or dtype not in HF_DTYPES:
            raise HFError("%s: tensor %s is %.40r; macrogpt reads F32, F16, BF16 and F64" % (path, name, dtype))
        size = count * struct.calcsize("<" + HF_DTYPES[dtype])
        if not (isinstance(a, int) and isinstance(b, int)) or b - a != size:
            raise HFError("%s is damaged: tensor %s does not fit its data_offsets" % (path, name))
        spans.append((a, b, name))
    end = 0
    for a, b, name in sorted(spans):
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
        code = HF_DTYPES[t["dtype"]]
        values = struct.unpack("<%d%s" % ((b - a) // struct.calcsize("<" + code), code), data[start + a:start + b])
        if t["dtype"] == "BF16":
            values = struct.unpack("<%df" % len(values), struct.pack("<%dI" % len(values), *[h << 16 for h in values]))
        out[name] = (list(t["shape"]), list(values))
    return out


# -- export ----------------------------------------------------------------------------------

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
    """Every file of the export into an empty folder -> its model.safetensors tensors. With
    lora_base (the folder's final path), the base alone, and the deltas as a LoRA adapter of it."""
    model, cfg = brain.model, brain.model.cfg
    tensors = hf_tensors(model, merge=lora_base is None)
    tied = all(name != "lm_head.weight" for name, _, _ in tensors)
    specials = {"bos_token": "<BOS>", "eos_token": "<EOS>", "pad_token": "<PAD>"}     # ids: tokenizer.json's
    files = {"config.json": hf_config(model, tied, brain.progress, brain.step),
             "generation_config.json": {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD,
                                        "do_sample": True, "temperature": cfg.temperature, "top_k": cfg.top_k,
                                        "top_p": cfg.top_p, "max_new_tokens": cfg.max_gen_tokens},
             "tokenizer.json": hf_tokenizer_json(brain.tok),
             "tokenizer_config.json": dict(specials, tokenizer_class="PreTrainedTokenizerFast",
                                           model_max_length=cfg.block_size, add_bos_token=False,
                                           add_eos_token=False, clean_up_tokenization_spaces=False),
             "special_tokens_map.json": specials}
    if lora_base is not None:
        os.mkdir(os.path.join(folder, HF_ADAPTER_DIR))
        files[os.path.join(HF_ADAPTER_DIR, "adapter_config.json")] = hf_lora_config(model, lora_base)
        write_safetensors(os.path.join(folder, HF_ADAPTER_DIR, "adapter_model.safetensors"), hf_lora_tensors(model))
    for name, obj in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
    return tensors


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


def export_hf(brain, out_dir, force=False, lora=False):
    """Write the brain as a Hugging Face Llama directory (lora: the base, and the deltas as a PEFT
    adapter in DIR/adapter) -> [(name, shape, rows)] written. The files go into a hidden folder
    beside DIR, renamed into place at the end: an interrupted export leaves DIR as it was."""
    out_dir = os.path.normpath(out_dir)
    _check_export_target(out_dir, force)
    if lora and not brain.model.n_deltas:
        raise HFError("the checkpoint has no delta adapters yet; --export writes the whole model")
    hidden = os.path.join(os.path.dirname(os.path.abspath(out_dir)),
                          ".%s.export-%d-" % (os.path.basename(out_dir), os.getpid()))
    n = 0
    while os.path.lexists(hidden + str(n)):
        n += 1
    tmp = hidden + str(n)
    try:
        os.mkdir(tmp)                          # with the user's umask (mkdtemp's is 0700)
        tensors = write_hf_dir(tmp, brain, os.path.abspath(out_dir) if lora else None)
        _swap_in(tmp, out_dir)
        return tensors
    except OSError as e:
        raise HFError("cannot write export %s: %s" % (out_dir, e.strerror or e))
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# -- import ----------------------------------------------------------------------------------

def _read_json(path):
    return _json_object(read_bytes(path, "", HFError), path)


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
    heads = hf["num_attention_heads"]
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
        if hf[key] != getattr(cfg, field):
            raise HFError('%s has %s %r but Config.%s is %r; put "%s": %s in a --config file'
                          % (path, key, hf[key], field, getattr(cfg, field), field, json.dumps(hf[key])))
    theta = _hf_rope_theta(hf, path)
    if theta != cfg.rope_base:
        raise HFError('%s has rope_theta %r but Config.rope_base is %r; put "rope_base": %s in a --config file'
                      % (path, theta, cfg.rope_base, json.dumps(theta)))


def _splits_like_piece_re(pattern):
    """Whether an exported split pattern acts as PIECE_RE on a probe of many scripts. By behavior,
    not text: a Python with other Unicode tables writes other ranges for characters assigned since."""
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
    plain = {"byte_fallback": False, "continuing_subword_prefix": None, "end_of_word_suffix": None, "dropout": None}
    if model.get("type") != "BPE" or model.get("ignore_merges") or any(model.get(k, v) != v for k, v in plain.items()):
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
            pair = entry.split(" ") if isinstance(entry, str) else entry    # "a b" until tokenizers 0.20, then ["a", "b"]
            if not isinstance(pair, list) or len(pair) != 2 or vocab[pair[0] + pair[1]] != N_BASE_VOCAB + rank:
                raise ValueError("%.40r" % (entry,))
            pairs.append((vocab[pair[0]], vocab[pair[1]]))
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
    for name, p in hf_params(model)[:-1]:           # lm_head, last, may be tied: below
        t = p.weight if isinstance(p, Linear) else p
        t.data = _take(tensors, name + ".weight", hf_shape(name, t.data), where)
    if tied_hf:
        tensors.pop("lm_head.weight", None)        # transformers ignores it too: the head is embed_tokens
    head = None
    if "lm_head.weight" in tensors:
        head = _take(tensors, "lm_head.weight", hf_shape("lm_head", model.wte.data), where)
    elif not tied_hf:
        raise HFError("%s is untied but has no lm_head.weight" % where)
    if model.cfg.tie_embeddings and head is not None and head != model.wte.data:
        raise HFError('%s has an lm_head that differs from its embeddings but Config.tie_embeddings is true; '
                      'put "tie_embeddings": false in a --config file' % where)
    if not model.cfg.tie_embeddings:
        model.lm_head.weight.data = head if head is not None else [list(r) for r in model.wte.data]
    leftover = sorted(n for n in tensors if not n.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise HFError("%s has tensors macrogpt has no place for (%s)" % (where, leftover[0]))
    model.touch()


def brain_from_hf(hf_dir, cfg, seed=0):
    """A Brain from a Hugging Face Llama directory, warmed up: as after warmup, bursts train a
    delta over the base it was given, and lambda is 0 (the weights may have changed elsewhere, so
    old evidence is void) until the trainer measures the held-out slice."""
    hf = _read_json(os.path.join(hf_dir, "config.json"))
    check_hf_config(hf, cfg, hf_dir)
    tok = tokenizer_from_hf(_read_json(os.path.join(hf_dir, "tokenizer.json")), hf_dir)
    if hf["vocab_size"] != tok.vocab_size:
        raise HFError("%s has vocab_size %r but its tokenizer has %d ids" % (hf_dir, hf["vocab_size"], tok.vocab_size))
    model = GPT(cfg, tok.vocab_size, seed, init=False)
    _fill_model(model, read_hf_weights(hf_dir), hf.get("tie_word_embeddings", True), hf_dir)
    meta = hf.get("macrogpt") if isinstance(hf.get("macrogpt"), dict) else {}
    step = meta["step"] if _is_kind(meta.get("step"), "int") and meta["step"] >= 0 else cfg.warmup_steps
    bpe_chars = meta["bpe_chars"] if _is_kind(meta.get("bpe_chars"), "int") and meta["bpe_chars"] >= 0 else 0
    if cfg.freeze_base_after_warmup:
        model.add_delta()
    return Brain(model, Adam(cfg), step, tok, Progress(warmup_done=True, bpe_chars=bpe_chars))


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
    """--export DIR, --export-lora DIR or --import DIR: one line of what was done."""
    if sum(a is not None for a in (args.export, args.export_lora, args.import_dir)) > 1:
        raise HFError("--export, --export-lora and --import go one at a time")
    if args.import_dir is not None:
        brain = import_hf(args.import_dir, args.ckpt, cfg, args.force, args.seed)
        say("imported %s into %s: vocab %d, %d layers; warmup done%s"
            % (args.import_dir, args.ckpt, brain.model.vocab_size, cfg.n_layer,
               ", bursts train a delta over the base" if cfg.freeze_base_after_warmup else ""))
        return 0
    lora = args.export is None
    out_dir = args.export_lora if lora else args.export
    if not os.path.exists(args.ckpt):
        raise HFError("no checkpoint %s to export (chat first, or name one with --ckpt)" % args.ckpt)
    brain = Brain.from_body(read_checkpoint(args.ckpt), cfg, args.seed)
    tensors = export_hf(brain, out_dir, args.force, lora)
    n_params = sum(len(rows) * len(rows[0]) for _, _, rows in tensors)
    deltas = "deltas merged"
    if lora:
        deltas = "base; deltas as a rank-%d LoRA in %s" % (brain.model.n_deltas * cfg.delta_rank, HF_ADAPTER_DIR)
    tied = "untied" if any(name == "lm_head.weight" for name, _, _ in tensors) else "tied"
    say("exported %s to %s: %d tensors, %d parameters (%s), vocab %d, %s embeddings"
        % (args.ckpt, out_dir, len(tensors), n_params, deltas, brain.model.vocab_size, tied))
    return 0


# ======================================================================================
# Bench: `python macrogpt.py --bench` measures training, generation and a naive reference.
# ======================================================================================

def forward_macs_per_token(cfg, vocab_size, T):
    """Multiply-adds of one token's forward pass at sequence length T (attention averaged)."""
    C, H = cfg.n_embd, 4 * cfg.n_embd
    per_layer = 4 * C * C + 3 * H * C                         # wq, wk, wv, wo; gate, value, fc2
    per_layer += (T + 1) * C                                  # q.k and p.v over (T+1)/2 keys
    return cfg.n_layer * per_layer + vocab_size * C           # and the lm_head


def _median(xs):
    xs, n = sorted(xs), len(xs)
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


def bench_training(cfg, brain, workers, shape, label, out, steps=4):
    """Training tokens/s of a Pool of `workers` processes (0: this one) on random batches of
    shape (n_seq, T): the median of `steps` steps after a first one that warms up."""
    n_seq, T = shape
    pool, rng, rates = Pool(workers), random.Random(0), []
    try:
        pool.load(brain)
        for i in range(steps + 1):
            batch = [[rng.randrange(brain.tok.vocab_size) for _ in range(T + 1)] for _ in range(n_seq)]
            t0 = time.perf_counter()
            loss, _ = pool.train_step(batch, lr_at(i, cfg), True)
            if i:
                rates.append(n_seq * T / (time.perf_counter() - t0))
                out("%s step %d/%d | loss %.3f | %.0f tok/s" % (label, i, steps, loss, rates[-1]))
    finally:
        pool.close()
    return round(_median(rates), 1)


def bench_generation(model, n_tokens=200, prompt_tokens=16):
    """Tokens/s of greedy generation after a random prompt, a token at a time as a reply is made."""
    rng, cache = random.Random(0), model.new_cache()
    for token in [rng.randrange(model.vocab_size) for _ in range(prompt_tokens)]:
        logits = model.step(cache, token)
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        logits = model.step(cache, max(range(len(logits)), key=logits.__getitem__))
    return n_tokens / (time.perf_counter() - t0)


def bench_tokenizer(lines, num_merges):
    """Seconds to learn num_merges merges on lines, and encode throughput (bytes/s) after."""
    tok = Tokenizer()
    t0 = time.perf_counter()
    tok.train(lines, num_merges)
    train_s = time.perf_counter() - t0
    n_bytes = sum(len(text_to_bytes(l)) + 1 for l in lines)
    times = []
    for _ in range(3):
        tok._cache.clear()                                    # measure cold encoding
        t0 = time.perf_counter()
        n_tokens = sum(len(tok.encode(l)) + 1 for l in lines)
        times.append(time.perf_counter() - t0)
    return {"bpe_train_seconds": round(train_s, 3), "bpe_merges": len(tok.merges),
            "encode_bytes_per_s": round(n_bytes / _median(times)), "corpus_bytes": n_bytes,
            "tokens_per_byte": round(n_tokens / n_bytes, 4)}


def run_bench(cfg, corpus_path, out=say, show_progress=False):
    """Speeds of the model a first run trains: its vocabulary is the one the corpus teaches
    the tokenizer, since the output layer grows with it."""
    t0 = time.perf_counter()
    meter = Meter("bench", 2, show_progress)                  # on the quiet phases only
    meter.update(0)
    result = {"python": sys.version.split()[0], "config": cfg.to_dict(),
              "kernel": "math.dist" if _dist is not None else "sum(map(mul))",
              "gen_kernel": "float" if cfg.exact_generation else "64-bit fixed point"}
    result.update(bench_tokenizer(read_corpus_file(corpus_path), cfg.bpe_num_merges))
    brain = brain_for_reading(cfg, corpus_path, None)         # a first run's newborn
    meter.update(1)
    result["naive_mflops"] = round(bench_naive_mflops(256, cfg.n_embd, 4 * cfg.n_embd), 1)
    meter.finish()                                            # the training benches print a line per step
    model = brain.model
    result.update(vocab=model.vocab_size, params=model.num_params(),
                  train_tokens_per_s=bench_training(cfg, brain, 0, (4, 64), "train", out, steps=5),
                  gen_tokens_per_s=round(bench_generation(model), 1),
                  train_flops_per_token=3 * 2 * forward_macs_per_token(cfg, model.vocab_size, 64))
    result["train_mflops"] = round(result["train_tokens_per_s"] * result["train_flops_per_token"] / 1e6, 1)
    n = result["train_workers"] = worker_count(cfg)
    shape = (cfg.batch_size, cfg.seq_len)                     # the trainer's own batches
    one = result["train_tokens_per_s_1"] = bench_training(cfg, brain, 1, shape, "1 worker", out)
    result["train_tokens_per_s_all"] = bench_training(cfg, brain, n, shape, "%d workers" % n, out) if n > 1 else one
    result["bench_seconds"] = round(time.perf_counter() - t0, 1)
    out("python %(python)s | kernel %(kernel)s, generation %(gen_kernel)s | %(params)d params, vocabulary %(vocab)d"
        % result)
    out("train %(train_tokens_per_s).0f tok/s (%(train_mflops).0f MFLOP/s) | generate %(gen_tokens_per_s).0f tok/s"
        " | naive matmul %(naive_mflops).0f MFLOP/s" % result)
    out("data-parallel training: %.0f tok/s with 1 worker, %.0f with %d (x%.2f)"
        % (one, result["train_tokens_per_s_all"], n, result["train_tokens_per_s_all"] / max(1e-9, one)))
    out("tokenizer: %d merges in %.2f s | encode %.0f KB/s | %.3f tokens per byte on %d bytes"
        % (result["bpe_merges"], result["bpe_train_seconds"], result["encode_bytes_per_s"] / 1000,
           result["tokens_per_byte"], result["corpus_bytes"]))
    out(json.dumps(result, sort_keys=True))
    return result


# ======================================================================================
# CLI: argparse, paths in the current directory, one-line errors with exit code 2.
# ======================================================================================

def load_config(path):
    """Config() with the overrides of a JSON object file (--config)."""
    try:
        with open(path, encoding="utf-8") as f:
            overrides = json.load(f)
    except (OSError, ValueError, RecursionError) as e:   # RecursionError: nested deeper than json can parse
        raise ConfigError("cannot read config %s: %s" % (path, e))
    if not isinstance(overrides, dict):
        raise ConfigError("config %s must hold a JSON object of Config fields" % path)
    unknown = [key for key in overrides if key not in {f.name for f in fields(Config)}]
    if unknown:
        raise ConfigError("config %s: unknown field %r" % (path, unknown[0]))
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
    if args.growth:                            # no config or corpus needed; opening may upgrade the schema
        if not os.path.exists(args.db):
            raise MacroError("no database %s here yet: chat first (python3 macrogpt.py), or pass --db" % args.db)
        with contextlib.closing(Memory(args.db)) as memory:
            say(growth_chart(memory.growth_rows()))
        return 0
    cfg = load_config(args.config) if args.config is not None else Config()
    beside_script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nonames.txt")
    corpus = args.corpus or ("nonames.txt" if os.path.exists("nonames.txt") else beside_script)
    if not args.db or not args.ckpt:
        raise MacroError("--db and --ckpt need a file name")
    if os.path.abspath(args.db) == os.path.abspath(args.ckpt):
        raise MacroError("--db and --ckpt must be different files")
    if args.bench:
        run_bench(cfg, corpus, show_progress=not args.quiet)
    elif args.eval:
        evaluate_file(args.eval, cfg, corpus, args.ckpt, args.seed, show_progress=not args.quiet)
    elif args.export is not None or args.export_lora is not None or args.import_dir is not None:
        return run_hf(args, cfg)
    elif args.tokenize is not None:
        say(format_tokenization(brain_for_reading(cfg, corpus, args.ckpt, args.seed).tok, args.tokenize))
    elif args.prompt is None and sys.stdin is None:
        raise MacroError("standard input is closed; pipe messages in, or give --prompt TEXT")
    else:
        with FolderLock(args.db), FolderLock(args.ckpt):         # before anything is written
            remove_stale_temps(args.ckpt)
            run_session(cfg, corpus, args)
    return 0


def run_session(cfg, corpus, args):
    """Chat, or answer --prompt once: the work that writes, done while holding the folder lock."""
    train = args.prompt is None and not args.no_train
    with contextlib.closing(Pool(worker_count(cfg) if train else 0, args.seed)) as pool:
        with contextlib.closing(Session(cfg, corpus, args.db, args.ckpt, args.seed, pool)) as session:
            if args.prompt is not None:
                text = args.prompt.strip()
                if text.startswith("/"):
                    text, _ = session.command(text)               # None after /quit: nothing to show
                else:
                    text = session.respond(text) if text else FALLBACK_REPLY
                if text is not None:
                    say(text)
                session.save()
                return
            interactive = sys.stdin.isatty() and sys.stdout.isatty()
            if interactive:
                with contextlib.suppress(ImportError):
                    import readline                               # noqa: F401  line editing and history
            notes = TrainingNotes(session.cfg, session.brain.progress) if interactive and train and not args.quiet else None
            asyncio.run(chat(session, interactive, train, notes))
            quit_on_signals()                                      # the loop's handlers went with it


class Terminated(BaseException):
    """SIGTERM or SIGHUP outside the chat loop; like KeyboardInterrupt, no `except Exception` stops it."""


def quit_on_signals():
    """SIGTERM and SIGHUP outside the chat loop end the program quietly -> a function restoring the old handlers."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_DFL:
        signal.signal(signal.SIGINT, signal.default_int_handler)   # set to SIG_DFL for the imports

    def terminate(signum, frame):
        raise Terminated(signum)
    old = {sig: signal.signal(sig, terminate) for sig in QUIT_SIGNALS}    # signal() returns the old handler

    def restore():
        for sig, handler in old.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    return restore


def plug_closed_streams():
    """Put /dev/null on a closed fd 0, 1 or 2, so no file we open lands there and is written by print.
    sys.stdin and sys.stdout stay None, which run() reads as "closed"; a closed stderr just goes quiet."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)             # the lowest free descriptor: this one
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)


def _quiet_stdout():
    """Point fd 1 at /dev/null, so the exit-time flush of what could not be written stays silent."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)


def main(argv=None):
    restore = quit_on_signals()
    try:
        plug_closed_streams()
        args = build_parser().parse_args(argv)
        if sys.stdout is None:
            raise OutputError("standard output is closed; nothing could be shown")
        return run(args)
    except MacroError as e:
        if isinstance(e, OutputError):
            _quiet_stdout()
        say_if_possible("macrogpt: error: %s" % e, sys.stderr)
        return 2
    except BrokenPipeError:                        # `| head` closed our output: nothing left to say
        _quiet_stdout()
        return 1
    except KeyboardInterrupt:                      # Ctrl+C before the chat loop took it over
        return 130
    except Terminated:                             # before the loop: nothing new to save yet
        return 0
    finally:
        restore()


if __name__ == "__main__":
    sys.exit(main())
