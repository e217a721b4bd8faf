"""SQLite memory: round trips, versioning, privacy, pruning, and refusing files it does not own."""
import os
import random
import shutil
import sqlite3
import stat
import tempfile
import unittest

import macrogpt as M
from tests.helpers import corpus_lines


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
        self.assertEqual(corpus_lines(mem), ["a", "b", "c"])
        self.assertEqual(mem.corpus_stats(), {"lines": 3, "bytes": 3, "chat_lines": 1})
        mem.add_corpus_lines(["line %d" % i for i in range(100)], "chat")
        mem.prune_corpus(range(4, 67), "prune", "test")
        self.assertEqual(mem.corpus_ids(["line 99", "never stored"]), [103])
        mem.prune_corpus([103], "heldout", "test")
        mem.add_corpus_lines(["line 99"], "chat")
        kept = corpus_lines(mem)
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
        self.assertEqual(corpus_lines(mem), ["édité"])
        for number in (4294967296, 1.5):                  # bytes(4294967296) was a 4 GB allocation
            mem.db.execute("UPDATE messages SET text = ?", (number,))
            mem.db.execute("UPDATE corpus SET line = ?", (number,))
            with self.assertRaisesRegex(M.MemoryStoreError, "is damaged \\(a text holds"):
                mem.recent_messages(5)
            with self.assertRaisesRegex(M.MemoryStoreError, "is damaged \\(a text holds"):
                corpus_lines(mem)

    def test_failed_transaction_rolls_back(self):
        mem = self.open()
        mem.add_corpus_lines(["keep"], "seed")
        with self.assertRaises(RuntimeError):
            with mem.transaction():
                mem.db.execute("DELETE FROM corpus")
                raise RuntimeError("boom")
        self.assertEqual(corpus_lines(mem), ["keep"])


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


class RetrievalTest(unittest.TestCase):
    """What the user said is found again by its words, through FTS5 and through the own index."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def filled(self, name, own_index, n=20000):
        if own_index:                                  # as on an SQLite without FTS5
            real = M.MessageIndex.__init__

            def without_fts(index, db, text_of):
                db.execute("CREATE TABLE message_terms (term TEXT NOT NULL, id INTEGER NOT NULL)")
                db.execute("CREATE INDEX message_terms_term ON message_terms (term, id)")
                real(index, db, text_of)
            M.MessageIndex.__init__ = without_fts
            self.addCleanup(setattr, M.MessageIndex, "__init__", real)
        mem = M.Memory(os.path.join(self.dir, name))
        self.addCleanup(mem.close)
        self.assertEqual(mem.index.fts, not own_index)
        rng = random.Random(1)
        words = ["sea", "rain", "bread", "lamp", "road", "song", "tea", "stone", "cloud", "garden"]
        with mem.transaction():
            for i in range(n):
                text = "I like the %s and the %s %d" % (rng.choice(words), rng.choice(words), i % 50)
                mem.db.execute("INSERT INTO messages (time, role, text) VALUES (0, 'user', ?)", (M.text_to_bytes(text),))
                mem.index.add(mem.db.execute("SELECT MAX(id) FROM messages").fetchone()[0], text)
        return mem

    def check_finds_a_fact_among_many(self, own_index):
        mem = self.filled("m%d.sqlite3" % own_index, own_index)
        fact = mem.add_message("user", "my dog is called Biscotti")
        mem.add_message("user", "the sea was grey")
        asked = mem.add_message("user", "what is my dog called?")
        found = mem.search_messages("what is my dog called?", 3, before=asked)
        self.assertEqual(found[0], (fact, "my dog is called Biscotti"))
        self.assertEqual(mem.search_messages("what is my dog called?", 3, before=fact), [])   # not yet said
        self.assertEqual(mem.search_messages("I like the sea and the rain", 3), [])           # nothing rare shared
        self.assertNotIn(asked, [i for i, _ in mem.search_messages("my dog", 5)])             # questions are not indexed

    def test_fts5_finds_a_fact_among_20000_messages(self):
        self.check_finds_a_fact_among_many(False)

    def test_own_index_finds_a_fact_among_20000_messages(self):
        self.check_finds_a_fact_among_many(True)

    def test_search_terms_of_scripts_without_spaces(self):
        self.assertEqual(M.search_terms("My cat 小白猫!"), ["my", "cat", "小白", "白猫"])
        self.assertEqual(M.search_terms("Мурзик, ΚΙΚΟΣ"), ["мурзик", "κικοσ"])

    def test_an_older_database_is_indexed_when_opened(self):
        path = os.path.join(self.dir, "old.sqlite3")
        mem = M.Memory(path)
        mem.db.execute("DROP TABLE message_fts")
        mem.db.execute("INSERT INTO messages (time, role, text) VALUES (0, 'user', ?)", (b"I live in Ljubljana",))
        mem.close()
        mem = M.Memory(path)
        self.addCleanup(mem.close)
        self.assertEqual([t for _, t in mem.search_messages("do I live in Ljubljana?")], ["I live in Ljubljana"])


class FuzzFoundTest(unittest.TestCase):
    """Inputs tests/fuzz.py found that ended in a traceback."""

    def test_a_negative_schema_version_is_refused_in_one_line(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        path = os.path.join(d, "memory.sqlite3")
        M.Memory(path).close()
        db = sqlite3.connect(path)
        db.execute("PRAGMA user_version = -2147483648")
        db.close()
        with self.assertRaisesRegex(M.MemoryStoreError, "not a macrogpt database"):
            M.Memory(path)

    def test_json_nested_too_deeply_is_refused_in_one_line(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        path = os.path.join(d, "config.json")
        with open(path, "w") as f:
            f.write('{"a": ' + "[" * 100000 + "]" * 100000 + "}")
        with self.assertRaisesRegex(M.HFError, "nested too deeply"):
            M._read_json(path)

    def test_a_safetensors_header_nested_too_deeply_is_refused_in_one_line(self):
        header = b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}"
        data = __import__("struct").pack("<Q", len(header)) + header
        with self.assertRaisesRegex(M.HFError, "header is not JSON"):
            M._checked_header("model.safetensors", data)

    def test_a_checkpoint_with_a_bad_random_state_is_refused_in_one_line(self):
        model, opt = M.GPT(M.Config(n_layer=1, n_embd=8, n_head=2, block_size=8, seq_len=8), 20), None
        body = M.parse_checkpoint(M.checkpoint_bytes(model, M.Adam(model.cfg), 0))
        body["rng"][1][371] = -1572793180
        with self.assertRaisesRegex(M.CheckpointError, "damaged"):
            M.restore_checkpoint(body)

    def test_a_message_edited_into_a_number_is_left_out_of_the_index_and_refused_when_read(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        path = os.path.join(d, "memory.sqlite3")
        mem = M.Memory(path)
        mem.add_message("user", "my dog is called Rex")
        mem.add_message("user", "I live in Ljubljana")
        mem.db.execute("DROP TABLE message_fts")                   # the index is rebuilt on open
        mem.db.execute("UPDATE messages SET text = -0.0 WHERE id = 1")
        mem.close()
        mem = M.Memory(path)
        self.addCleanup(mem.close)
        self.assertEqual([t for _, t in mem.search_messages("do I live in Ljubljana?")], ["I live in Ljubljana"])
        with self.assertRaisesRegex(M.MemoryStoreError, "damaged"):
            mem.recent_messages(2)
