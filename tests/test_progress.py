"""Progress notes: the warmup line, when the REPL shows it, the network's arrival, and the stderr meter."""
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import macrogpt as M
from tests.helpers import SCRIPT, TINY, synthetic_corpus

CFG = M.Config(warmup_steps=1200, batch_size=4, seq_len=64)


def held(mix):
    return M.Heldout(model_bpb=mix + 0.5, field_bpb=mix + 0.1, mix_bpb=mix, lam=0.0, bytes=100, nll=1.0)


def progress(**kw):
    return M.Progress(**kw)


class ProgressLineTest(unittest.TestCase):
    def test_fixed_format_before_anything_is_known(self):
        self.assertEqual(M.progress_line(progress(), CFG, 0), "[warmup 0% | step 0/1200 | eta - | held-out -]")

    def test_eta_from_tokens_per_second_and_held_out_when_measured(self):
        # 790 steps left * 4 * 64 tokens at 256 tok/s = 790 s
        p = progress(tokens_per_s=256.0)
        self.assertEqual(M.progress_line(p, CFG, 410), "[warmup 34% | step 410/1200 | eta 13m10s | held-out -]")
        p.heldout = held(2.3149)
        self.assertEqual(M.progress_line(p, CFG, 1200),
                         "[warmup 100% | step 1200/1200 | eta - | held-out 2.31 bits/byte]")


class TrainingNotesTest(unittest.TestCase):
    def test_shows_a_line_only_when_it_moved(self):
        notes = M.TrainingNotes(CFG, progress())
        p = progress(tokens_per_s=100.0)
        self.assertEqual(len(notes.lines(p, 0)), 1)              # the first reply shows where it stands
        self.assertEqual(notes.lines(p, 0), [])
        self.assertEqual(notes.lines(p, 11), [])                 # 0.9%: not a point yet
        self.assertEqual(notes.lines(p, 12), ["[warmup 1% | step 12/1200 | eta 50m41s | held-out -]"])
        self.assertEqual(notes.lines(p, 23), [])
        p.heldout = held(3.0)
        self.assertEqual(len(notes.lines(p, 23)), 1)             # a new held-out figure is news
        self.assertEqual(notes.lines(p, 23), [])

    def test_the_network_joining_the_voice_is_announced_once(self):
        notes = M.TrainingNotes(CFG, progress())
        done = progress(warmup_done=True, heldout=held(2.0), lam=0.25)
        self.assertEqual(notes.lines(done, 1200), ["[warmup 100% | step 1200/1200 | eta - | held-out 2.00 bits/byte]",
                                                   "[the network now speaks: lambda 0.25]"])
        self.assertEqual(notes.lines(done, 1224), [])
        done.lam = 0.0
        self.assertEqual(notes.lines(done, 1248), [])
        done.lam = 0.5
        self.assertEqual(notes.lines(done, 1272), [])

    def test_lambda_zero_after_warmup_waits_for_its_rise(self):
        notes = M.TrainingNotes(CFG, progress())
        p = progress(warmup_done=True, heldout=held(4.0))
        self.assertEqual(len(notes.lines(p, 1200)), 1)
        p.lam = 0.1
        self.assertEqual(notes.lines(p, 1224), ["[the network now speaks: lambda 0.10]"])

    def test_a_restart_after_warmup_and_arrival_is_silent(self):
        p = progress(warmup_done=True, heldout=held(2.0), lam=0.4)
        notes = M.TrainingNotes(CFG, p)
        self.assertEqual(notes.lines(p, 1500), [])
        p.heldout = held(1.9)
        self.assertEqual(notes.lines(p, 1524), [])


class FakeTerminal(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


class ProgressMeterTest(unittest.TestCase):
    def clock(self):
        t = [0.0]

        def now():
            t[0] += 1.0
            return t[0]
        return now

    def test_rewrites_one_line_on_a_terminal_and_clears_it(self):
        err = FakeTerminal(True)
        meter = M.Meter("eval", 4, stream=err, now=self.clock())
        for done in range(4):
            meter.update(done)
        meter.update(3)                                          # the same percentage is not rewritten
        meter.finish()
        self.assertEqual(err.getvalue().split("\r")[1:],
                         ["eval 0% | 0/4 | eta -", "eval 25% | 1/4 | eta 0m06s", "eval 50% | 2/4 | eta 0m03s",
                          "eval 75% | 3/4 | eta 0m01s", " " * 26, ""])

    def test_silent_off_a_terminal_or_when_quiet(self):
        for stream, enabled in ((FakeTerminal(False), True), (FakeTerminal(True), False), (io.StringIO(), True)):
            meter = M.Meter("bench", 3, enabled, stream=stream)
            meter.update(1)
            meter.finish()
            self.assertEqual(stream.getvalue(), "")


class PipeModeTest(unittest.TestCase):
    """Progress notes are for a person at a terminal: a pipe gets exactly one line per reply."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        with open(os.path.join(self.dir, "corpus.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(synthetic_corpus()) + "\n")
        with open(os.path.join(self.dir, "tiny.json"), "w") as f:
            json.dump(TINY, f)

    def test_piped_session_with_training_prints_one_line_per_reply(self):
        messages = ["how is the sea today?", "do you like the moon?", "tell me of the rain", "and the snow?",
                    "good night"]
        p = subprocess.run([sys.executable, SCRIPT, "--corpus", "corpus.txt", "--config", "tiny.json"],
                           input="\n".join(messages).encode() + b"\n", cwd=self.dir, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr)
        out = p.stdout.decode("utf-8", "replace").splitlines()
        self.assertEqual(len(out), len(messages), out)
        self.assertFalse([line for line in out if line.startswith("[")], out)
        self.assertNotIn(b"[warmup", p.stderr)


if __name__ == "__main__":
    unittest.main()
