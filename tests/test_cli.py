"""The real program in a subprocess with a tiny Config: pipes, memory, restarts, errors."""
import json
import os
import signal
import subprocess
import tempfile
import time
import unittest

import macrogpt as M
from tests.helpers import CliCase, corpus_lines, synthetic_corpus


class CliTest(CliCase):
    def memory(self):
        mem = M.Memory(self.path("memory.sqlite3"))
        self.addCleanup(mem.close)
        return mem

    def test_piped_conversation_one_reply_per_line(self):
        messages = "how is the sea today?\n\ndo you like the moon?\n".encode("utf-8")
        messages += b"\xff\xfe garbage \x00\n" + "🙂 emoji\n".encode("utf-8")   # invalid UTF-8, NUL, emoji
        code, out, err = self.run_cli("--no-train", stdin=messages)
        self.assertEqual(code, 0, err)
        replies = out.splitlines()
        self.assertEqual(len(replies), 4, out)
        self.assertTrue(all(r.strip() for r in replies))
        mem = self.memory()
        self.assertEqual(mem.message_count(), 8)
        users = [t for r, t in mem.recent_messages(8) if r == "user"]
        self.assertEqual(M.text_to_bytes(users[2]), b"\xff\xfe garbage \x00")
        self.assertEqual(users[3], "🙂 emoji")
        self.assertGreater(mem.corpus_stats()["chat_lines"], 0)
        self.assertIn("H: how is the sea today?", corpus_lines(mem))

    def test_status_and_commands_in_pipe(self):
        code, out, err = self.run_cli("--no-train", stdin=b"/status\n/set top_k 5\n/set top_k x\n/bogus\n/help\n")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"warmup step 0/16 \| eta - \| loss - \| - tok/s")
        self.assertRegex(out, r"vocab \d+ \| params \d+ \| delta modules 0/8 \| corpus \d+ lines")
        self.assertIn("top_k = 5", out)
        self.assertIn("error: top_k needs an integer", out)
        self.assertIn("unknown command /bogus", out)
        self.assertEqual(self.memory().get_state("settings"), {"top_k": 5})

    def test_restart_continues_training_and_remembers(self):
        proc = subprocess.Popen(self.args(), cwd=self.dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            proc.stdin.write(b"do you like the snow?\n")
            proc.stdin.flush()
            self.assertTrue(proc.stdout.readline().strip())
            self.status_until(proc, r"warmup done \| step 16")
        finally:
            out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 0, err)
        self.assertEqual(M.read_checkpoint(self.path("macrogpt.ckpt"))["step"], 16)
        code, out, err = self.run_cli("--no-train", stdin=b"/status\nhow is the tea today?\n")
        self.assertEqual(code, 0, err)
        self.assertIn("warmup done | step 16", out)
        self.assertRegex(out, r"held-out bits/byte: network [\d.]+ \| field [\d.]+ \| mix [\d.]+")
        texts = [t for _, t in self.memory().recent_messages(10)]
        self.assertIn("do you like the snow?", texts)
        self.assertIn("how is the tea today?", texts)

    def test_kill_9_during_training_leaves_a_loadable_checkpoint(self):
        proc = subprocess.Popen(self.args(), cwd=self.dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            self.status_until(proc, r"warmup (step [1-9]|done)")
            deadline = time.time() + 90                # /status shows the workers' steps before the
            while not os.path.exists(self.path("macrogpt.ckpt")) and time.time() < deadline:   # first save
                time.sleep(0.2)
            self.status_until(proc, r"warmup (step [1-9]|done)")      # still training: kill it mid-job
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.communicate(timeout=60)
        body = M.read_checkpoint(self.path("macrogpt.ckpt"))
        self.assertGreater(body["step"], 0)
        code, out, err = self.run_cli("--no-train", "--prompt", "how is the rain today?")
        self.assertEqual(code, 0, err)
        self.assertTrue(out.strip())

    def test_prompt_tokenize_and_eval(self):
        code, out, err = self.run_cli("--prompt", "do you like the bird?")
        self.assertEqual((code, len(out.splitlines())), (0, 1), err)
        code, out, err = self.run_cli("--tokenize", "héllo 🙂")
        self.assertEqual(code, 0, err)
        self.assertIn("tokens for 11 bytes", out)
        code, out, err = self.run_cli("--eval", self.corpus)
        self.assertEqual(code, 0, err)
        result = json.loads(out.splitlines()[-1])
        self.assertGreater(result["field"], 0)
        self.assertGreater(result["network"], result["field"])        # untrained network vs field

    def assertCleanFailure(self, code, out, err, words):
        self.assertEqual(code, 2)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn(words, err)
        self.assertNotIn("Traceback", err)

    def test_bad_inputs_exit_2_and_change_nothing(self):
        code, out, err = self.run_cli("--corpus", self.path("missing.txt"), "--prompt", "hi")
        self.assertCleanFailure(code, out, err, "cannot read corpus")
        self.assertFalse(os.path.exists(self.path("memory.sqlite3")))

        with open(self.path("macrogpt.ckpt"), "wb") as f:
            f.write(b"macrogpt-checkpoint 99 abc\n{}")
        code, out, err = self.run_cli("--prompt", "hi")
        self.assertCleanFailure(code, out, err, "newer macrogpt")
        self.assertFalse(os.path.exists(self.path("memory.sqlite3")))
        os.remove(self.path("macrogpt.ckpt"))

        with open(self.path("memory.sqlite3"), "wb") as f:
            f.write(b"garbage" * 1000)
        code, out, err = self.run_cli("--prompt", "hi")
        self.assertCleanFailure(code, out, err, "not a macrogpt database")
        with open(self.path("memory.sqlite3"), "rb") as f:
            self.assertEqual(f.read(), b"garbage" * 1000)
        self.assertFalse(os.path.exists(self.path("macrogpt.ckpt")))

        with open(self.path("bad.json"), "w") as f:
            f.write('{"n_embd": 7}')
        code, out, err = self.run_cli("--config", "bad.json", "--prompt", "hi")
        self.assertCleanFailure(code, out, err, "divisible")
        code, out, err = self.run_cli("--no-such-flag")
        self.assertEqual(code, 2)
        self.assertNotIn("Traceback", err)



class BenchTest(unittest.TestCase):
    def test_bench_reports_the_promised_figures(self):
        cfg = M.Config(n_layer=1, n_embd=8, n_head=2, block_size=64, seq_len=64, bpe_num_merges=10,
                       enable_bpe_after_chars=0)
        printed = []
        with tempfile.TemporaryDirectory() as d:
            corpus = os.path.join(d, "corpus.txt")
            with open(corpus, "w", encoding="utf-8") as f:
                f.write("\n".join(synthetic_corpus()) + "\n")
            result = M.run_bench(cfg, corpus, out=printed.append)
            small = M.Config(**dict(cfg.to_dict(), enable_bpe_after_chars=10 ** 6))
            bytes_only = M.run_bench(small, corpus, out=lambda line: None)
        self.assertEqual(bytes_only["vocab"], 259)                # a corpus too small for BPE: bytes
        self.assertEqual(json.loads(printed[-1]), result)             # the last line is the JSON
        self.assertEqual(result["config"], cfg.to_dict())
        for key in ("train_tokens_per_s", "gen_tokens_per_s", "naive_mflops", "encode_bytes_per_s"):
            self.assertGreater(result[key], 0, key)
        # the model measured is the one a first run trains: bytes plus the corpus's merges
        self.assertEqual(result["bpe_merges"], 10)
        self.assertEqual(result["vocab"], 259 + 10)
        self.assertEqual(result["params"], M.GPT(cfg, 269).num_params())
        # 2 x multiply-adds of the forward x 3, counted from the config: the 1-layer model at T=64
        # has wq,wk,wv,wo 4*8*8, gate/value 2*32*8, fc2 8*32, head 269*8, attention 2*8*(64+1)/2
        macs = 4 * 64 + 2 * 256 + 256 + 269 * 8 + 2 * 8 * 65 / 2
        self.assertEqual(result["train_flops_per_token"], 3 * 2 * macs)


if __name__ == "__main__":
    unittest.main()
