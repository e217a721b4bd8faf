"""Fault injection: the real program against a second instance, a locked or damaged database,
signals, closed and full streams, terminal escapes; plus the lock, escaping and frozen growth."""
import io
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import unittest

import macrogpt as M
from tests.helpers import CliCase, V, random_batch, tiny_config, train_step

POSIX = os.name == "posix"
PWNED = "\x1b]0;pwned\x07"                 # retitles a terminal
CLEAR = "\x1b[2J"                          # clears it


# -- escaping --------------------------------------------------------------------------------

def expected_escape(c):
    """The rule, stated independently: C0 but tab and newline, DEL and C1 become \\xNN."""
    n = ord(c)
    if c in "\t\n" or 0x20 <= n < 0x7f or n > 0x9f:
        return c
    return "\\x%02x" % n


class EscapeTest(unittest.TestCase):
    def test_every_control_character_is_escaped_and_nothing_else(self):
        for n in list(range(0xa0)) + [0xa0, 0xe9, 0x2028, 0x1f642]:
            self.assertEqual(M.escape_controls(chr(n)), expected_escape(chr(n)), hex(n))

    def test_terminal_sequences_are_shown_not_sent(self):
        out = io.StringIO()
        M.say("a %s b %s c\tmé 🙂\r" % (PWNED, CLEAR), out)
        self.assertEqual(out.getvalue(), "a \\x1b]0;pwned\\x07 b \\x1b[2J c\tmé 🙂\\x0d\n")

    def test_stray_bytes_then_escapes(self):
        out = io.StringIO()
        M.say(M.bytes_to_text(b"\xff\x1b[2J\xc2\x9b"), out)         # invalid byte, ESC, C1 CSI
        self.assertEqual(out.getvalue(), "\ufffd\\x1b[2J\\x9b\n")

    def test_a_failing_stream_is_one_output_error(self):
        class Full(io.StringIO):
            def flush(self):
                raise OSError(28, "No space left on device")

        class Closed(io.StringIO):
            def write(self, s):
                raise BrokenPipeError(32, "Broken pipe")
        with self.assertRaisesRegex(M.OutputError, "No space left"):
            M.say("hi", Full())
        with self.assertRaises(BrokenPipeError):
            M.say("hi", Closed())


# -- folder lock and temp files ------------------------------------------------------------------

HOLDER = """
import sys, time
sys.path.insert(0, %r)
import macrogpt as M
lock = M.FolderLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
"""


class LockTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.db = os.path.join(self.dir, "memory.sqlite3")

    def test_second_lock_is_refused_with_the_owner_pid(self):
        with M.FolderLock(self.db):
            with open(self.db + ".lock") as f:
                self.assertEqual(f.read().strip(), str(os.getpid()))
            with self.assertRaisesRegex(M.LockedError, r"another macrogpt \(PID %d\) is using .*memory.sqlite3;"
                                        % os.getpid()):
                M.FolderLock(self.db).acquire()
        self.assertFalse(os.path.exists(self.db + ".lock"))             # released and removed
        M.FolderLock(self.db).acquire().release()

    def test_a_stale_lock_file_is_taken_over(self):
        with open(self.db + ".lock", "w") as f:
            f.write("999999999\n")                                      # a dead owner's PID
        lock = M.FolderLock(self.db).acquire()
        self.addCleanup(lock.release)
        with open(self.db + ".lock") as f:
            self.assertEqual(f.read().strip(), str(os.getpid()))

    @unittest.skipUnless(POSIX, "kill -9 of a lock holder is tested where SIGKILL exists")
    def test_kill_9_of_the_owner_frees_the_lock(self):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        holder = subprocess.Popen([sys.executable, "-c", HOLDER % root, self.db], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE)
        try:
            self.assertEqual(holder.stdout.readline().strip(), b"locked")
            with self.assertRaisesRegex(M.LockedError, r"\(PID %d\)" % holder.pid):
                M.FolderLock(self.db).acquire()
            holder.kill()
            holder.wait()
        finally:
            holder.stdin.close()
            holder.stdout.close()
            holder.wait()
        M.FolderLock(self.db).acquire().release()

    def test_stale_temp_files_are_removed_and_others_kept(self):
        ckpt = os.path.join(self.dir, "macrogpt.ckpt")
        names = ["macrogpt.ckpt.123.tmp", "macrogpt.ckpt.tmp", "macrogpt.ckpt.abc.tmp", "other.ckpt.5.tmp",
                 "macrogpt.ckpt", os.path.basename(M.temp_name(ckpt))]
        for name in names:
            open(os.path.join(self.dir, name), "w").close()
        self.assertEqual(M.remove_stale_temps(ckpt), 2)
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(names[2:]))


# -- database faults in-process ------------------------------------------------------------------

class MemoryFaultTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.path = os.path.join(self.dir, "memory.sqlite3")
        mem = M.Memory(self.path)
        mem.add_message("user", "kept")
        mem.set_state("settings", {"top_k": 5})
        mem.close()

    def raw(self, sql):
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute(sql)
        db.close()

    def assertRefused(self, words):
        with open(self.path, "rb") as f:
            before = f.read()
        with self.assertRaisesRegex(M.MemoryStoreError, words) as cm:
            M.Memory(self.path)
        self.assertIn(self.path, str(cm.exception))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_missing_table_is_refused_at_open(self):
        self.raw("DROP TABLE growth")
        self.assertRefused("damaged \\(table growth is missing\\)")

    def test_non_json_or_wrong_kind_state_is_refused_at_open(self):
        self.raw("UPDATE state SET value = 'not json' WHERE key = 'settings'")
        self.assertRefused("state 'settings' holds 'not json'")
        self.raw("UPDATE state SET value = '5' WHERE key = 'settings'")
        self.assertRefused("state 'settings' holds '5'")

    def test_negative_schema_version_is_refused_at_open(self):
        self.raw("PRAGMA user_version = -1")
        self.assertRefused("not a macrogpt database")

    def test_table_name_that_is_not_utf8_is_refused_at_open(self):
        with open(self.path, "rb") as f:
            data = f.read()
        with open(self.path, "wb") as f:
            f.write(data.replace(b"events", b"ev\xccnts", 1))        # the name column of sqlite_master
        self.assertRefused("is damaged")

    def test_deeply_nested_state_is_refused_at_open(self):
        self.raw("UPDATE state SET value = '%s' WHERE key = 'settings'" % ("[" * 100000 + "]" * 100000))
        self.assertRefused("state 'settings' holds")

    def test_corpus_ids_that_are_not_numbers_are_refused_at_open(self):
        with open(self.path, "rb") as f:
            data = f.read()
        with open(self.path, "wb") as f:                   # a flipped bit: id is no longer the rowid, reads NULL
            f.write(data.replace(b"corpus (id INTEGER PRIMARY KEY", b"corpus (id INTEGER PRHMARY KEY"))
        M.Memory(self.path).close()                        # an empty corpus is fine
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("INSERT INTO corpus (line, source, time) VALUES (x'41', 'seed', 0)")
        db.close()
        self.assertRefused("1 corpus ids are not integers")

    def test_damaged_name_with_a_newline_is_refused_in_one_line(self):
        with open(self.path, "rb") as f:
            data = f.read()
        with open(self.path, "wb") as f:                   # SQLite quotes the broken name in its message
            f.write(data.replace(b"sqlite_autoindex_corpus_1", b"sqlite_autoindex_cor\nus_1"))
        with self.assertRaises(M.MemoryStoreError) as cm:
            M.Memory(self.path)
        self.assertIn("is damaged", str(cm.exception))
        self.assertNotIn("\n", str(cm.exception))

    def test_state_integer_past_64_bits_is_refused_at_open(self):
        self.raw("INSERT INTO state (key, value) VALUES ('burst_mark', '%d')" % 10 ** 40)   # a query parameter later
        self.assertRefused("state 'burst_mark' holds")

    def test_damaged_page_is_refused_at_open(self):
        mem = M.Memory(self.path)
        mem.add_corpus_lines(["line %d %s" % (i, "x" * 200) for i in range(200)], "seed")
        mem.close()
        with open(self.path, "r+b") as f:
            f.seek(4096 * 3)
            f.write(bytes(random.Random(0).randrange(256) for _ in range(4096)))
        self.assertRefused("is damaged")

    def test_a_write_locked_past_the_timeout_is_one_error_and_memory_goes_on(self):
        mem = M.Memory(self.path)
        self.addCleanup(mem.close)
        mem.db.execute("PRAGMA busy_timeout = 50")                     # the real one is 5 s
        other = sqlite3.connect(self.path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        with self.assertRaisesRegex(M.MemoryStoreError, "memory.sqlite3: database is locked"):
            mem.add_message("user", "lost")
        with self.assertRaisesRegex(M.MemoryStoreError, "locked"):
            mem.add_corpus_lines(["a", "b"], "chat")
        other.execute("ROLLBACK")
        other.close()
        mem.add_message("user", "after")
        self.assertEqual([t for _, t in mem.recent_messages(5)], ["kept", "after"])
        self.assertFalse(mem.db.in_transaction)


# -- growth, then a burst that trains only the deltas ---------------------------------------------

def model_with_delta():
    rng = random.Random(0)
    model = M.GPT(tiny_config(), V, seed=0)
    opt = M.Adam(model.cfg)
    train_step(model, opt, *random_batch(rng, 2, 6), 0.01)
    model.add_delta()
    return model, opt


class GrowthThenBurstTest(unittest.TestCase):
    def assertBaseStaysAfterTraining(self, model, opt):
        model.set_trainable(False)                       # a burst's job
        base = {n: [list(r) for r in t.data] for n, t in model.base_params()}
        deltas = {n: [list(r) for r in t.data] for n, t in model.delta_params()}
        rng = random.Random(1)
        for _ in range(2):
            train_step(model, opt, *random_batch(rng, 2, 6, model.vocab_size), 0.05)
        for name, t in model.base_params():
            self.assertEqual(t.data, base[name], name)
        self.assertTrue(any(t.data != deltas[n] for n, t in model.delta_params()))

    def test_a_burst_after_grow_vocab_trains_only_deltas(self):
        model, opt = model_with_delta()
        model.grow_vocab(V + 7)
        self.assertEqual(model.vocab_size, V + 7)
        self.assertBaseStaysAfterTraining(model, opt)

    def test_a_burst_after_grow_model_trains_only_deltas(self):
        model, opt = model_with_delta()
        grown, opt = M.grow_model(model, opt, tiny_config(n_layer=3, n_embd=12, n_head=3))
        self.assertEqual(len(grown.blocks), 3)
        self.assertBaseStaysAfterTraining(grown, opt)

    def test_the_training_mode_is_the_jobs_and_never_saved(self):
        model, opt = model_with_delta()
        model.set_trainable(False)
        model.grow_vocab(V + 3)
        grown, opt = M.grow_model(model, opt, tiny_config(n_layer=3))
        back, _, _, _ = M.restore_checkpoint(M.parse_checkpoint(M.checkpoint_bytes(grown, opt, 1)))
        self.assertTrue(all(t.requires_grad for _, t in back.named_params()))
        self.assertNotIn(b"frozen", M.checkpoint_bytes(grown, opt, 1))


# -- the real program ------------------------------------------------------------------------

class FaultCliTest(CliCase):
    """Each case: no traceback, the stated exit code, and every acknowledged message still stored."""

    def popen(self, *extra, **kw):
        kw.setdefault("stdout", subprocess.PIPE)
        proc = subprocess.Popen(self.args(*extra), cwd=self.dir, stdin=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
        self.addCleanup(self.reap, proc)
        return proc

    def reap(self, proc):
        if proc.poll() is None:
            proc.kill()
        proc.communicate()

    def say_to(self, proc, text):
        """Send one message and wait for its reply: then it is acknowledged."""
        proc.stdin.write(text.encode("utf-8") + b"\n")
        proc.stdin.flush()
        reply = proc.stdout.readline().decode("utf-8", "replace")
        self.assertTrue(reply.strip())
        return reply

    def stored(self):
        mem = M.Memory(self.path("memory.sqlite3"))
        try:
            return [t for _, t in mem.recent_messages(1000)]
        finally:
            mem.close()

    def assertQuiet(self, err, lines=0):
        self.assertNotIn("Traceback", err)
        self.assertEqual(len(err.strip().splitlines()), lines, err)

    def test_second_instance_refuses_and_read_only_work_goes_on(self):
        stale = self.path("macrogpt.ckpt.999999999.tmp")
        open(stale, "w").close()
        first = self.popen("--no-train")
        self.say_to(first, "i was here first")
        self.assertFalse(os.path.exists(stale))                       # removed under the lock
        code, out, err = self.run_cli("--prompt", "me too")
        self.assertEqual((code, out), (2, ""))
        self.assertQuiet(err, 1)
        self.assertRegex(err, r"^macrogpt: error: another macrogpt \(PID %d\) is using .*memory.sqlite3;"
                         % first.pid)
        code, out, err = self.run_cli("--eval", self.corpus)
        self.assertEqual(code, 0, err)
        out, err = first.communicate(timeout=60)
        self.assertEqual(first.returncode, 0, err)
        self.assertQuiet(err.decode())
        self.assertIn("i was here first", self.stored())
        self.assertNotIn("me too", self.stored())
        self.assertFalse(os.path.exists(self.path("memory.sqlite3.lock")))

    def test_database_locked_past_the_timeout(self):
        self.assertEqual(self.run_cli("--no-train", "--prompt", "before")[0], 0)
        holder = sqlite3.connect(self.path("memory.sqlite3"), isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            proc = self.popen("--no-train")
            line = self.say_to(proc, "while locked")                   # waits out the 5 s busy timeout
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        self.assertEqual(line, "error: database memory.sqlite3: database is locked; no reply to this message\n")
        acknowledged = self.say_to(proc, "after the lock")
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 0, err)
        self.assertQuiet(err.decode())
        self.assertTrue(acknowledged)
        self.assertEqual(self.stored()[::2], ["before", "after the lock"])

    def test_database_truncated_between_runs(self):
        self.assertEqual(self.run_cli("--no-train", "--prompt", "remember me")[0], 0)
        db = self.path("memory.sqlite3")
        with open(db, "r+b") as f:
            f.truncate(os.path.getsize(db) // 2)
        with open(db, "rb") as f:
            before = f.read()
        code, out, err = self.run_cli("--no-train", "--prompt", "hello")
        self.assertEqual((code, out), (2, ""))
        self.assertQuiet(err, 1)
        self.assertIn("memory.sqlite3 is damaged", err)
        with open(db, "rb") as f:
            self.assertEqual(f.read(), before)

    @unittest.skipUnless(hasattr(signal, "SIGHUP"), "SIGTERM and SIGHUP as POSIX sends them")
    def test_sigterm_and_sighup_during_warmup_save_and_exit_0(self):
        for sig in (signal.SIGTERM, signal.SIGHUP):
            for name in ("macrogpt.ckpt", "memory.sqlite3"):
                if os.path.exists(self.path(name)):
                    os.remove(self.path(name))
            proc = self.popen()                                       # training on
            self.say_to(proc, "stay with me")
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=60)
            self.assertEqual(proc.returncode, 0, (sig, err))
            self.assertQuiet(err.decode())
            self.assertEqual(M.read_checkpoint(self.path("macrogpt.ckpt"))["extra"]["progress"]["warmup_done"],
                             False)
            self.assertIn("stay with me", self.stored())

    @unittest.skipUnless(POSIX, "needs a POSIX shell to close descriptors")
    def test_closed_stdout_and_stdin(self):
        sh = " ".join("'%s'" % a for a in self.args("--no-train"))
        for redirect, words in ((">&-", "standard output is closed"), ("<&-", "standard input is closed")):
            p = subprocess.run("exec %s %s" % (sh, redirect), shell=True, cwd=self.dir, input=b"hello\n",
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL if "<" in redirect else None,
                               timeout=60)
            err = p.stderr.decode()
            self.assertEqual(p.returncode, 2, err)
            self.assertQuiet(err, 1)
            self.assertIn(words, err)
            self.assertFalse(os.path.exists(self.path("memory.sqlite3")))

    @unittest.skipUnless(os.path.exists("/dev/full"), "needs /dev/full")
    def test_full_stdout(self):
        with open("/dev/full", "wb") as full:
            p = subprocess.run(self.args("--no-train"), cwd=self.dir, input=b"hello there\n", stdout=full,
                               stderr=subprocess.PIPE, timeout=60)
        err = p.stderr.decode()
        self.assertEqual(p.returncode, 2, err)
        self.assertQuiet(err, 1)
        self.assertIn("cannot write to standard output: No space left on device", err)
        self.assertIn("hello there", self.stored())                   # stored, though never acknowledged

    def test_corpus_escape_sequences_are_printed_escaped(self):
        with open(self.corpus, "w", encoding="utf-8") as f:
            for i in range(30):
                f.write("H: tell me about %d\nA: %s and %s story %d\n" % (i, PWNED, CLEAR, i))
        code, out, err = self.run_cli("--no-train", stdin=("tell me about 3\n%s typed\n" % CLEAR).encode())
        self.assertEqual(code, 0, err)
        self.assertQuiet(err)
        self.assertNotRegex(out, "[\x00-\x08\x0b-\x1f\x7f-\x9f]")
        self.assertIn("\\x1b]0;pwned\\x07", out)
        self.assertIn("\\x1b[2J", out)
        self.assertIn("%s typed" % CLEAR, self.stored())               # stored as it came
        code, out, err = self.run_cli("--eval", "%smissing.txt" % CLEAR)
        self.assertIn("cannot read eval file \\x1b[2Jmissing.txt", err)
        self.assertNotIn("\x1b", err)

    def test_small_ones(self):
        code, out, err = self.run_cli("--eval", "missing.txt")
        self.assertEqual(code, 2)
        self.assertIn("cannot read eval file missing.txt", err)
        open(self.path("empty.txt"), "w").close()
        code, out, err = self.run_cli("--eval", "empty.txt")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("eval file empty.txt has no non-blank lines", err)
        code, out, err = self.run_cli("--no-train", "--prompt", "/status")
        self.assertEqual(code, 0, err)
        self.assertIn("warmup step 0/16", out)
        code, out, err = self.run_cli("--ckpt", "", "--prompt", "hi")
        self.assertEqual(code, 2)
        self.assertIn("--db and --ckpt need a file name", err)
        self.assertQuiet(err, 1)


if __name__ == "__main__":
    unittest.main()
