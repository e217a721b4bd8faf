"""SQLite memory: round trips, versioning, privacy, pruning, and refusing files it does not own."""
import os
import random
import shutil
import sqlite3
import stat
import tempfile
import unittest

import macrogpt as M


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


class MemoryTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "memory.sqlite3")

    def tearDown(self):
        shutil.rmtree(self.dir)

    def open(self):
        mem = M.Memory(self.path)
        self.addCleanup(mem.close)
        return mem

    def test_created_private_versioned_and_wal(self):
        mem = self.open()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(mem.db.execute("PRAGMA user_version").fetchone()[0], M.MEMORY_VERSION)
        self.assertEqual(mem.db.execute("PRAGMA journal_mode").fetchone()[0], "wal")

    def test_messages_round_trip_any_text(self):
        mem = self.open()
        texts = ["hello", "héllo 世界 🙂", "nul\x00byte", "bad \udcff bytes", "'); DROP TABLE messages; --"]
        for t in texts:
            mem.add_message("user", t)
        mem.close()
        again = self.open()
        self.assertEqual(again.recent_messages(10), [("user", t) for t in texts])
        self.assertEqual(again.recent_messages(2), [("user", t) for t in texts[-2:]])
        self.assertEqual(again.message_count(), len(texts))

    def test_corpus_dedup_stats_and_prune(self):
        mem = self.open()
        self.assertEqual(mem.add_corpus_lines(["a", "b", "a"], "seed"), [(1, "a"), (2, "b")])
        self.assertEqual(mem.add_corpus_lines(["b", "c"], "chat"), [(3, "c")])
        self.assertEqual(mem.corpus_lines(), ["a", "b", "c"])
        self.assertEqual(mem.corpus_stats(), {"lines": 3, "bytes": 3, "chat_lines": 1})
        mem.add_corpus_lines(["line %d" % i for i in range(100)], "chat")
        mem.prune_corpus(range(4, 67), "test")
        self.assertEqual(mem.remove_corpus_lines(["line 99", "never stored"]), [(103, "line 99")])
        mem.add_corpus_lines(["line 99"], "chat")
        kept = mem.corpus_lines()
        self.assertEqual(len(kept), 40)
        self.assertEqual(kept[-20:], ["line %d" % i for i in range(80, 100)])
        self.assertEqual(mem.db.execute("SELECT detail FROM events WHERE kind = 'prune'").fetchall(), [("test",)])

    def test_growth_log_state_and_events(self):
        mem = self.open()
        mem.log_growth(step=10, vocab=259, params=1000, deltas=0, loss=3.5, heldout_bpb=4.1,
                       tokens_per_s=100.0, note="warmup")
        mem.log_growth(step=20, note="rejected burst: held-out loss +5.0%")
        self.assertEqual(mem.growth_rows()[0]["step"], 10)
        self.assertEqual(mem.rejected_bursts(), 1)
        mem.set_state("k", {"x": [1, 2]})
        self.assertEqual(mem.get_state("k"), {"x": [1, 2]})
        self.assertIsNone(mem.get_state("missing"))
        mem.log_event("note", "hello")

    def test_future_version_is_refused_untouched(self):
        db = sqlite3.connect(self.path)
        db.execute("PRAGMA user_version = 99")
        db.close()
        before = read_bytes(self.path)
        with self.assertRaises(M.MemoryStoreError) as ctx:
            M.Memory(self.path)
        self.assertIn("newer", str(ctx.exception))
        self.assertEqual(read_bytes(self.path), before)
        self.assertFalse(os.path.exists(self.path + "-wal"))

    def test_garbage_and_foreign_databases_are_refused(self):
        with open(self.path, "wb") as f:
            f.write(b"this is not a database at all" * 100)
        before = read_bytes(self.path)
        with self.assertRaises(M.MemoryStoreError):
            M.Memory(self.path)
        self.assertEqual(read_bytes(self.path), before)
        other = os.path.join(self.dir, "other.db")
        db = sqlite3.connect(other)
        db.execute("CREATE TABLE t (x)")
        db.close()
        with self.assertRaises(M.MemoryStoreError) as ctx:
            M.Memory(other)
        self.assertIn("not a macrogpt database", str(ctx.exception))

    def test_texts_edited_by_hand_are_read_and_numbers_refused(self):
        mem = self.open()
        mem.add_message("user", "hello")
        mem.add_corpus_lines(["a line"], "seed")
        mem.db.execute("UPDATE messages SET text = 'typed by hand'")      # TEXT, not the BLOB we write
        mem.db.execute("UPDATE corpus SET line = 'édité'")
        self.assertEqual(mem.recent_messages(5), [("user", "typed by hand")])
        self.assertEqual(mem.corpus_lines(), ["édité"])
        for number in (4294967296, 1.5):                  # bytes(4294967296) was a 4 GB allocation
            mem.db.execute("UPDATE messages SET text = ?", (number,))
            mem.db.execute("UPDATE corpus SET line = ?", (number,))
            with self.assertRaisesRegex(M.MemoryStoreError, "is damaged \\(a text holds"):
                mem.recent_messages(5)
            with self.assertRaisesRegex(M.MemoryStoreError, "is damaged \\(a text holds"):
                mem.corpus_lines()

    def test_failed_transaction_rolls_back(self):
        mem = self.open()
        mem.add_corpus_lines(["keep"], "seed")
        with self.assertRaises(RuntimeError):
            with mem.transaction():
                mem.db.execute("DELETE FROM corpus")
                raise RuntimeError("boom")
        self.assertEqual(mem.corpus_lines(), ["keep"])


class HelperTest(unittest.TestCase):
    def test_heldout_by_content_and_turns(self):
        lines = ["line %d" % i for i in range(1000)]
        train, held = M.split_heldout(lines, 10)
        self.assertEqual(sorted(train + held), sorted(lines))
        self.assertTrue(70 < len(held) < 130, len(held))             # about one in ten
        moved, held_moved = M.split_heldout(["a new first line"] + lines[::-1], 10)
        self.assertEqual(set(held_moved) - {"a new first line"}, set(held))   # order does not matter
        _, held5 = M.split_heldout(lines, 5)
        self.assertTrue(set(held) <= set(held5))                     # 10 -> 5 only adds held-out lines
        self.assertEqual(M.format_turn("user", "hi  there\n"), "H: hi there")
        self.assertEqual(M.format_turn("assistant", "hello!"), "A: hello!")

    def test_read_corpus_file_keeps_stray_bytes(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        path = os.path.join(d, "c.txt")
        with open(path, "wb") as f:
            f.write(b"one\n\n  two \xff\r\nthree")
        lines = M.read_corpus_file(path)
        self.assertEqual(lines[0], "one")
        self.assertEqual(M.text_to_bytes(lines[1]), b"two \xff")
        self.assertEqual(len(lines), 3)
        with self.assertRaises(M.MacroError):
            M.read_corpus_file(os.path.join(d, "missing.txt"))


if __name__ == "__main__":
    unittest.main()
