"""The growth log: per-source figures stored (schema 2, migrated from 1) and drawn as a terminal chart."""
import io
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import macrogpt as M
from tests.helpers import SCRIPT, Clock, synthetic_corpus, tiny_trainer_config

SCHEMA_V1 = """
CREATE TABLE messages (id INTEGER PRIMARY KEY, time REAL NOT NULL, role TEXT NOT NULL, text BLOB NOT NULL);
CREATE TABLE corpus (id INTEGER PRIMARY KEY, line BLOB NOT NULL UNIQUE, source TEXT NOT NULL, time REAL NOT NULL);
CREATE TABLE events (id INTEGER PRIMARY KEY, time REAL NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE growth (id INTEGER PRIMARY KEY, time REAL NOT NULL, step INTEGER, vocab INTEGER,
                     params INTEGER, deltas INTEGER, loss REAL, heldout_bpb REAL, tokens_per_s REAL,
                     note TEXT);
CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def row(step, mix=None, network=None, field=None, note="burst: held-out loss -1.0%"):
    return {"step": step, "heldout_bpb": mix, "network_bpb": network, "field_bpb": field, "note": note}


def sample_rows():
    """Warmup checkpoints without figures, warmup done, kept bursts and two rejected ones."""
    rows = [row(s, note="warmup") for s in (8, 16, 24)]
    rows.append(row(32, 4.0, 5.0, 4.0, "warmup done"))
    network, field = 5.0, 4.0
    for i in range(12):
        step = 32 + 4 * (i + 1)
        if i in (3, 7):
            rows.append(row(step - 4, note="rejected burst: held-out loss +4.0%"))
            continue
        network, field = network * 0.95, field * 0.99
        rows.append(row(step, min(network, field) * 0.97, network, field))
    return rows


class GrowthLogTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.path = os.path.join(self.dir, "memory.sqlite3")

    def open(self):
        mem = M.Memory(self.path)
        self.addCleanup(mem.close)
        return mem

    def test_a_version_1_file_is_migrated_in_place_and_keeps_everything(self):
        db = sqlite3.connect(self.path)
        db.executescript(SCHEMA_V1)
        db.execute("INSERT INTO growth (time, step, heldout_bpb, note) VALUES (1.0, 96, 3.5, 'warmup done')")
        db.execute("INSERT INTO messages (time, role, text) VALUES (1.0, 'user', ?)", (b"hello",))
        db.execute("INSERT INTO state (key, value) VALUES ('burst_mark', '7')")
        db.execute("PRAGMA user_version = 1")
        db.commit()
        db.close()
        mem = self.open()
        self.assertEqual(mem.db.execute("PRAGMA user_version").fetchone()[0], 2)
        self.assertEqual(mem.growth_rows(), [dict(step=96, vocab=None, params=None, deltas=None, loss=None,
                                                  heldout_bpb=3.5, tokens_per_s=None, note="warmup done",
                                                  network_bpb=None, field_bpb=None)])
        self.assertEqual(mem.recent_messages(5), [("user", "hello")])
        self.assertEqual(mem.get_state("burst_mark"), 7)
        mem.log_growth(step=120, heldout_bpb=3.1, network_bpb=3.3, field_bpb=3.4, note="burst")
        mem.close()
        again = self.open()                                  # a second open finds nothing to migrate
        last = again.growth_rows()[-1]
        self.assertEqual((last["network_bpb"], last["field_bpb"], last["heldout_bpb"]), (3.3, 3.4, 3.1))

    def test_a_migration_that_fails_leaves_the_file_at_version_1(self):
        db = sqlite3.connect(self.path)
        db.executescript(SCHEMA_V1)
        db.execute("ALTER TABLE growth ADD COLUMN field_bpb REAL")    # the second step will collide
        db.execute("INSERT INTO growth (time, step, note) VALUES (1.0, 5, 'kept')")
        db.execute("PRAGMA user_version = 1")
        db.commit()
        db.close()
        with self.assertRaises(M.MemoryStoreError):
            M.Memory(self.path)
        db = sqlite3.connect(self.path)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], 1)
        columns = [r[1] for r in db.execute("PRAGMA table_info(growth)")]
        self.assertNotIn("network_bpb", columns)                       # the first step was rolled back
        self.assertEqual(db.execute("SELECT step, note FROM growth").fetchall(), [(5, "kept")])

    def test_a_fresh_file_has_the_new_columns(self):
        mem = self.open()
        mem.log_growth(step=1, network_bpb=5.5, field_bpb=4.5, heldout_bpb=4.4)
        self.assertEqual(mem.growth_rows()[0]["network_bpb"], 5.5)
        self.assertEqual(mem.db.execute("PRAGMA user_version").fetchone()[0], M.MEMORY_VERSION)

    def test_trainer_logs_network_field_and_mix_of_its_measurement(self):
        mem = self.open()
        train, heldout = M.split_heldout(synthetic_corpus(), 5)
        mem.add_corpus_lines(train, "seed")
        cfg = tiny_trainer_config()
        brain = M.Brain.fresh(cfg, seed=1)
        corpus = M.Corpus(cfg, mem, brain.tok, heldout)
        trainer = M.Trainer(cfg, corpus, mem, brain, M.Pool(0), now=Clock())
        n = sum(len(w) - 1 for w in corpus.heldout_windows)
        h = corpus.evidence([0.05] * n)                      # a network that gives each token 1/20
        brain.progress.heldout = h
        trainer.log_growth("warmup done")
        last = mem.growth_rows()[-1]
        self.assertEqual(last["note"], "warmup done")
        self.assertEqual((last["network_bpb"], last["field_bpb"], last["heldout_bpb"]),
                         (h.model_bpb, h.field_bpb, h.mix_bpb))
        self.assertAlmostEqual(last["network_bpb"], n * math.log2(20) / corpus.heldout_bytes)
        self.assertNotEqual(last["network_bpb"], last["field_bpb"])


class RenderGrowthTest(unittest.TestCase):
    def assertFits(self, text, width):
        for line in text.split("\n"):
            self.assertLessEqual(len(line), width, repr(line))

    def plot_lines(self, text):
        return [l for l in text.split("\n") if l[5:6] in ("\u2502", "\u2524", "|")]

    def test_empty_log_says_so(self):
        text = M.render_growth([])
        self.assertEqual(text, "the growth log is empty: it fills in as the network trains")

    def test_rows_without_figures_say_when_they_come(self):
        text = M.render_growth([row(8, note="warmup"), row(16, float("nan"), note="warmup")])
        self.assertIn("no held-out figures yet (the log reaches step 16)", text.replace("\n", " "))

    def test_one_point_draws_each_series_once(self):
        text = M.render_growth([row(96, 4.2, 5.1, 4.2, "warmup done")], width=40)
        plot = "".join(self.plot_lines(text))
        self.assertEqual(plot.count("\u2588"), 1)             # network
        self.assertEqual(plot.count("\u2591"), 1)             # field, drawn over the equal mix
        self.assertIn("5.10 \u2524\u2588", text)
        self.assertIn("4.20 \u2524\u2591", text)
        self.assertIn(" 96", text)
        self.assertFits(text, 40)

    def test_full_chart_axes_marks_and_legend(self):
        rows = sample_rows()
        text = M.render_growth(rows, width=80, height=10)
        lines = text.split("\n")
        self.assertFits(text, 80)
        self.assertEqual(len(self.plot_lines(text)), 10)
        self.assertTrue(lines[1].startswith("5.00 \u2524\u2588"))    # the highest figure, top left
        lowest = min(r["heldout_bpb"] for r in rows if r["heldout_bpb"])
        self.assertTrue(lines[10].startswith("%.2f \u2524" % lowest))
        axis = lines[11]
        self.assertTrue(axis.startswith("     \u2514"))
        # a rejected burst keeps the step, so its mark replaces that of the burst before it
        self.assertEqual(axis.count("\u25b2"), 8)
        self.assertEqual(axis.count("\u00d7"), 2)
        self.assertRegex(lines[12], r"^      32 +step +80$")
        self.assertIn("\u25b2 burst (10)", text)
        self.assertIn("\u00d7 rolled back (2)", text)
        for name in ("network", "field", "mix"):
            self.assertIn(name, lines[-1])

    def test_warmup_rows_without_figures_do_not_stretch_the_step_axis(self):
        text = M.render_growth(sample_rows(), width=60)
        self.assertNotRegex(text, r"\n +8 +step")
        self.assertRegex(text, r"\n +32 +step +80\n")

    def test_nan_and_none_figures_are_skipped(self):
        rows = [row(10, 4.0, 5.0, 4.0), row(20, float("nan"), None, float("inf")), row(30, 3.0, 3.5, 3.9),
                {"step": None, "heldout_bpb": 1.0}, {"step": 40}]
        text = M.render_growth(rows, width=50)
        self.assertFits(text, 50)
        self.assertNotIn("nan", text)
        self.assertIn("5.00 \u2524", text)
        self.assertIn("3.00 \u2524", text)
        self.assertRegex(text, r"10 +step +30")              # a row with nothing to draw adds no step
        self.assertNotIn("1.00", text)                       # nor does a row without a step

    def test_notes_that_are_not_text_mark_nothing(self):
        rows = [row(10, mix=3.0), row(20, mix=2.5, note=b"burst"), row(30, mix=2.0, note=7)]
        self.assertIn("burst (1)", M.render_growth(rows))             # the first row's text note only

    def test_narrow_terminal_still_fits(self):
        for width in (30, 20, 12, 8, 3):
            text = M.render_growth(sample_rows(), width=width)
            self.assertFits(text, width)
        text = M.render_growth(sample_rows(), width=30, height=6)
        self.assertEqual(len(self.plot_lines(text)), 6)
        self.assertIn("\u00d7 rolled back (2)", text)

    def test_ascii_fallback_uses_only_ascii(self):
        text = M.render_growth(sample_rows(), ascii=True)
        text.encode("ascii")
        self.assertIn("5.00 |#", text)
        self.assertIn("# network  - field  + mix  ^ burst (10)  x rolled back (2)", text)
        self.assertRegex(text, r"\n     \+[-^x]+\n")

    def test_chart_follows_the_output_encoding(self):
        rows = sample_rows()

        def chart(encoding, columns):
            with mock.patch.dict(os.environ, {"COLUMNS": str(columns)}):
                return M.growth_chart(rows, io.TextIOWrapper(io.BytesIO(), encoding=encoding))
        self.assertEqual(chart("ascii", 100), M.render_growth(rows, 80, ascii=True))
        self.assertEqual(chart("utf-8", 100), M.render_growth(rows, 80))
        self.assertEqual(chart("cp1252", 100), M.render_growth(rows, 80, ascii=True))
        self.assertEqual(chart("utf-8", 40), M.render_growth(rows, 40))


class GrowthCliTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def run_cli(self, *args, env=None):
        p = subprocess.run([sys.executable, SCRIPT] + list(args), cwd=self.dir, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=60, env=env)
        return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")

    def test_missing_database_is_one_line_and_nothing_is_created(self):
        code, out, err = self.run_cli("--growth")
        self.assertEqual((code, out), (2, ""))
        self.assertRegex(err, r"^macrogpt: error: no database memory.sqlite3 here yet[^\n]*\n$")
        self.assertEqual(os.listdir(self.dir), [])

    def test_growth_prints_the_chart_of_the_database(self):
        mem = M.Memory(os.path.join(self.dir, "g.sqlite3"))
        for r in sample_rows():
            mem.log_growth(**r)
        mem.close()
        env = dict(os.environ, PYTHONIOENCODING="ascii", COLUMNS="80")
        code, out, err = self.run_cli("--growth", "--db", "g.sqlite3", env=env)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, M.render_growth(sample_rows(), 80, ascii=True) + "\n")


if __name__ == "__main__":
    unittest.main()
