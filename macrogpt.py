"""macrogpt: a small GPT in one standard-library Python file that chats and keeps learning.

Contract
  * `python macrogpt.py` chats in the terminal. It answers at once from the corpus field (an n-gram
    model of the living corpus), trains its network in the background, and hands the voice over to
    the network as held-out evidence says it has earned it.
  * Learning happens in a frozen base plus appended low-rank delta adapters, so new bursts do not
    overwrite what earlier ones learned; bursts that hurt a held-out slice are rolled back.
  * Text is byte-level BPE whose vocabulary only grows; no trained weight is ever invalidated.
  * Standard library only, CPython 3.7 to 3.13.

Deliberately left out: GPUs, numpy, batching across users, anything that needs a network.

Run it:      python macrogpt.py            (see --help)
Benchmark:   python macrogpt.py --bench
Tests:       python -m unittest            (from the repository root)
"""

import signal

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # a Ctrl+C during the imports below ends quietly; main() takes it over

import argparse
import array
import asyncio
import base64
import contextlib
import dataclasses
import functools
import gc
import hashlib
import heapq
import json
import math
import multiprocessing
import operator
import os
import random
import re
import sqlite3
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
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


class CheckpointError(MacroError):
    pass


# ======================================================================================
# Config: every knob, grouped by subsystem. Edit the defaults here to resize the model.
# ======================================================================================

_KIND_NAMES = {"int": "an integer", "float": "a finite number", "bool": "true or false"}


def _is_kind(value, kind):
    """Whether value fits a Config field annotated `kind` (bool is not an int here)."""
    if kind == "bool" or isinstance(value, bool):
        return kind == "bool" and isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int)
    return isinstance(value, (int, float)) and math.isfinite(value)


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
    # delta adapters
    delta_rank: int = 4
    max_delta_modules: int = 8
    delta_alpha: float = 1.0             # scale applied to every A_k B_k
    # optimizer
    lr: float = 3e-3                     # peak learning rate
    lr_min: float = 3e-4                 # floor of the cosine decay
    lr_warmup_steps: int = 40            # linear ramp from 0 to lr
    lr_decay_steps: int = 1200           # cosine from lr to lr_min ends here
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8
    grad_clip: float = 1.0               # global L2 norm
    # trainer
    batch_size: int = 4                  # sequences per step
    seq_len: int = 64                    # tokens per training window (<= block_size)
    warmup_steps: int = 1200             # steps on the corpus before the base freezes
    micro_steps: int = 24                # steps per burst after warmup
    freeze_base_after_warmup: bool = True
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
    bpe_num_merges: int = 384
    # corpus field
    field_order: int = 4
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
            kind, value = f.type if isinstance(f.type, str) else f.type.__name__, getattr(self, f.name)
            if not _is_kind(value, kind):
                raise ConfigError("Config.%s must be %s, got %r" % (f.name, _KIND_NAMES[kind], value))
        positive = ("n_layer", "n_embd", "n_head", "block_size", "delta_rank", "max_delta_modules",
                    "lr_warmup_steps", "lr_decay_steps", "batch_size", "seq_len", "micro_steps",
                    "max_corpus_lines", "heldout_every", "field_order", "max_gen_tokens")
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
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError("Config.%s must be in [0, 1), got %r" % (name, getattr(self, name)))
        for name in ("top_p", "min_p", "typical_p", "delta_grow_prob", "qb_min_novelty"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError("Config.%s must be in [0, 1], got %r" % (name, getattr(self, name)))
        for name in ("top_k", "repetition_guard", "min_gen_tokens", "qb_min_bytes", "warmup_steps",
                     "enable_bpe_after_chars", "bpe_retrain_every_chars", "bpe_num_merges"):
            if getattr(self, name) < 0:
                raise ConfigError("Config.%s must be >= 0, got %r" % (name, getattr(self, name)))
        if not self.entropy_low <= self.entropy_high:
            raise ConfigError("Config.entropy_low must not exceed entropy_high")
        if self.heldout_every < 2:
            raise ConfigError("Config.heldout_every must be at least 2 (1 would hold out every line)")
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
        return h, _dist(h, zero_tuple(len(h))) ** 2

    def dots(x, halves, norms):
        """[x . w for every prepared row w], one math.dist call per row."""
        x = tuple(x)
        nx = _dist(x, zero_tuple(len(x))) ** 2
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
    """|x|^2."""
    return _dist(x, zero_tuple(len(x))) ** 2 if _dist is not None else sum(v * v for v in x)


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

    @property
    def shape(self):
        return (len(self.data), len(self.data[0]) if self.data else 0)

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


def _count_pairs(ids, weight, counts):
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight


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

    def __call__(self, x, n_seq, T, cfg, table):
        qkv = linear(rmsnorm(x, self.ln1), [self.wq, self.wk, self.wv])
        x = add(x, linear(attention(qkv, n_seq, T, cfg.n_head, table), [self.wo]))
        gv = linear(rmsnorm(x, self.ln2), [self.fc_g, self.fc_v])
        return add(x, linear(swiglu(gv), [self.fc2]))


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
    def forward(self, inputs):
        """inputs: n_seq lists of T ids (equal lengths, T <= block_size) -> logits (n_seq*T, V)."""
        n_seq, T = len(inputs), len(inputs[0])
        assert T <= self.cfg.block_size
        ids = [i for seq in inputs for i in seq]
        x = embed(self.wte, ids)                          # (n_seq*T, C) rows
        for blk in self.blocks:
            x = blk(x, n_seq, T, self.cfg, self.rope)
        return linear(rmsnorm(x, self.lnf), [self.lm_head])

    def loss(self, inputs, targets):
        """Mean next-token cross-entropy (nats) of targets (same shape as inputs)."""
        flat = [t for seq in targets for t in seq]
        return mean(cross_entropy(self.forward(inputs), flat))

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
        exp = math.exp
        s = dots(q, self.keys, self.key_norms)
        top = max(s)
        p = [exp((v - top) * scale) for v in s]
        z = sum(p)
        return [v / z for v in dots(p, self.cols, self.col_norms)]


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


class Adam:
    """Adam over named parameters; state (m, v, update count) is kept per parameter name.

    The update count is per parameter, so a delta appended late gets a fresh bias
    correction instead of inheriting the global step's.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.state = {}                   # name -> [m rows, v rows, t]

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
                st = self.state[name] = [[], [], 0]
            m, v = st[0], st[1]
            cols = len(p.data[0])
            while len(m) < len(p.data):
                m.append([0.0] * cols)
                v.append([0.0] * cols)
            st[2] += 1
            t = st[2]
            step_size = lr * sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
            for i in range(p.frozen_rows, len(p.data)):
                g = p.grad[i]
                mi = [b1 * a + c1 * x for a, x in zip(m[i], g)]
                vi = [b2 * a + c2 * x * x for a, x in zip(v[i], g)]
                m[i], v[i] = mi, vi
                p.data[i] = [w - step_size * a / (sqrt(b) + eps) for w, a, b in zip(p.data[i], mi, vi)]
        for _, p in named_params:
            p.grad = None
        return norm



def train_step(model, opt, inputs, targets, lr):
    """One forward, backward and Adam update -> the batch's mean loss (nats).

    The cyclic garbage collector is paused meanwhile: the graph has no cycles (see Autograd),
    so its scans of the step's thousands of row lists find nothing and cost about 3% of the
    step (callgrind, 3.11).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        loss = model.loss(inputs, targets)
        loss.backward()
        opt.step(model.named_params(), lr)
    finally:
        if was_enabled:
            gc.enable()
    model.touch()
    return loss.data[0][0]


# ======================================================================================
# Checkpoints: one versioned file, written atomically, weights as base64 of float64 arrays.
# ======================================================================================
# Layout: a header line "macrogpt-checkpoint <version> <sha256 of body>" then one JSON body.
# The digest makes a torn or edited file fail loudly instead of loading wrong weights.

CKPT_MAGIC = "macrogpt-checkpoint"
CKPT_VERSION = 1
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
            adam[name] = {"m": pack_rows(st[0]), "v": pack_rows(st[1]), "t": st[2]}
    body = {"version": CKPT_VERSION, "byteorder": sys.byteorder, "config": model.cfg.to_dict(),
            "step": step, "vocab_size": model.vocab_size, "n_deltas": model.n_deltas,
            "delta_alphas": [d.alpha for d in model.lm_head.deltas],
            "params": params, "adam": adam, "extra": extra or {}}
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
    except ValueError:
        raise CheckpointError("%s is damaged (body is not valid JSON)" % name)


def read_checkpoint(path):
    """Read and verify a checkpoint file -> its body dict. Never modifies the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CheckpointError("cannot read checkpoint %s: %s" % (path, e.strerror or e))
    return parse_checkpoint(raw, path)


def restore_checkpoint(body, cfg=None, seed=0):
    """Rebuild (model, opt, step, extra) from a checkpoint body, growing into cfg if it is larger."""
    try:
        saved_cfg = Config.from_dict(body["config"])
        model = GPT(saved_cfg, body["vocab_size"], seed, init=False)
        for alpha in body["delta_alphas"]:
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
                opt.state[name] = [unpack_rows(st["m"], order), unpack_rows(st["v"], order), st["t"]]
        step, extra = body["step"], body.get("extra", {})
    except (KeyError, TypeError, ValueError, IndexError) as e:
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
            new_opt.state[name] = [_embed_rows(st[0], zero_m, 0.0), _embed_rows(st[1], zero_m, 0.0), st[2]]
    if any(t.frozen_rows for _, t in model.base_params()):
        grown.freeze_base()                            # new rows and layers too: bursts train only deltas
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
    m = max(logits)
    e = [math.exp((v - m) / temperature) for v in logits]
    total = sum(e)
    return [v / total for v in e]


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
    kind = type(getattr(cfg, name))
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
# Every count is updated per added n-gram, so incremental adds equal a rebuild exactly.

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
        self.seen = [None] + [set() for _ in range(self.order)]   # raw k-grams ever added (k >= 2)
        self.n_tokens = 0

    def _bump(self, k, gram):
        ctx, w = gram[:-1], gram[-1]
        row = self.tables[k].setdefault(ctx, {})
        row[w] = row.get(w, 0) + 1
        self.totals[k][ctx] = self.totals[k].get(ctx, 0) + 1

    def add(self, ids):
        """Count one line of token ids, framed by BOS padding and a closing EOS."""
        N = self.order
        seq = [BOS] * (N - 1) + list(ids) + [EOS]
        for i in range(N - 1, len(seq)):
            for k in range(2, N + 1):
                gram = tuple(seq[i - k + 1:i + 1])
                if gram not in self.seen[k]:
                    self.seen[k].add(gram)
                    self._bump(k - 1, gram[1:])               # a new left extension of gram[1:]
            self._bump(N, tuple(seq[i - N + 1:i + 1]))
        self.n_tokens += len(ids) + 1

    def rebuild(self, seqs):
        self.clear()
        for ids in seqs:
            self.add(ids)

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


def best_lambda(pairs):
    """The mixing weight that minimizes held-out NLL, from (p_model, p_field) of each true token."""
    if not pairs:
        return 0.0
    def nll(lam):
        return -sum(math.log(max(lam * a + (1 - lam) * b, 1e-300)) for a, b in pairs)
    return min(LAMBDA_GRID, key=nll)


def nll_of(probs):
    """Total negative log-likelihood (nats) of the probabilities given to the true tokens."""
    return -sum(math.log(max(p, 1e-300)) for p in probs)


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
    """

    def __init__(self, lines):
        self.answers = []                          # A: lines that follow an H: line
        self.index = {}                            # word -> answer indices
        for q, a in zip(lines, lines[1:]):
            if q.startswith("H:") and a.startswith("A:"):
                for w in content_words(q):
                    self.index.setdefault(w, []).append(len(self.answers))
                self.answers.append(a)

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


MEMORY_VERSION = 1
SCHEMA = """
CREATE TABLE messages (id INTEGER PRIMARY KEY, time REAL NOT NULL, role TEXT NOT NULL, text BLOB NOT NULL);
CREATE TABLE corpus (id INTEGER PRIMARY KEY, line BLOB NOT NULL UNIQUE, source TEXT NOT NULL, time REAL NOT NULL);
CREATE TABLE events (id INTEGER PRIMARY KEY, time REAL NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE growth (id INTEGER PRIMARY KEY, time REAL NOT NULL, step INTEGER, vocab INTEGER,
                     params INTEGER, deltas INTEGER, loss REAL, heldout_bpb REAL, tokens_per_s REAL,
                     note TEXT);
CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
GROWTH_FIELDS = ("step", "vocab", "params", "deltas", "loss", "heldout_bpb", "tokens_per_s", "note")
STATE_KINDS = {"seed_digest": str, "settings": dict, "burst_mark": int}   # what readers of each key expect


def _guarded(method):
    """Memory's one error boundary: an SQLite failure after open (locked past the busy timeout,
    disk full, a damaged page) becomes one MemoryStoreError; the transaction is rolled back."""
    @functools.wraps(method)
    def guarded(self, *args, **kw):
        try:
            return method(self, *args, **kw)
        except sqlite3.Error as e:
            raise MemoryStoreError("database %s: %s" % (self.path, e)) from None
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
            raise MemoryStoreError("cannot open database %s: %s" % (path, e))
        try:
            self._check_and_migrate(path)
        except BaseException:
            self.db.close()
            raise

    def _check_and_migrate(self, path):
        try:
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as e:
            if _is_sqlite_file(path):
                raise MemoryStoreError("%s is damaged (%s); %s" % (path, e, _damaged_hint(path)))
            raise MemoryStoreError("%s is not a macrogpt database (%s); move it aside or pass --db" % (path, e))
        if version > MEMORY_VERSION:
            raise MemoryStoreError("%s was written by a newer macrogpt (schema %d > %d)" % (path, version, MEMORY_VERSION))
        if version == 0 and tables:
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
        except sqlite3.Error as e:
            raise MemoryStoreError("cannot use database %s: %s" % (path, e))

    def _check_intact(self, path, tables):
        """Refuse a damaged file at open, before anything is written to it (quick_check: ~2 ms at 20,000 lines)."""
        hint = _damaged_hint(path)
        try:
            problems = [r[0] for r in self.db.execute("PRAGMA quick_check")]
            missing = sorted(set(re.findall(r"CREATE TABLE (\w+)", SCHEMA)) - tables)
            state = self.db.execute("SELECT key, value FROM state").fetchall() if not missing else []
        except sqlite3.DatabaseError as e:
            raise MemoryStoreError("%s is damaged (%s); %s" % (path, e, hint))
        if problems != ["ok"]:
            raise MemoryStoreError("%s is damaged (%s); %s" % (path, problems[0].splitlines()[-1], hint))
        if missing:
            raise MemoryStoreError("%s is damaged (table %s is missing); %s" % (path, missing[0], hint))
        for key, value in state:
            try:
                ok = isinstance(json.loads(value), STATE_KINDS.get(key, object))
            except (TypeError, ValueError):
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

    # -- conversation ------------------------------------------------------------------------
    @_guarded
    def add_message(self, role, text):
        with self.transaction():
            self.db.execute("INSERT INTO messages (time, role, text) VALUES (?, ?, ?)",
                            (time.time(), role, text_to_bytes(text)))

    @_guarded
    def recent_messages(self, n):
        rows = self.db.execute("SELECT role, text FROM messages ORDER BY id DESC LIMIT ?", (n,)).fetchall()
        return [(role, bytes_to_text(bytes(text))) for role, text in reversed(rows)]

    @_guarded
    def message_count(self):
        return self.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]

    # -- living corpus -----------------------------------------------------------------------
    @_guarded
    def add_corpus_lines(self, lines, source):
        """Insert lines not already present -> how many were new."""
        now, added = time.time(), 0
        with self.transaction():
            for line in lines:
                cur = self.db.execute("INSERT OR IGNORE INTO corpus (line, source, time) VALUES (?, ?, ?)",
                                      (text_to_bytes(line), source, now))
                added += cur.rowcount
        return added

    @_guarded
    def corpus_lines(self):
        return [bytes_to_text(bytes(r[0])) for r in self.db.execute("SELECT line FROM corpus ORDER BY id")]

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
    def prune_corpus(self, max_lines, rng):
        """Keep the newest half of max_lines and a random sample of the older lines -> removed."""
        ids = [r[0] for r in self.db.execute("SELECT id FROM corpus ORDER BY id")]
        if len(ids) <= max_lines:
            return 0
        newest = max_lines // 2
        older = ids[:len(ids) - newest]
        keep_old = set(rng.sample(older, max_lines - newest))
        drop = [(i,) for i in older if i not in keep_old]
        with self.transaction():
            self.db.executemany("DELETE FROM corpus WHERE id = ?", drop)
        self.log_event("prune", "removed %d of %d corpus lines" % (len(drop), len(ids)))
        return len(drop)

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
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise MacroError("cannot read %s %s: %s" % (what, path, e.strerror or e))
    lines = [line.strip() for line in bytes_to_text(raw).splitlines()]
    return [line for line in lines if line]


def split_heldout(lines, every):
    """Every `every`-th line (1-based) is held out -> (train, heldout)."""
    train, heldout = [], []
    for i, line in enumerate(lines, 1):
        (heldout if i % every == 0 else train).append(line)
    return train, heldout


def turn_to_corpus_lines(user, reply):
    """A conversation turn in the corpus's own format."""
    return ["H: " + " ".join(user.split()), "A: " + " ".join(reply.split())]



# ======================================================================================
# Brain: the network, its optimizer and tokenizer, and the progress that travels with them.
# ======================================================================================

class Brain:
    def __init__(self, model, opt, step, tok, progress):
        self.model = model
        self.opt = opt
        self.step = step                          # global optimizer step (drives the LR schedule)
        self.tok = tok
        self.progress = progress                  # JSON-able dict; see new_progress()

    @staticmethod
    def new_progress():
        return {"warmup_done": False, "bpe_chars": 0, "lambda": 0.0, "bursts": 0,
                "loss": None, "tokens_per_s": None, "heldout": None}

    @classmethod
    def fresh(cls, cfg, seed=0):
        return cls(GPT(cfg, N_BASE_VOCAB, seed), Adam(cfg), 0, Tokenizer(), cls.new_progress())

    @classmethod
    def from_body(cls, body, cfg=None, seed=0):
        model, opt, step, extra = restore_checkpoint(body, cfg, seed)
        if "tokenizer" not in extra:
            raise CheckpointError("checkpoint has no tokenizer state")
        tok = Tokenizer.from_dict(extra["tokenizer"])
        if tok.vocab_size != model.vocab_size:
            raise CheckpointError("checkpoint is inconsistent: tokenizer has %d ids, model %d rows"
                                  % (tok.vocab_size, model.vocab_size))
        progress = cls.new_progress()
        progress.update(extra.get("progress", {}))
        return cls(model, opt, step, tok, progress)

    @classmethod
    def load(cls, path, cfg=None, seed=0):
        return cls.from_body(read_checkpoint(path), cfg, seed)

    def to_bytes(self):
        extra = {"tokenizer": self.tok.to_dict(), "progress": self.progress}
        return checkpoint_bytes(self.model, self.opt, self.step, extra)

    def save(self, path):
        atomic_write(path, self.to_bytes())


# ======================================================================================
# Training jobs: pure functions from checkpoint bytes to checkpoint bytes, run in a worker.
# ======================================================================================
# The trainer sends a job (the brain as checkpoint bytes, the token windows, the number of
# steps) to a worker process, so training and chat use different cores and the prompt never
# waits on a training step. The worker keeps no state: whatever it returns, the caller may
# adopt or throw away, which is also how a burst is rolled back.

def sample_windows(stream, n, length, rng, recent_from=None):
    """n windows of `length` + 1 tokens from the stream; if recent_from is set, half start there."""
    length = min(length, len(stream) - 1)
    out = []
    for i in range(n):
        lo = 0
        if recent_from is not None and i % 2 == 0:
            lo = max(0, min(recent_from, len(stream) - length - 1))
        start = rng.randint(lo, len(stream) - length - 1)
        out.append(stream[start:start + length + 1])
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


def run_job(job):
    """Worker entry point: optionally append a delta, train, and score held-out windows."""
    t0 = time.perf_counter()
    brain = Brain.from_body(parse_checkpoint(job["ckpt"]), seed=job.get("seed", 0))
    model, cfg = brain.model, brain.model.cfg
    result = {"losses": [], "before": None, "after": None}
    if job.get("score_before"):
        result["before"] = target_probs(model, job["heldout"])
    if job.get("freeze"):
        model.freeze_base()
    if job.get("add_delta"):
        model.add_delta()
    rng = random.Random(job.get("seed", 0) + brain.step)
    for _ in range(job.get("steps", 0)):
        seqs = sample_windows(job["stream"], cfg.batch_size, cfg.seq_len, rng, job.get("recent_from"))
        n = min(len(s) for s in seqs)
        seqs = [s[:n] for s in seqs]
        loss = train_step(model, brain.opt, [s[:-1] for s in seqs], [s[1:] for s in seqs],
                          lr_at(brain.step, cfg))
        brain.step += 1
        result["losses"].append(loss)
        result["tokens"] = result.get("tokens", 0) + len(seqs) * (n - 1)
    if job.get("score_after"):
        result["after"] = target_probs(model, job["heldout"])
    result["ckpt"] = checkpoint_bytes(model, brain.opt, brain.step, {"tokenizer": brain.tok.to_dict(),
                                                                      "progress": brain.progress})
    result["seconds"] = time.perf_counter() - t0
    return result


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the parent decides what Ctrl+C means


class WorkerPool:
    """One spawned worker process; jobs come back as asyncio futures; terminate() is immediate."""

    def __init__(self):
        ctx = multiprocessing.get_context("spawn")
        self.pool = ctx.Pool(1, initializer=_ignore_sigint)

    def submit(self, job):
        loop = asyncio.get_event_loop()
        fut = loop.create_future()

        def done(value, fail=False):
            if not fut.done():
                (fut.set_exception if fail else fut.set_result)(value)
        self.pool.apply_async(run_job, (job,),
                              callback=lambda r: loop.call_soon_threadsafe(done, r),
                              error_callback=lambda e: loop.call_soon_threadsafe(done, e, True))
        return fut

    def close(self):
        self.pool.terminate()
        self.pool.join()


class InlinePool:
    """Runs jobs in this process (tests, --eval): same interface, no parallelism."""

    def submit(self, job):
        fut = asyncio.get_event_loop().create_future()
        fut.set_result(run_job(job))
        return fut

    def close(self):
        pass


# ======================================================================================
# Trainer: warmup, then bursts on new material, with the held-out slice guarding memory.
# ======================================================================================
# The trainer owns when to learn; the worker owns how. Between jobs it re-trains BPE when
# the corpus has grown, grows the vocabulary, keeps the field current, and measures the
# held-out slice to set the model/field mixing weight lambda.

HELDOUT_MAX_TOKENS = 1024                 # cap on the held-out slice scored per evaluation
WARMUP_CHUNK_STEPS = 8                    # steps per warmup job (a few seconds of work)


class Trainer:
    def __init__(self, cfg, brain, memory, field, heldout_lines, pool, seed=0, ckpt_path=None, now=time.time):
        self.cfg = cfg
        self.brain = brain
        self.memory = memory
        self.field = field
        self.heldout_lines = heldout_lines
        self.pool = pool
        self.seed = seed
        self.ckpt_path = ckpt_path
        self.now = now
        self.rng = random.Random(seed)
        self.status = "idle"
        self.last_burst = now()
        self.last_save = now()
        # new chat bytes since the last burst: counted from the database, so material that was
        # waiting (or in a burst cut short by quitting) still triggers a burst after a restart
        self.pending_bytes = memory.chat_bytes_after(memory.get_state("burst_mark", 0))
        self.pending_grams = 0                # their n-grams ...
        self.pending_novel = 0                # ... and how many the field had not seen
        self._stream = None
        self._recall = None
        self._job_bytes = None                # (model, version, checkpoint bytes) for the next job
        self.refresh()
        self.lexicon = Lexicon(self.memory.corpus_lines())

    # -- corpus, tokenizer and field -------------------------------------------------------
    def refresh(self):
        """Re-encode the corpus and held-out slice and rebuild the field (after BPE changes)."""
        tok = self.brain.tok
        self.lines_ids = [tok.encode(line) for line in self.memory.corpus_lines()]
        self.field.grow_vocab(tok.vocab_size)
        self.field.rebuild(self.lines_ids)
        held = []
        for line in self.heldout_lines:
            held.extend(tok.encode(line) + [EOS])
            if len(held) >= HELDOUT_MAX_TOKENS:
                break
        self.heldout_stream = [EOS] + held[:HELDOUT_MAX_TOKENS]
        # bytes of UTF-8 text scored; each line end (EOS) counts as one byte, like a newline
        self.heldout_bytes = sum(len(tok.token_bytes(t)) or 1 for t in self.heldout_stream[1:])
        self._stream = None

    def recall(self):
        """The Recall index over the current corpus, rebuilt only when the corpus changed."""
        key = len(self.lines_ids)
        if self._recall is None or self._recall[0] != key:
            self._recall = (key, Recall(self.memory.corpus_lines()))
        return self._recall[1]

    def stream(self):
        """The training corpus as one token stream, EOS after every line."""
        if self._stream is None:
            out = [EOS]
            for ids in self.lines_ids:
                out.extend(ids)
                out.append(EOS)
            self._stream = out
        return self._stream

    def bpe_due(self):
        chars = self.memory.corpus_stats()["bytes"]
        done = self.brain.progress["bpe_chars"]
        if done == 0:
            return chars >= self.cfg.enable_bpe_after_chars
        return chars - done >= self.cfg.bpe_retrain_every_chars

    def maybe_retrain_bpe(self):
        """Append merges learned from the corpus, grow the model's rows, rebuild the field."""
        if not self.bpe_due() or self.cfg.bpe_num_merges == 0:
            return []
        brain = self.brain
        added = brain.tok.train(self.memory.corpus_lines(), self.cfg.bpe_num_merges)
        brain.progress["bpe_chars"] = self.memory.corpus_stats()["bytes"]
        if added:
            brain.model.grow_vocab(brain.tok.vocab_size)
            self.refresh()
            self.memory.log_event("bpe", "added %d merges; vocab %d" % (len(added), brain.tok.vocab_size))
        return added

    def add_lines(self, lines):
        """New conversation lines: stored, counted toward the next burst, taught to the field."""
        new = [l for l in lines if l]
        added = self.memory.add_corpus_lines(new, "chat")
        if not added:
            return 0
        for line in new[-added:]:
            ids = self.brain.tok.encode(line)
            n_grams = len(ids) + 1
            self.pending_novel += self.field.novelty(ids) * n_grams
            self.pending_grams += n_grams
            self.pending_bytes += len(text_to_bytes(line))
            self.field.add(ids)
            self.lines_ids.append(ids)
            self.lexicon.add(line)
        self._stream = None
        if self.memory.prune_corpus(self.cfg.max_corpus_lines, self.rng):
            self.refresh()
        return added

    # -- held-out evidence -------------------------------------------------------------------
    def field_probs(self):
        """Field probability of every held-out token, context = the tokens earlier in its line."""
        out, line = [], []
        for cur, nxt in zip(self.heldout_stream, self.heldout_stream[1:]):
            line = [] if cur == EOS else line + [cur]
            out.append(self.field.prob(line, nxt))
        return out

    def record_heldout(self, model_probs):
        """Bits per byte of network, field and mix; lambda from the evidence."""
        pf = self.field_probs()
        pairs = list(zip(model_probs, pf))
        lam = best_lambda(pairs)
        n = self.heldout_bytes

        def bpb(ps):
            return bits_per_byte(nll_of(ps), n)
        figures = {"model_bpb": bpb(model_probs), "field_bpb": bpb(pf),
                   "mix_bpb": bpb([lam * a + (1 - lam) * b for a, b in pairs]), "lambda": lam, "bytes": n}
        self.brain.progress["heldout"] = figures
        self.brain.progress["lambda"] = lam
        return figures

    # -- jobs --------------------------------------------------------------------------------
    def brain_bytes(self):
        """The brain as checkpoint bytes for a job: the worker's own bytes while nothing changed here.

        The progress inside them may be stale; the worker only carries it, and adopt keeps ours.
        """
        model = self.brain.model
        cached = self._job_bytes
        if cached is None or cached[0] is not model or cached[1] != model.version:
            self._job_bytes = (model, model.version, self.brain.to_bytes())
        return self._job_bytes[2]

    def make_job(self, steps, **kw):
        job = {"ckpt": self.brain_bytes(), "stream": self.stream(), "steps": steps,
               "heldout": heldout_windows(self.heldout_stream, self.cfg.block_size), "seed": self.seed}
        job.update(kw)
        return job

    def adopt(self, result):
        """Take the worker's weights; progress stays the trainer's own (it may have moved meanwhile)."""
        progress = self.brain.progress
        self.brain = Brain.from_body(parse_checkpoint(result["ckpt"]), self.cfg, self.seed)
        self.brain.progress = progress
        self._job_bytes = (self.brain.model, self.brain.model.version, result["ckpt"])
        progress["loss"] = sum(result["losses"]) / max(1, len(result["losses"]))
        progress["tokens_per_s"] = result.get("tokens", 0) / max(1e-9, result["seconds"])
        return self.brain

    async def warmup_chunk(self):
        cfg, brain = self.cfg, self.brain
        steps = min(WARMUP_CHUNK_STEPS, cfg.warmup_steps - brain.step)
        last = brain.step + steps >= cfg.warmup_steps
        self.status = "warmup"
        result = await self.pool.submit(self.make_job(steps, score_after=last))
        brain = self.adopt(result)
        if last:
            self.record_heldout(result["after"])
            brain.progress["warmup_done"] = True
            if cfg.freeze_base_after_warmup:
                brain.model.freeze_base()
                brain.model.add_delta()                  # bursts need something to train
            self.log_growth("warmup done")
            self.save()
        elif self.now() - self.last_save >= cfg.checkpoint_every_seconds:
            self.log_growth("warmup")
            self.save()

    def burst_due(self):
        cfg = self.cfg
        if not self.brain.progress["warmup_done"] or self.pending_bytes == 0:
            return False
        if self.now() - self.last_burst < cfg.qb_cooldown_seconds:
            return False
        novelty = self.pending_novel / max(1, self.pending_grams)
        return self.pending_bytes >= cfg.qb_min_bytes or novelty >= cfg.qb_min_novelty

    async def burst(self):
        """Train a burst on the new material; keep it only if the held-out loss allows."""
        cfg = self.cfg
        self.status = "burst"
        grow = self.rng.random() < cfg.delta_grow_prob and self.brain.model.n_deltas < cfg.max_delta_modules
        stream = self.stream()
        recent = max(0, len(stream) - max(cfg.seq_len * 2, self.pending_bytes))
        mark = self.memory.corpus_mark()
        self.pending_bytes = self.pending_grams = self.pending_novel = 0
        self.last_burst = self.now()
        job = self.make_job(cfg.micro_steps, score_before=True, score_after=True,
                            add_delta=grow, recent_from=recent)
        result = await self.pool.submit(job)
        kept = self.judge_burst(result, grow)
        self.memory.set_state("burst_mark", mark)     # kept or rolled back, this material is done
        return kept

    def judge_burst(self, result, grew):
        before, after = nll_of(result["before"]), nll_of(result["after"])
        change = (after - before) / max(before, 1e-12)
        progress = self.brain.progress
        progress["bursts"] = progress.get("bursts", 0) + 1
        if change > self.cfg.forget_tolerance:
            self.memory.log_growth(step=self.brain.step, vocab=self.brain.model.vocab_size,
                                   params=self.brain.model.num_params(), deltas=self.brain.model.n_deltas,
                                   loss=None, heldout_bpb=None, tokens_per_s=None,
                                   note="rejected burst: held-out loss %+.1f%%" % (100 * change))
            self.save()                                 # the weights are as they were; the count is new
            return False
        brain = self.adopt(result)
        self.record_heldout(result["after"])
        self.log_growth("burst%s: held-out loss %+.1f%%" % (" +delta" if grew else "", 100 * change))
        self.save()
        return True

    def log_growth(self, note):
        b, h = self.brain, self.brain.progress.get("heldout") or {}
        self.memory.log_growth(step=b.step, vocab=b.model.vocab_size, params=b.model.num_params(),
                               deltas=b.model.n_deltas, loss=b.progress.get("loss"),
                               heldout_bpb=h.get("mix_bpb"), tokens_per_s=b.progress.get("tokens_per_s"),
                               note=note)

    def save(self):
        if self.ckpt_path:
            self.brain.save(self.ckpt_path)
        self.last_save = self.now()

    async def tick(self):
        """One unit of work -> True if something was done."""
        if self.maybe_retrain_bpe():
            return True
        if not self.brain.progress["warmup_done"]:
            await self.warmup_chunk()
            return True
        if self.burst_due():
            await self.burst()
            return True
        self.status = "waiting for new material"
        return False

    async def run(self, log):
        """The background task: never raises except cancellation; errors are logged and stop training."""
        try:
            while True:
                if not await self.tick():
                    await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            raise
        except Exception as e:                     # the trainer's top-level boundary
            self.status = "stopped after an error: %s" % e
            self.memory.log_event("error", "trainer: %s: %s" % (type(e).__name__, e))
            log("trainer stopped: %s (chat continues; see /status)" % e)


# ======================================================================================
# Voice: the reply, sampled from the mix lambda * network + (1 - lambda) * field.
# ======================================================================================

FALLBACK_REPLY = "I have no words for that yet."
SENTENCE_ENDS = (".", "!", "?", "\u3002", "\uff01", "\uff1f")
HISTORY_MESSAGES = 6                       # earlier messages that go into the prompt
LOCAL_FIELD_WEIGHT = 0.5                   # share of the recalled answers in the field's voice


def format_turn(role, text):
    return ("H: " if role == "user" else "A: ") + " ".join(text.split())


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

    def reply(self, brain, field, lam, history, user_text, recalled=(), lexicon=None, attempts=4):
        """A non-empty reply that does not repeat one of the recent ones (when avoidable)."""
        local = None
        if recalled:
            local = NGramField(field.order, field.vocab_size, field.discount)
            for line in recalled:
                local.add(brain.tok.encode(line))
        said = {text for role, text in history if role == "assistant"}
        text = ""
        for _ in range(attempts):
            text = self.generate(brain, field, lam, history, user_text, local, lexicon) or text
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
# Session: the thin coordinator that wires memory, brain, field, trainer and voice together.
# ======================================================================================

HELP = """commands:
  /help              this text
  /status            training progress, held-out figures, sizes
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
        if os.path.exists(ckpt_path):
            brain = Brain.load(ckpt_path, cfg, seed)
        else:
            brain = Brain.fresh(cfg, seed)
        self.memory = Memory(db_path)
        try:
            if self.memory.get_state("seed_digest") != file_digest(seed_lines):
                self.memory.add_corpus_lines(train_lines, "seed")
                self.memory.set_state("seed_digest", file_digest(seed_lines))
            cfg = self.apply_saved_settings(cfg)
            self.cfg = cfg
            field = NGramField(cfg.field_order, brain.tok.vocab_size, cfg.field_discount)
            self.trainer = Trainer(cfg, brain, self.memory, field, heldout, pool or InlinePool(), seed, ckpt_path)
            self.trainer.maybe_retrain_bpe()                  # the tokenizer is ready from the first reply
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
        recalled = self.trainer.recall().answers_for(text)
        self.trainer.lexicon.add(text)                         # words you use are words it may use
        reply = self.voice.reply(self.brain, self.trainer.field, self.brain.progress["lambda"], history, text,
                                 recalled, self.trainer.lexicon)
        self.memory.add_message("assistant", reply)
        self.trainer.add_lines(turn_to_corpus_lines(text, reply))
        return reply

    def command(self, line):
        """A /command -> (text to show, whether to quit)."""
        parts = line.split()
        name = parts[0].lower()
        if name == "/help":
            return HELP, False
        if name == "/status":
            return self.status(), False
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
        tps = p.get("tokens_per_s")
        if not p["warmup_done"]:
            left = max(0, cfg.warmup_steps - b.step)
            eta = left * cfg.batch_size * cfg.seq_len / tps if tps else None
            phase = "warmup step %d/%d | eta %s" % (b.step, cfg.warmup_steps, format_duration(eta))
        else:
            phase = "warmup done | step %d | bursts %d (%d rejected)" % (
                b.step, p.get("bursts", 0), self.memory.rejected_bursts())
        loss = "%.3f" % p["loss"] if p.get("loss") is not None else "-"
        lines = ["%s | loss %s | %s tok/s | trainer: %s"
                 % (phase, loss, "%.0f" % tps if tps else "-", self.trainer.status)]
        h = p.get("heldout")
        if h:
            lines.append("held-out bits/byte: network %.3f | field %.3f | mix %.3f | lambda %.2f (%d bytes)"
                         % (h["model_bpb"], h["field_bpb"], h["mix_bpb"], h["lambda"], h["bytes"]))
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


async def chat(session, interactive, train, pool):
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
    task = loop.create_task(session.trainer.run(log)) if train else None
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
        session.save()
        if interactive and not hung_up:
            say_if_possible("saved. goodbye.")


# ======================================================================================
# Eval: held-out bits per byte of network, field and mix on a file, one document per line.
# ======================================================================================

def train_first_tokenizer(tok, cfg, train_lines):
    """The merges a first run learns from the seed's training lines (none below the threshold)."""
    if sum(len(text_to_bytes(l)) for l in train_lines) >= cfg.enable_bpe_after_chars:
        tok.train(train_lines, cfg.bpe_num_merges)
    return tok


def evaluate_file(path, cfg, corpus_path, ckpt_path, seed=0, out=print):
    lines = read_corpus_file(path, "eval file")
    if not lines:
        raise MacroError("eval file %s has no non-blank lines to score" % path)
    brain = Brain.load(ckpt_path, cfg, seed) if os.path.exists(ckpt_path) else Brain.fresh(cfg, seed)
    train, _ = split_heldout(read_corpus_file(corpus_path), cfg.heldout_every)
    if brain.tok.vocab_size == N_BASE_VOCAB:
        train_first_tokenizer(brain.tok, cfg, train)           # what a first run would do
        brain.model.grow_vocab(brain.tok.vocab_size)
    field = NGramField(cfg.field_order, brain.tok.vocab_size, cfg.field_discount)
    field.rebuild([brain.tok.encode(l) for l in train])
    nll = {"network": 0.0, "field": 0.0, "mix": 0.0}
    lam, n_bytes = brain.progress.get("lambda", 0.0), 0
    for text in lines:
        ids = brain.tok.encode(text) + [EOS]
        stream = [EOS] + ids
        pm = target_probs(brain.model, heldout_windows(stream, cfg.block_size))
        pf = [field.prob(ids[:i], t) for i, t in enumerate(ids)]
        for a, b in zip(pm, pf):
            nll["network"] -= math.log(max(a, 1e-300))
            nll["field"] -= math.log(max(b, 1e-300))
            nll["mix"] -= math.log(max(lam * a + (1 - lam) * b, 1e-300))
        n_bytes += len(text_to_bytes(text)) + 1                # + 1 for the line end
    result = {k: round(bits_per_byte(v, n_bytes), 4) for k, v in nll.items()}
    result.update({"bytes": n_bytes, "lines": len(lines), "lambda": lam, "step": brain.step,
                   "checkpoint": ckpt_path if os.path.exists(ckpt_path) else None})
    out("%s: %d bytes in %d lines | bits/byte: network %.3f | field %.3f | mix %.3f (lambda %.2f, step %d)"
        % (path, n_bytes, len(lines), result["network"], result["field"], result["mix"], lam, brain.step))
    out(json.dumps(result, sort_keys=True))
    return result


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


def bench_model(cfg, steps=5, n_seq=4, T=64, gen_tokens=200, prompt_tokens=16, out=print):
    rng = random.Random(0)
    model = GPT(cfg, N_BASE_VOCAB, seed=0)
    opt = Adam(cfg)
    rates = []
    for i in range(steps + 1):                                # the first step is a warm-up
        seqs = [[rng.randrange(N_BASE_VOCAB) for _ in range(T + 1)] for _ in range(n_seq)]
        t0 = time.perf_counter()
        loss = train_step(model, opt, [s[:-1] for s in seqs], [s[1:] for s in seqs], lr_at(i, cfg))
        dt = time.perf_counter() - t0
        if i:
            rates.append(n_seq * T / dt)
            out("train step %d/%d | loss %.3f | %.0f tok/s" % (i, steps, loss, rates[-1]))
    cache = model.new_cache()
    for tok in [rng.randrange(N_BASE_VOCAB) for _ in range(prompt_tokens)]:
        logits = model.step(cache, tok)
    t0 = time.perf_counter()
    for _ in range(gen_tokens):
        logits = model.step(cache, max(range(len(logits)), key=logits.__getitem__))
    gen_rate = gen_tokens / (time.perf_counter() - t0)
    return {"train_tokens_per_s": round(_median(rates), 1), "gen_tokens_per_s": round(gen_rate, 1),
            "params": model.num_params(),
            "train_flops_per_token": 3 * 2 * forward_macs_per_token(cfg, N_BASE_VOCAB, T)}


def bench_tokenizer(lines, num_merges):
    """Seconds to learn num_merges merges on lines, and encode throughput (bytes/s) after."""
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
            "tokens_per_byte": round(n_tokens / n_bytes, 4)}


def run_bench(cfg, corpus_path=None, out=print):
    t0 = time.perf_counter()
    result = {"python": sys.version.split()[0], "config": cfg.to_dict(),
              "kernel": "math.dist" if _dist is not None else "sum(map(mul))",
              "gen_kernel": "float" if cfg.exact_generation else "64-bit fixed point"}
    result["naive_mflops"] = round(bench_naive_mflops(256, cfg.n_embd, 4 * cfg.n_embd), 1)
    result.update(bench_model(cfg, out=out))
    result["train_mflops"] = round(result["train_tokens_per_s"] * result["train_flops_per_token"] / 1e6, 1)
    if corpus_path:
        result.update(bench_tokenizer(read_corpus_file(corpus_path), cfg.bpe_num_merges))
    result["bench_seconds"] = round(time.perf_counter() - t0, 1)
    out("python %s | kernel %s, generation %s | %d params"
        % (result["python"], result["kernel"], result["gen_kernel"], result["params"]))
    out("train %.0f tok/s (%.0f MFLOP/s) | generate %.0f tok/s | naive matmul %.0f MFLOP/s"
        % (result["train_tokens_per_s"], result["train_mflops"], result["gen_tokens_per_s"],
           result["naive_mflops"]))
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
    except (OSError, ValueError) as e:
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
    p.add_argument("--version", action="version", version="macrogpt " + VERSION)
    return p


def run(args):
    cfg = load_config(args.config)
    corpus = args.corpus or default_corpus_path()
    check_paths(args)
    if args.bench:
        run_bench(cfg, corpus, out=say)
        return 0
    if args.eval:
        evaluate_file(args.eval, cfg, corpus, args.ckpt, args.seed, out=say)
        return 0
    if args.tokenize is not None:
        say(format_tokenization(_tokenizer_for(cfg, corpus, args.ckpt, args.seed), args.tokenize))
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
    with terminal_signals_ignored():
        pool = WorkerPool() if train else None
    try:
        session = Session(cfg, corpus, args.db, args.ckpt, args.seed, pool)
        try:
            asyncio.run(chat(session, interactive, train, pool))
            quit_on_signals()                                  # the loop's handlers went with it
        finally:
            session.close()
    finally:
        if pool is not None:
            pool.close()
    return 0


def _tokenizer_for(cfg, corpus, ckpt, seed):
    """The checkpoint's tokenizer, or the one a first run would train, without writing anything."""
    if os.path.exists(ckpt):
        return Brain.load(ckpt, cfg, seed).tok
    train, _ = split_heldout(read_corpus_file(corpus), cfg.heldout_every)
    return train_first_tokenizer(Tokenizer(), cfg, train)


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


@contextlib.contextmanager
def terminal_signals_ignored():
    """Processes spawned meanwhile start with SIGINT and SIGHUP ignored (that survives exec): a Ctrl+C
    or a closed terminal reaches the whole process group, and only the parent should decide what
    it means (a worker killed mid-job can hang Pool.terminate). The parent's handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [getattr(signal, n) for n in ("SIGINT", "SIGHUP") if hasattr(signal, n)]
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


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
