"""Shared test fixtures: paths, tiny configs, a synthetic corpus, gradient check, and the CLI base case.

Not a test module (unittest discovery skips it); every test module takes what it shares from here,
so no test module imports another.
"""
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

import macrogpt as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "macrogpt.py")


# -- autograd --------------------------------------------------------------------------------

H = 1e-5           # finite-difference step
TOL = 1e-5         # max relative error, |a - n| / max(|a|, |n|, FLOOR)
FLOOR = 1e-3       # below this size a gradient entry is compared absolutely


def max_rel_error(build, params, samples=40, seed=0):
    """Compare analytic grads of build() (a 1x1 Tensor) with central differences."""
    loss = build()
    loss.backward()
    analytic = [[list(r) for r in p.grad] if p.grad is not None else None for p in params]
    for p in params:
        p.grad = None
    rng = random.Random(seed)
    worst = 0.0
    for pi, p in enumerate(params):
        coords = [(i, j) for i in range(len(p.data)) for j in range(len(p.data[0]))]
        rng.shuffle(coords)
        for i, j in coords[:samples]:
            old = p.data[i][j]
            p.data[i][j] = old + H
            up = build().data[0][0]
            p.data[i][j] = old - H
            down = build().data[0][0]
            p.data[i][j] = old
            numeric = (up - down) / (2 * H)
            a = analytic[pi][i][j] if analytic[pi] is not None else 0.0
            worst = max(worst, abs(a - numeric) / max(abs(a), abs(numeric), FLOOR))
    return worst


# -- model -----------------------------------------------------------------------------------

V = 23


def tiny_config(**kw):
    base = dict(n_layer=2, n_embd=8, n_head=2, block_size=12, seq_len=8, delta_rank=2,
                max_delta_modules=3, lr_warmup_steps=2, lr_decay_steps=50, init_std=0.3)
    base.update(kw)
    return M.Config(**base)


def random_batch(rng, n_seq, T, vocab=V):
    seqs = [[rng.randrange(vocab) for _ in range(T + 1)] for _ in range(n_seq)]
    return [s[:-1] for s in seqs], [s[1:] for s in seqs]


def train_delta_randomly(model, rng, scale=0.3):
    """Give every delta's A non-zero values so adapters actually contribute."""
    for _, t in model.delta_params():
        if _.endswith(".A"):
            t.data = [[rng.gauss(0, scale) for _ in r] for r in t.data]
    model.touch()


# -- trainer ---------------------------------------------------------------------------------

TOPICS = ["sea", "rain", "cat", "book", "moon", "tea", "snow", "bird", "river", "song", "lamp", "bread"]


def tiny_trainer_config(**kw):
    base = dict(n_layer=1, n_embd=8, n_head=2, block_size=16, seq_len=12, batch_size=2, warmup_steps=16,
                micro_steps=3, lr_warmup_steps=2, lr_decay_steps=100, enable_bpe_after_chars=200,
                bpe_num_merges=20, bpe_retrain_every_chars=10 ** 6, field_order=3, heldout_every=5,
                qb_min_bytes=10, qb_cooldown_seconds=30.0, delta_grow_prob=0.0, checkpoint_every_seconds=0.0)
    base.update(kw)
    return M.Config(**base)


def synthetic_corpus():
    lines = []
    for i, a in enumerate(TOPICS):
        b = TOPICS[(i + 3) % len(TOPICS)]
        lines += ["H: how is the %s today?" % a, "A: the %s is quiet, like the %s." % (a, b),
                  "H: do you like the %s?" % b, "A: I like the %s when it is calm." % b]
    return lines


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


# -- export ----------------------------------------------------------------------------------

MIXED = "Hi, wörld! 世界 123 привет مرحبا e\u0301 🙂🙂  \t\n x__y ²½ Ⅻ \x1c\u00a0a_1"


def trained_tokenizer():
    tok = M.Tokenizer()
    tok.train(synthetic_corpus() + ["世界 世界 привет привет 123 123"], 30)
    return tok


def brain_with_deltas(cfg, head_deltas=True, seed=1):
    """A brain whose two delta modules are live (A != 0), so merging is visible in every output."""
    tok = trained_tokenizer()
    model = M.GPT(cfg, tok.vocab_size, seed=seed)
    model.add_delta()
    model.add_delta()
    rng = random.Random(seed)
    for name, t in model.delta_params():
        if name.endswith(".A") and (head_deltas or not name.startswith("lm_head")):
            t.data = [[rng.gauss(0.0, 0.2) for _ in row] for row in t.data]
    model.touch()
    progress = M.Progress()
    progress.bpe_chars = 1234
    return M.Brain(model, M.Adam(cfg), 77, tok, progress)


# -- the real program ------------------------------------------------------------------------

TINY = dict(n_layer=1, n_embd=8, n_head=2, block_size=24, seq_len=12, batch_size=2, warmup_steps=16,
            micro_steps=3, lr_warmup_steps=2, lr_decay_steps=100, enable_bpe_after_chars=200,
            bpe_num_merges=20, field_order=3, heldout_every=5, checkpoint_every_seconds=0.0,
            max_gen_tokens=30, idle_training=False)


class CliCase(unittest.TestCase):
    """The program in a subprocess, in a fresh folder with the synthetic corpus and TINY; no tests of its own."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.corpus = self.path("corpus.txt")
        with open(self.corpus, "w", encoding="utf-8") as f:
            f.write("\n".join(synthetic_corpus() + ["héllo мир 世界 🙂"]) + "\n")
        with open(self.path("tiny.json"), "w") as f:
            json.dump(TINY, f)

    def path(self, name):
        return os.path.join(self.dir, name)

    def args(self, *extra):
        return [sys.executable, SCRIPT, "--corpus", self.corpus, "--config", "tiny.json"] + list(extra)

    def run_cli(self, *extra, stdin=b""):
        p = subprocess.run(self.args(*extra), input=stdin, cwd=self.dir, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=120)
        return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")

    def status_until(self, proc, pattern, timeout=90):
        """Ask /status until its output matches pattern; the answer lines are read as they come."""
        import re
        deadline = time.time() + timeout
        while time.time() < deadline:
            proc.stdin.write(b"/status\n")
            proc.stdin.flush()
            text = b"".join(proc.stdout.readline() for _ in range(3)).decode("utf-8", "replace")
            m = re.search(pattern, text)
            if m:
                return m
            time.sleep(0.3)
        self.fail("no status matched %r" % pattern)


def train_step(model, opt, inputs, targets, lr):
    """One forward, backward and Adam update of a bare model -> the mean loss (nats)."""
    loss = M.backward_step(model, inputs, targets)
    opt.update(model.named_params(), lr)
    model.touch()
    return loss


def save_checkpoint(path, model, opt, step, extra=None):
    M.atomic_write(path, M.checkpoint_bytes(model, opt, step, extra))


def corpus_lines(memory):
    return [line for _, line in memory.corpus_rows()]
