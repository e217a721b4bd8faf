"""Fuzz every reader of macrogpt with mutated valid inputs; seeded, standard library only.

Not a unit test module (tests/test_fuzz.py runs a small sample of it). Run from the repository root:
    python tests/fuzz.py --reader all --cases 10000 --seed 1      (each reader, in a child process)
    python tests/fuzz.py --reader checkpoint --seed 1 --case 123   (one case here, with its traceback)
    python tests/fuzz.py --cli --cases 30                           (each case through `python macrogpt.py`)

Readers: checkpoint, database, config (--config JSON), corpus, the Hugging Face folder's three files
(hf-weights, hf-config, hf-tokenizer, as --export writes them) and repl (lines typed at the chat).
Each case writes the valid files of a small organism into an empty folder, mutates one input
(bit flips, truncations, splices, huge numbers, deep JSON, wrong types, invalid UTF-8), calls the
reader, and if that accepts the input, chats with the result through the real REPL loop (`chat`).
A case ends as one of
    error      a MacroError: the one line `macrogpt: error: ...` the CLI prints (repl: error:/usage: answers)
    load       the input was accepted and the chat ran (repl: every line answered, none refused)
    traceback  anything else escaped, or an error message spans lines
    hang       the case used over 10 s of CPU time, or was blocked over 60 s (the machine may be shared)
    memory     the case's peak resident memory passed 200 MB (Linux), or MemoryError
    changed    a file of the folder changed that the case was not meant to write
Only the last four are failures; the exit code is 1 if any occurred. Cases run in a child
process (a case stuck in C code is killed from outside), and a case's seed is its reader and
number, so any one reproduces alone. With --cli the program itself reads each case: it must exit 0,
or 2 with one line `macrogpt: error: ...` on stderr, and never print a traceback.
"""
import argparse
import hashlib
import io
import json
import os
import queue
import random
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import macrogpt as M                                       # noqa: E402

READERS = ("checkpoint", "database", "config", "corpus", "hf-weights", "hf-config", "hf-tokenizer", "repl")
FAILURES = ("traceback", "hang", "memory", "changed")
HANG_SECONDS = 10.0                                        # of CPU time, so a busy machine does not fake a hang
BLOCKED_SECONDS = 60.0                                     # of wall time: a case waiting on something
MEMORY_LIMIT = 200 * 2 ** 20                               # peak RSS of one case
TINY = dict(n_layer=1, n_embd=8, n_head=2, block_size=24, seq_len=12, batch_size=2, warmup_steps=16,
            micro_steps=3, lr_warmup_steps=2, lr_decay_steps=100, enable_bpe_after_chars=200,
            bpe_num_merges=20, field_order=3, heldout_every=5, checkpoint_every_seconds=0.0,
            min_gen_tokens=4, max_gen_tokens=16, idle_training=False, train_workers=1)
TOPICS = ("sea", "moon", "forest", "rain", "city", "river", "music", "winter")
CHAT = ["/status", "how is the sea today?", "/growth"]      # what a case says to an accepted input
CKPT, DB, CORPUS, CONFIG, HF = "macrogpt.ckpt", "memory.sqlite3", "corpus.txt", "config.json", "hf"
REFUSALS = ("error:", "usage:", "unknown command")     # how the REPL answers a line it cannot take
HF_FILES = {"hf-weights": "model.safetensors", "hf-config": "config.json", "hf-tokenizer": "tokenizer.json"}


def corpus_lines():
    lines = []
    for i, a in enumerate(TOPICS):
        b = TOPICS[(i + 3) % len(TOPICS)]
        lines += ["H: how is the %s today?" % a, "A: the %s is quiet, like the %s." % (a, b),
                  "H: do you like the %s?" % b, "A: I like the %s when it is calm." % b]
    return lines + ["H: héllo мир 世界 🙂", "A: naïve café — ½ ² Ⅻ ٣٤٥", "tabs\tand  spaces"]


# -- fixtures: the valid files every case starts from, built once per process ----------------

class Fixtures:
    """A small organism's files (checkpoint, database, corpus, config, HF export) as bytes."""

    def __init__(self, folder):
        self.folder = folder
        self.cfg = M.Config(**TINY)
        self.files = {}                        # relative path -> bytes
        with mock.patch.object(M.time, "time", lambda: 1.7e9), quiet():
            self._build()

    def _build(self):
        join = lambda name: os.path.join(self.folder, name)     # noqa: E731
        with open(join(CORPUS), "w", encoding="utf-8") as f:
            f.write("\n".join(corpus_lines()) + "\n")
        with open(join(CONFIG), "w", encoding="utf-8") as f:
            json.dump(TINY, f, indent=1)
        session = M.Session(self.cfg, join(CORPUS), join(DB), join(CKPT), seed=0, pool=M.Pool(0, 0))
        try:
            for line in ("how is the moon today?", "do you like the rain?"):
                session.respond(line)
            session.command("/set top_k 20")
            brain = session.brain
            seq = brain.tok.encode(" ".join(corpus_lines()[:4]))[:13]
            M.backward_step(brain.model, [seq[:-1]], [seq[1:]])
            brain.opt.update(brain.model.named_params(), 0.01)
            brain.model.add_delta()
            rng = random.Random(0)
            for name, t in brain.model.delta_params():
                if name.endswith(".A") and not name.startswith("lm_head"):   # a tied head stays tied
                    t.data = [[rng.gauss(0.0, 0.2) for _ in row] for row in t.data]
            brain.model.touch()
            p = brain.progress
            p.warmup_done, p.lam, p.bursts, p.loss, p.tokens_per_s = True, 0.4, 2, 3.2, 150.0
            p.heldout = M.Heldout(model_bpb=4.1, field_bpb=3.9, mix_bpb=3.7, lam=0.4, bytes=300, nll=850.0)
            p.best_nll = 850.0
            for step in (16, 19, 22):
                session.memory.log_growth(step=step, vocab=brain.model.vocab_size, params=brain.model.num_params(),
                                          deltas=1, loss=3.0, heldout_bpb=3.7 + step / 100, tokens_per_s=150.0,
                                          note="burst" if step > 16 else "warmup", network_bpb=4.1, field_bpb=3.9)
            session.memory.log_event("note", "fixture")
            session.memory.set_state("burst_mark", session.memory.corpus_mark())
            session.save()
            M.export_hf(brain, join(HF))
            self.tok = brain.tok                            # with merges: what reads the corpus
        finally:
            session.close()
        for name in (CKPT, DB, CORPUS, CONFIG) + tuple(os.path.join(HF, n) for n in sorted(os.listdir(join(HF)))):
            with open(join(name), "rb") as f:
                self.files[name] = f.read()


# -- mutations: bytes, JSON values, SQL rows ---------------------------------------------------

INVALID_UTF8 = (b"\xff", b"\xfe\xff", b"\x80", b"\xc3", b"\xc0\xaf", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                b"\xf0\x9f\x99", b"\x00", b"\r", b"\x1b[2J", "\u2028".encode(), "\ufeff".encode())
INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, ord('"'), ord("\\"), ord("{"), ord("]"), ord("9"), ord("-"), ord("\n"), ord(" "))


DEEP = "\x00deep\x00"                                     # replaced by deep nesting after json.dumps
BIG = "\x00big\x00"                                       # replaced by thousands of digits (past 3.11's int limit)


def huge_int(rng):
    return rng.choice([2 ** 31, 2 ** 32, 2 ** 63, 2 ** 64, -2 ** 63, 10 ** rng.randrange(6, 400),
                       -10 ** rng.randrange(6, 400), BIG])


def big_digits(rng):
    return "9" * rng.choice([4301, 5000, 50000])


def odd_value(rng):
    """A value of a surprising kind or size for a JSON or SQL slot."""
    kind = rng.randrange(6)
    if kind == 0:
        return huge_int(rng)
    if kind == 1:
        return rng.choice([1e308, -1e308, 5e-324, -0.0, float("nan"), float("inf"), float("-inf"), 0.5, -1.5])
    if kind == 2:
        return rng.choice([0, 1, -1, 2, 3, 255, 256, 258, 259, 1000])
    if kind == 3:
        return rng.choice(["", "x", "0", "1e999", "\n", "\ud800", "é\u0301", "a\nb", "A" * rng.choice([300, 10 ** 5])])
    if kind == 4:
        return rng.choice([None, True, False])
    return rng.choice([[], {}, [1, 2], {"a": 1}, [[]], [None], ["x", 1]])


def mutate_bytes(rng, data, donors):
    """One to three byte-level edits -> (bytes, description)."""
    data, done = bytearray(data), []
    for _ in range(1 if rng.random() < 0.6 else rng.randrange(2, 4)):
        op = rng.choice(("flip", "byte", "truncate", "cut", "dup", "splice", "utf8", "garbage") * 4 + ("blank",))
        n = len(data)
        at = rng.randrange(n + 1)
        if op == "flip" and n:
            for _ in range(rng.randrange(1, 9)):
                i = rng.randrange(n)
                data[i] ^= 1 << rng.randrange(8)
        elif op == "byte" and n:
            for _ in range(rng.randrange(1, 5)):
                data[rng.randrange(n)] = rng.choice(INTERESTING) if rng.random() < 0.7 else rng.randrange(256)
        elif op == "truncate":
            del data[at:]
        elif op == "cut":
            del data[at:at + rng.randrange(1, 1 + max(1, n // 4))]
        elif op == "dup":
            a = rng.randrange(n + 1)
            data[at:at] = data[a:a + rng.randrange(1, 200)]
        elif op == "splice":
            donor = rng.choice(donors)
            a = rng.randrange(len(donor) + 1)
            piece = donor[a:a + rng.randrange(1, 400)]
            if rng.random() < 0.5:
                data[at:] = donor[a:]                     # this file's head, another's tail
            else:
                data[at:at] = piece
        elif op == "blank":
            data[:] = rng.choice([b"", b"\n", b" \t\r\n\x0c", b"\xef\xbb\xbf"])
        elif op == "utf8":
            data[at:at] = rng.choice(INVALID_UTF8) * rng.choice([1, 1, 3, 1000])
        else:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 65)))
        done.append(op)
    return bytes(data), "bytes:" + "+".join(done)


def json_paths(obj, path=()):
    """Every (path) inside a JSON value, the root included."""
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(json_paths(v, path + (k,)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.extend(json_paths(v, path + (i,)))
    return out


def mutate_json(rng, obj, prefer=None):
    """One edit of a JSON value at a random path -> (new value, description). prefer: path prefixes."""
    obj = json.loads(json.dumps(obj))
    paths = json_paths(obj)
    if prefer and rng.random() < 0.7:
        near = [p for p in paths if any(p[:len(q)] == q for q in prefer)]
        paths = near or paths
    path = rng.choice(paths)
    op = rng.choice(("value", "value", "value", "delete", "add", "deep", "tweak", "dup"))
    where = "/".join(map(str, path)) or "root"
    if op == "deep":
        new = DEEP
    elif op == "tweak":
        old = get_path(obj, path)
        if isinstance(old, bool) or old is None:
            new = not old
        elif isinstance(old, (int, float)):
            new = rng.choice([old + 1, old - 1, -old, old * 2, old * 1000, old / 3, old * 1e300])
        elif isinstance(old, str):
            i = rng.randrange(len(old) + 1)
            new = old[:i] + rng.choice(["\ud800", "\x00", "\n", " ", "é", "🙂", old[i:i + 1] * 50, ""]) + old[i + 1:]
        else:
            new = type(old)()
    else:
        new = odd_value(rng)
    if op in ("delete", "add", "dup") and path:
        parent = get_path(obj, path[:-1])
        key = path[-1]
        if op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent["zz_unknown" if op == "add" else str(key) + "_"] = new if op == "add" else parent[key]
        else:
            parent.insert(key, new if op == "add" else parent[key])
        return obj, "json:%s %s" % (op, where)
    if not path:
        return new, "json:root=%s" % short(new)
    get_path(obj, path[:-1])[path[-1]] = new
    return obj, "json:%s=%s" % (where, short(new))


def get_path(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def short(v):
    r = {DEEP: "deep nesting", BIG: "huge digits"}.get(v, repr(v)) if isinstance(v, str) else repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def dump_json(rng, obj, compact=True):
    """JSON text of a mutated value, deep nesting spliced in where DEEP stands -> bytes."""
    text = json.dumps(obj, separators=(",", ":") if compact else None)
    depth = rng.choice([50, 1000, 100000])
    text = text.replace(json.dumps(DEEP), "[" * depth + "]" * depth).replace(json.dumps(BIG), big_digits(rng))
    return text.encode("utf-8", "surrogatepass")


def sign_checkpoint(body):
    return ("%s %d %s\n" % (M.CKPT_MAGIC, M.CKPT_VERSION, hashlib.sha256(body).hexdigest())).encode("ascii") + body


def safetensors_parts(data):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n].decode("utf-8")), data[8 + n:]


def mutate_database(rng, path):
    """Edit a copy of the database with SQL (wrong types, huge values, missing tables) -> description."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        tables = {"messages": ("time", "role", "text"), "corpus": ("line", "source", "time"),
                  "events": ("time", "kind", "detail"), "growth": M.GROWTH_FIELDS, "state": ("key", "value")}
        op = rng.choice(("update", "update", "update", "state", "version", "drop", "delete", "insert"))
        table = rng.choice(sorted(tables))
        if op == "update":
            column = rng.choice(tables[table])
            value = odd_value(rng)
            if isinstance(value, (list, dict)):
                value = json.dumps(value)
            if isinstance(value, str) and (rng.random() < 0.3 or "\ud800" in value):
                value = value.encode("utf-8", "surrogatepass") + rng.choice(INVALID_UTF8)
            if value == BIG:
                value = big_digits(rng)
            elif isinstance(value, int) and not -2 ** 63 <= value < 2 ** 63:
                value = str(value)
            db.execute("UPDATE %s SET %s = ? WHERE rowid IN (SELECT rowid FROM %s ORDER BY random() LIMIT ?)"
                       % (table, column, table), (value, rng.choice([1, 1, 1000])))
            return "sql:%s.%s=%s" % (table, column, short(value))
        if op == "state":
            key = rng.choice(["settings", "seed_digest", "burst_mark", "other"])
            value = rng.choice([odd_value(rng), {"top_k": odd_value(rng)}, {rng.choice(M.SAMPLING_KEYS): odd_value(rng)},
                                {"top_k": 20, "temperature": odd_value(rng)}, DEEP])
            value = dump_json(rng, value).decode("utf-8") if rng.random() < 0.9 else rng.choice(["{", "", "nan"])
            db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))
            return "sql:state %s=%s" % (key, short(value))
        if op == "version":
            v = rng.choice([0, 1, 3, -1, 2 ** 31 - 1, -2 ** 31])
            db.execute("PRAGMA user_version = %d" % v)
            return "sql:user_version=%d" % v
        if op == "drop":
            db.execute("DROP TABLE %s" % table)
            return "sql:drop %s" % table
        if op == "delete":
            db.execute("DELETE FROM %s" % table)
            return "sql:delete %s" % table
        db.execute("CREATE TABLE zz (x)" if rng.random() < 0.5 else "CREATE INDEX zz ON %s (%s)" % (table, tables[table][0]))
        return "sql:schema addition"
    except sqlite3.Error as e:
        return "sql:failed (%s)" % e
    finally:
        db.close()


# -- one case: its files, the reader, the chat, the checks -------------------------------------

class Hang(BaseException):
    """Raised by the watchdog alarm; a BaseException, so no `except Exception` in macrogpt stops it."""


def _on_alarm(signum, frame):
    raise Hang()


class quiet:
    """sys.stdin/stdout/stderr as in-memory files for the duration (chat reads stdin.buffer)."""

    def __init__(self, stdin=b""):
        self.stdin = stdin

    def __enter__(self):
        self.saved = sys.stdin, sys.stdout, sys.stderr
        sys.stdin = io.TextIOWrapper(io.BytesIO(self.stdin), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
        sys.stderr = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
        return self

    def output(self):
        return sys.stdout.buffer.getvalue().decode("utf-8")

    def __exit__(self, *exc):
        sys.stdin, sys.stdout, sys.stderr = self.saved
        return False


def snapshot(folder):
    """{relative path: sha256} of every file below folder (SQLite's -shm index left out: readers touch it)."""
    out = {}
    for base, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(base, name)
            if name.endswith("-shm"):
                continue
            with open(full, "rb") as f:
                out[os.path.relpath(full, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


class Case:
    """One seeded case of one reader: the folder's files, what the reader may write, the outcome."""

    def __init__(self, fx, reader, seed, number, folder):
        self.fx, self.reader, self.folder = fx, reader, folder
        self.control = number is None          # the valid files as they are: every reader must accept them
        self.rng = random.Random("%d:%s:%s" % (seed, reader, number))
        self.files = dict(fx.files)
        self.writable = set()                  # files this case may change (after its reader accepted)
        self.mutation = ""
        self.lines = CHAT
        self.output = ""                       # what the chat printed
        self.cli = False                       # True: read through `python macrogpt.py` instead of in-process

    def path(self, name):
        return os.path.join(self.folder, name)

    def write(self):
        if os.path.exists(self.folder):
            shutil.rmtree(self.folder)
        for name, data in self.files.items():
            os.makedirs(os.path.dirname(self.path(name)), exist_ok=True)
            with open(self.path(name), "wb") as f:
                f.write(data)

    def chat(self, cfg, lines=None):
        """The real REPL loop (piped input, no training) over lines, then the exit save."""
        data = "".join(line + "\n" for line in (lines or self.lines)).encode("utf-8", "surrogateescape")
        session = M.Session(cfg, self.path(CORPUS), self.path(DB), self.path(CKPT), seed=0, pool=M.Pool(0, 0))
        threads, real = [], M.read_lines

        def read_lines(loop, queue, interactive, go):      # remembered, to be let go after the chat
            threads.append((M.threading.current_thread(), go))
            real(loop, queue, interactive, go)
        try:
            with quiet(data) as q, mock.patch.object(M, "read_lines", read_lines):
                try:
                    M.asyncio.run(M.chat(session, interactive=False, train=False))
                finally:
                    self.output = q.output()
                    for thread, go in threads:              # after /quit it waits for a turn that never comes;
                        while thread.is_alive():            # one process runs thousands of chats
                            go.set()
                            thread.join(0.05)
        finally:
            session.close()
        M.Brain.load_or_fresh(self.path(CKPT), cfg)                  # what the exit saved loads again

    def run_cli(self, args, writable, lines=None):
        """The real program in this folder: exit 0, or exit 2 with one line `macrogpt: error: ...`."""
        stdin = "".join(line + "\n" for line in lines or ()).encode("utf-8", "surrogateescape")
        argv = [sys.executable, os.path.join(ROOT, "macrogpt.py"), "--corpus", CORPUS, "--config", CONFIG,
                "--db", DB, "--ckpt", CKPT, "--quiet"] + args
        p = subprocess.run(argv, input=stdin, cwd=self.folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=BLOCKED_SECONDS)
        err = p.stderr.decode("utf-8", "replace")
        if "Traceback" in err or p.returncode not in (0, 2):
            raise AssertionError("exit %d: %s" % (p.returncode, short(err[-300:])))
        if p.returncode == 2:
            if len(err.splitlines()) != 1 or not err.startswith("macrogpt: error: "):
                raise AssertionError("not one line: %r" % err[:300])
            raise M.MacroError(err.strip())
        self.writable |= writable
        self.output = p.stdout.decode("utf-8", "replace")
        if self.reader == "repl":
            refused = [line for line in self.output.splitlines() if line.startswith(REFUSALS)]
            if refused:
                raise M.MacroError(refused[0])

    # Each reader: mutate self.files, then read; a MacroError is the one-line error.
    def checkpoint(self):
        raw, donors = self.files[CKPT], list(self.fx.files.values())
        head, body = raw.split(b"\n", 1)
        choice = 2 if self.control else self.rng.random()
        if choice > 1:
            pass
        elif choice < 0.25:
            raw, self.mutation = mutate_bytes(self.rng, raw, donors)
        elif choice < 0.5:
            body, self.mutation = mutate_bytes(self.rng, body, donors)
            raw = sign_checkpoint(body)
        else:
            prefer = [("config",), ("vocab_size",), ("delta_alphas",), ("params",), ("adam",), ("rng",),
                      ("extra",), ("step",), ("byteorder",), ("version",), ("n_deltas",)]
            obj, self.mutation = mutate_json(self.rng, json.loads(body), prefer)
            raw = sign_checkpoint(dump_json(self.rng, obj))
        self.files[CKPT] = raw
        self.write()
        if self.cli:
            return self.run_cli(["--prompt", CHAT[1]], {CKPT, DB})
        M.Brain.load_or_fresh(self.path(CKPT), self.fx.cfg)
        self.writable |= {CKPT, DB}
        self.chat(self.fx.cfg)

    def database(self):
        if self.control:
            self.write()
        elif self.rng.random() < 0.5:
            self.files[DB], self.mutation = mutate_bytes(self.rng, self.files[DB], [self.files[DB]])
            self.write()
        else:
            self.write()
            self.mutation = mutate_database(self.rng, self.path(DB))
            with open(self.path(DB), "rb") as f:
                self.files[DB] = f.read()
            self.write()                                    # the edit's -wal/-journal gone: one file
        if self.cli:
            return self.run_cli(["--no-train"], {CKPT, DB}, CHAT)
        M.Memory(self.path(DB)).close()
        self.writable |= {CKPT, DB}
        self.chat(self.fx.cfg)

    def config(self):
        if self.control:
            pass
        elif self.rng.random() < 0.4:
            self.files[CONFIG], self.mutation = mutate_bytes(self.rng, self.files[CONFIG], list(self.fx.files.values()))
        else:
            obj, self.mutation = mutate_json(self.rng, json.loads(self.files[CONFIG]))
            self.files[CONFIG] = dump_json(self.rng, obj, compact=False)
        self.write()
        if self.cli:
            try:
                small = small_model(M.load_config(self.path(CONFIG)))
            except M.MacroError:
                small = False
            if not small:                                   # the config is read, then the missing checkpoint refused
                return self.run_cli(["--ckpt", "absent.ckpt", "--export", "out"], set())
            os.remove(self.path(CKPT))
            return self.run_cli(["--prompt", CHAT[1]], {CKPT, DB})
        cfg = M.load_config(self.path(CONFIG))
        assert M.Config.from_dict(cfg.to_dict()) == cfg
        if small_model(cfg):                                # a big one is legal, just too slow to chat with here
            os.remove(self.path(CKPT))                      # a different shape starts fresh
            self.writable |= {CKPT, DB}
            self.chat(cfg)

    def corpus(self):
        if not self.control and self.rng.random() < 0.15:   # blank: no usable lines
            self.files[CORPUS] = self.rng.choice([b"", b"\n\n", b" \t\r\n\x0c\x1c\x85", b"\xef\xbb\xbf\n"])
            self.mutation = "blank"
        elif not self.control:
            self.files[CORPUS], self.mutation = mutate_bytes(self.rng, self.files[CORPUS], list(self.fx.files.values()))
        if self.rng.random() < 0.5:                         # a first run, or a known memory meeting new seed text
            for name in (DB, CKPT):
                del self.files[name]
        self.write()
        if self.cli:
            return self.run_cli(["--prompt", CHAT[1]], {CKPT, DB})
        lines = M.read_corpus_file(self.path(CORPUS))
        for line in lines:
            assert self.fx.tok.decode_bytes(self.fx.tok.encode(line)) == M.text_to_bytes(line), "lossless tokenization"
        self.writable |= {CKPT, DB}
        self.chat(self.fx.cfg)

    def hf(self, name):
        name = os.path.join(HF, name)
        data, donors = self.files[name], list(self.fx.files.values())
        choice = self.rng.random()
        if self.control:
            pass
        elif choice < 0.4:
            data, self.mutation = mutate_bytes(self.rng, data, donors)
        elif name.endswith(".safetensors"):
            header, rest = safetensors_parts(data)
            if choice < 0.8:
                header, self.mutation = mutate_json(self.rng, header)
                text = dump_json(self.rng, header)
                n = len(text)
            else:
                text = json.dumps(header).encode()
                n = self.rng.choice([0, 1, len(text) - 1, len(text) + 1, 2 ** 63, 2 ** 64 - 1, M.HF_MAX_HEADER + 1])
                self.mutation = "safetensors:header length %d" % n
            data = struct.pack("<Q", n) + text + rest
        else:
            obj, self.mutation = mutate_json(self.rng, json.loads(data.decode("utf-8")))
            data = dump_json(self.rng, obj)
        self.files[name] = data
        del self.files[CKPT]
        del self.files[DB]
        self.write()
        if self.cli:
            self.run_cli(["--import", HF], {CKPT})
            return self.run_cli(["--prompt", CHAT[1]], {CKPT, DB})
        M.import_hf(self.path(HF), self.path(CKPT), self.fx.cfg)
        self.writable |= {CKPT, DB}
        self.chat(self.fx.cfg)

    def repl(self):
        if not self.control:
            self.lines = [repl_line(self.rng) for _ in range(self.rng.randrange(1, 4))]
        self.mutation = "lines:%s" % short(self.lines)
        self.write()
        self.writable |= {CKPT}                             # the exit saves, as it always does
        if any(not line.strip().startswith("/") or line.split()[0].lower() == "/set" for line in self.lines if line.strip()):
            self.writable |= {DB}                            # a message or a /set is stored
        if self.cli:
            return self.run_cli(["--no-train"], self.writable, self.lines)
        self.chat(self.fx.cfg)
        refused = [line for line in self.output.splitlines() if line.startswith(REFUSALS)]
        if refused:
            raise M.MacroError(refused[0])                   # the REPL's one-line answer to a bad line

    def run(self):
        """-> (outcome, detail)."""
        before = None
        try:
            try:
                if self.reader.startswith("hf-"):
                    self.hf(HF_FILES[self.reader])
                else:
                    getattr(self, self.reader)()
                outcome, detail = "load", ""
            finally:
                before = {n: hashlib.sha256(d).hexdigest() for n, d in self.files.items()}
            after = snapshot(self.folder)
        except M.MacroError as e:
            outcome, detail = ("error", str(e)) if "\n" not in str(e) else ("traceback", "error spans lines: %r" % str(e))
            after = snapshot(self.folder)
        except Hang:
            return "hang", "over %g s of CPU time" % HANG_SECONDS
        except subprocess.TimeoutExpired:
            return "hang", "the program ran over %g s" % BLOCKED_SECONDS
        except MemoryError:
            return "memory", "MemoryError"
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            return "traceback", "%s: %s at %s" % (type(e).__name__, short(str(e)), where_raised(e))
        changed = sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n) and not allowed(n, self.writable))
        if changed:
            return "changed", "%s (%s)" % (", ".join(changed), outcome)
        return outcome, detail


def allowed(name, writable):
    base = name.split("-wal")[0].split("-journal")[0]
    return base in writable or name.endswith(".lock")        # the CLI's folder locks


def small_model(cfg):
    return (cfg.n_layer * cfg.n_embd ** 2 <= 10 ** 5 and cfg.block_size <= 4096 and cfg.max_gen_tokens <= 4096
            and cfg.bpe_num_merges <= 4096 and cfg.max_delta_modules <= 64 and cfg.delta_rank <= 64)


def where_raised(e):
    tb = traceback.extract_tb(e.__traceback__)
    inside = [f for f in tb if f.filename.endswith("macrogpt.py")] or tb
    return "%s:%d" % (os.path.basename(inside[-1].filename), inside[-1].lineno) if inside else "?"


def repl_line(rng):
    """A line as the REPL receives it: a command, its arguments, or a message, then mutated."""
    key = rng.choice(M.SAMPLING_KEYS)
    good = rng.choice(["/help", "/status", "/growth", "/save", "/set %s %s" % (key, rng.choice(["0.5", "3", "1"])),
                       "how is the sea today?", "do you like the moon?", "/quit", "/exit"])
    op = rng.randrange(7)
    if op == 0:
        return good
    if op == 1:                                              # a value of the wrong kind or size
        value = rng.choice([big_digits(rng) if huge_int(rng) == BIG else str(huge_int(rng)), "1e999", "-1e999", "nan", "inf", "-0", "0x10", "1_000", "٣", "²",
                            "", "abc", "[]", "0.0", "-5", "5e-324", "1e-320", "99999999999999999999", "9" * 5000])
        return rng.choice(["/set %s %s" % (key, value), "/set %s" % key, "/set %s %s extra" % (key, value),
                           "/set nokey %s" % value, "/SET %s %s" % (key.upper(), value), "/set %s %s" % (key, value)])
    if op == 2:
        raw, _ = mutate_bytes(rng, good.encode("utf-8"), [b"/set top_k", "世界🙂".encode()])
        return M.bytes_to_text(raw.replace(b"\n", b" "))
    if op == 3:
        return rng.choice(["/", "//", "/ set", "/help me", "/status now", "\t/help", "/" + "x" * 10 ** 5,
                           "x" * rng.choice([1000, 10 ** 5]), "\x1b[31mred", "\x00", "\ufeff/help", "\u2028"])
    if op == 4:
        return good + rng.choice([" ", "  extra args", "\x00", "\t\t", " " + "y" * 1000])
    if op == 5:
        return M.bytes_to_text(rng.choice(INVALID_UTF8) + good.encode("utf-8") + rng.choice(INVALID_UTF8))
    return "/set %s %s" % (rng.choice(["max_gen_tokens", "min_gen_tokens", "top_k", "repetition_guard"]),
                           rng.choice(["0", "1", "100000", str(2 ** 63), "-1"]))


# -- running cases: a worker process, and the parent that watches it ---------------------------

def peak_rss():
    """Peak resident bytes since the last reset (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_case(fx, reader, seed, number, folder):
    """-> (outcome, detail, mutation) for one case, with the hang and memory watchdogs."""
    case = Case(fx, reader, seed, number, folder)
    reset_peak_rss()
    alarm = hasattr(signal, "setitimer")
    if alarm:
        signal.signal(signal.SIGPROF, _on_alarm)
        signal.setitimer(signal.ITIMER_PROF, HANG_SECONDS)
    try:
        outcome, detail = case.run()
    except Hang:
        outcome, detail = "hang", "over %g s of CPU time" % HANG_SECONDS
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_PROF, 0)
    peak = peak_rss()
    if outcome not in FAILURES and peak is not None and peak > MEMORY_LIMIT:
        outcome, detail = "memory", "peak RSS %d MB" % (peak >> 20)
    return outcome, detail, case.mutation


def worker(jobs, seed, out):
    """Run jobs [(reader, first, last)] and write one JSON line per case to out."""
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2 ** 30, 4 * 2 ** 30))   # a runaway case fails, the machine lives
    except (ImportError, ValueError, OSError):
        pass
    tmp = tempfile.mkdtemp(prefix="macrogpt-fuzz-")
    try:
        os.mkdir(os.path.join(tmp, "fixture"))
        fx = Fixtures(os.path.join(tmp, "fixture"))
        out.write(json.dumps({"ready": True}) + "\n")
        out.flush()
        for reader, first, last in jobs:
            for number in range(first, last):
                outcome, detail, mutation = run_case(fx, reader, seed, number, os.path.join(tmp, "case"))
                out.write(json.dumps({"reader": reader, "case": number, "outcome": outcome, "detail": detail,
                                      "mutation": mutation}) + "\n")
                out.flush()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cli_sample(readers, cases, seed, first=0, log=None):
    """Cases read by the real program in a subprocess each -> the counts of fuzz(), [failures]."""
    results = {r: dict.fromkeys(("cases", "error", "load") + FAILURES, 0) for r in readers}
    failures = []
    tmp = tempfile.mkdtemp(prefix="macrogpt-fuzz-cli-")
    try:
        os.mkdir(os.path.join(tmp, "fixture"))
        fx = Fixtures(os.path.join(tmp, "fixture"))
        for reader in readers:
            started = time.monotonic()
            for number in range(first, first + cases):
                case = Case(fx, reader, seed, number, os.path.join(tmp, "case"))
                case.cli = True
                outcome, detail = case.run()
                results[reader]["cases"] += 1
                results[reader][outcome] += 1
                if outcome in FAILURES:
                    failures.append({"reader": reader, "case": number, "outcome": outcome, "detail": detail,
                                     "mutation": case.mutation, "seed": seed})
                    if log:
                        log("FAIL %s case %d: %s %s [%s]" % (reader, number, outcome, detail, case.mutation))
            results[reader]["seconds"] = time.monotonic() - started
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results, failures


def _pump(stream, q):
    for line in stream:
        q.put(line)
    q.put(None)


def fuzz(readers, cases, seed, first=0, log=None):
    """Run `cases` cases of each reader in child processes -> {reader: counts}, [failure records].

    A case that outruns the child's own alarm (a hang inside C code) is caught here: the child is
    killed, the case recorded as a hang, and a new child goes on with the next case.
    """
    results = {r: dict.fromkeys(("cases", "error", "load") + FAILURES, 0) for r in readers}
    for r in readers:
        results[r]["seconds"] = 0.0
    failures = []
    todo = [[r, first, first + cases] for r in readers]
    while todo:
        spec = ",".join("%s:%d:%d" % tuple(j) for j in todo)
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", spec, "--seed", str(seed)],
                                stdout=subprocess.PIPE, universal_newlines=True, encoding="utf-8")
        q = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, q), daemon=True).start()
        started = time.monotonic()
        timeout = 120.0                                      # the fixtures' build
        while todo:
            try:
                line = q.get(timeout=timeout)
            except queue.Empty:
                line = "timeout"
            if line is None or line == "timeout":
                reader, number = todo[0][0], todo[0][1]
                kind = "hang" if line == "timeout" else "traceback"
                detail = "killed after %g s" % timeout if line == "timeout" else "worker died (exit %s)" % proc.poll()
                record = {"reader": reader, "case": number, "outcome": kind, "detail": detail, "mutation": "?"}
                proc.kill()
                proc.wait()
                line = json.dumps(record)
            rec = json.loads(line)
            timeout = BLOCKED_SECONDS
            if rec.get("ready"):
                started = time.monotonic()
                continue
            reader = rec["reader"]
            counts = results[reader]
            counts["cases"] += 1
            counts[rec["outcome"]] += 1
            now = time.monotonic()
            counts["seconds"] += now - started
            started = now
            if rec["outcome"] in FAILURES:
                failures.append(dict(rec, seed=seed))
                if log:
                    log("FAIL %s case %d: %s %s [%s]" % (reader, rec["case"], rec["outcome"], rec["detail"], rec["mutation"]))
            if log and counts["cases"] % 1000 == 0:
                log("... %s: %d cases, %d errors, %d loads, %d failures, %.0f s"
                    % (reader, counts["cases"], counts["error"], counts["load"],
                       sum(counts[k] for k in FAILURES), counts["seconds"]))
            todo[0][1] = rec["case"] + 1
            if todo[0][1] >= todo[0][2]:
                todo.pop(0)
            if proc.poll() is not None and "killed" in rec["detail"]:
                break
        if proc.poll() is None and todo:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    return results, failures


def table(results):
    head = "%-13s %7s %7s %7s %9s %5s %6s %7s %8s" % ("reader", "cases", "errors", "loads", "tracebacks", "hangs",
                                                   "memory", "changed", "seconds")
    rows = [head]
    for r, c in results.items():
        rows.append("%-13s %7d %7d %7d %9d %5d %6d %7d %8.1f" % (r, c["cases"], c["error"], c["load"], c["traceback"],
                                                               c["hang"], c["memory"], c["changed"], c["seconds"]))
    return "\n".join(rows)


def reproduce(reader, seed, number, keep=None):
    """Run one case here, printing its mutation and any traceback in full."""
    tmp = tempfile.mkdtemp(prefix="macrogpt-fuzz-")
    try:
        os.mkdir(os.path.join(tmp, "fixture"))
        fx = Fixtures(os.path.join(tmp, "fixture"))
        case = Case(fx, reader, seed, number, os.path.join(tmp, "case"))
        outcome, detail = case.run()
        print("%s seed %d case %d: %s [%s] %s" % (reader, seed, number, outcome, case.mutation, detail))
        if outcome == "traceback":
            case = Case(fx, reader, seed, number, os.path.join(tmp, "case2"))
            try:
                case.hf(HF_FILES[reader]) if reader.startswith("hf-") else getattr(case, reader)()
            except M.MacroError:
                pass
            except BaseException:
                traceback.print_exc()
        if keep:
            shutil.copytree(case.folder, keep)
            print("files kept in %s" % keep)
        return 1 if outcome in FAILURES else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(prog="fuzz.py", description="Fuzz macrogpt's readers with mutated valid inputs.")
    p.add_argument("--reader", default="all", help="one of %s, or all" % ", ".join(READERS))
    p.add_argument("--cases", type=int, default=1000, help="cases per reader (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--first", type=int, default=0, help="number of the first case")
    p.add_argument("--case", type=int, help="run only this case, here, with its traceback")
    p.add_argument("--keep", metavar="DIR", help="with --case: copy the case's folder to DIR")
    p.add_argument("--cli", action="store_true", help="each case through `python macrogpt.py` in a subprocess (slow)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        null = os.open(os.devnull, os.O_WRONLY)
        with os.fdopen(os.dup(1), "w", encoding="utf-8") as out:
            os.dup2(null, 1)
            os.close(null)
            jobs = [(r, int(a), int(b)) for r, a, b in (j.split(":") for j in args.worker.split(","))]
            worker(jobs, args.seed, out)
        return 0
    readers = READERS if args.reader == "all" else tuple(args.reader.split(","))
    unknown = [r for r in readers if r not in READERS]
    if unknown:
        p.error("unknown reader %s; choose from %s" % (unknown[0], ", ".join(READERS)))
    if args.case is not None:
        return reproduce(readers[0], args.seed, args.case, args.keep)
    started = time.monotonic()
    run = cli_sample if args.cli else fuzz
    results, failures = run(readers, args.cases, args.seed, args.first, log=lambda s: print(s, flush=True))
    print(table(results))
    print("python %s, %.0f s in all" % (sys.version.split()[0], time.monotonic() - started))
    if failures:
        f = failures[0]
        print("first failure: %s case %d: %s %s [%s]\nreproduce: python tests/fuzz.py --reader %s --seed %d --case %d"
              % (f["reader"], f["case"], f["outcome"], f["detail"], f["mutation"], f["reader"], f["seed"], f["case"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
