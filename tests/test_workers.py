"""Data-parallel workers: exact gradients, bit-identical replicas, supervision, per-row Adam."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import macrogpt as M
from tests.helpers import CliCase, ROOT, synthetic_corpus, tiny_trainer_config, train_step


def brain_bytes(cfg, seed=2):
    brain = M.Brain.fresh(cfg, seed)
    brain.model.add_delta()
    return brain.to_bytes()


def batch(rng, n, T, V=M.N_BASE_VOCAB):
    return [[rng.randrange(V) for _ in range(T + 1)] for _ in range(n)]


class ShardGradientTest(unittest.TestCase):
    """In one process: weighted shard gradients add up to the whole batch's gradient."""

    def test_shards_sum_to_the_batch_gradient(self):
        cfg = tiny_trainer_config()
        raw = brain_bytes(cfg)
        rng = random.Random(1)
        windows = batch(rng, 5, 10)
        _, _, whole = M.Replica(raw).grad(windows, 1.0, True)
        total = [0.0] * len(whole)
        for shard in (windows[0::2], windows[1::2]):
            _, _, part = M.Replica(raw).grad(shard, len(shard) / len(windows), True)
            total = [a + b for a, b in zip(total, part)]
        scale = max(abs(v) for v in whole)
        self.assertGreater(scale, 0.0)
        self.assertLess(max(abs(a - b) for a, b in zip(total, whole)) / scale, 1e-12)


def teach(rng, windows, V=M.N_BASE_VOCAB):
    """Random teacher rows (Corpus.teach's shape) for the windows."""
    k, out = M.TEACHER_TOP_K, []
    for w in windows:
        ids = M.array.array("i", [rng.randrange(V) for _ in range((len(w) - 1) * k)])
        ws = M.array.array("f", [rng.random() / k for _ in range((len(w) - 1) * k)])
        out.append((ids, ws))
    return out


class WorkersTest(unittest.TestCase):
    def setUp(self):
        self.cfg = tiny_trainer_config(batch_size=4)
        self.raw = brain_bytes(self.cfg)
        self.workers = M.Pool(2, seed=0)
        self.addCleanup(self.workers.close)
        self.workers.load(M.Brain.from_bytes(self.raw))

    def replicas(self):
        return self.workers._call([(M.op_to_bytes,)] * self.workers.n)

    def job(self, brain, stream, steps):
        batches = [M.sample_starts(len(stream), self.cfg.batch_size, self.cfg.seq_len, self.rng) for _ in range(steps)]
        return M.run_job(self.workers, brain, self.cfg, stream, batches, None, True)

    def test_the_all_reduced_gradient_is_the_whole_batch_gradient(self):
        w = self.workers
        windows = batch(random.Random(3), 4, 10)
        shards = [windows[0::2], windows[1::2]]
        w._call([(M.op_grad, s, 0.5, True, None, 0.0) for s in shards])
        size = M.Replica(self.raw).grad_size(True)
        view = memoryview(w.shared).cast("B").cast("d")
        reduced = M._sum_slots(view, 2, w.capacity, size)
        _, _, whole = M.Replica(self.raw).grad(windows, 1.0, True)
        scale = max(abs(v) for v in whole)
        self.assertLess(max(abs(a - b) for a, b in zip(reduced, whole)) / scale, 1e-12)

    def test_the_all_reduced_gradient_with_a_teacher_is_the_whole_batch_gradient(self):
        w, rng = self.workers, random.Random(4)
        windows = batch(rng, 4, 10)
        rows = teach(rng, windows)
        w._call([(M.op_grad, windows[k::2], 0.5, True, rows[k::2], 0.3) for k in range(2)])
        size = M.Replica(self.raw).grad_size(True)
        reduced = M._sum_slots(memoryview(w.shared).cast("B").cast("d"), 2, w.capacity, size)
        _, _, whole = M.Replica(self.raw).grad(windows, 1.0, True, rows, 0.3)
        _, _, plain = M.Replica(self.raw).grad(windows, 1.0, True)
        scale = max(abs(v) for v in whole)
        self.assertLess(max(abs(a - b) for a, b in zip(reduced, whole)) / scale, 1e-12)
        self.assertGreater(max(abs(a - b) for a, b in zip(plain, whole)) / scale, 1e-3)   # the teacher counts
        model = M.Brain.from_bytes(self.raw).model                    # and is the op, row by row in order
        k = M.TEACHER_TOP_K
        teacher = [(ids[r:r + k], ws[r:r + k]) for ids, ws in rows for r in range(0, len(ids), k)]
        loss = M.mean(M.cross_entropy(model.forward([s[:-1] for s in windows]),
                                      [t for s in windows for t in s[1:]], teacher, 0.3))
        replica_loss, _, _ = M.Replica(self.raw).grad(windows, 1.0, True, rows, 0.3)
        self.assertAlmostEqual(replica_loss, loss.data[0][0], places=12)

    def test_replicas_stay_bit_identical_and_match_one_process(self):
        rng = random.Random(4)
        inline = M.Pool(0)
        inline.load(M.Brain.from_bytes(self.raw))
        for i in range(4):
            b = batch(rng, 4, 10)
            loss2, tokens2 = self.workers.train_step(b, 0.01, True)
            loss1, tokens1 = inline.train_step(b, 0.01, True)
            self.assertEqual(tokens1, tokens2)
            self.assertAlmostEqual(loss1, loss2, places=10)
        a, b = self.replicas()
        self.assertEqual(a, b)                                    # bit-identical, Adam state included
        one = M.Brain.from_bytes(inline.pull()).model
        two = M.Brain.from_bytes(a).model
        self.assertEqual(M.Brain.from_bytes(a).step, 4)
        for (name, p), (_, q) in zip(one.named_params(), two.named_params()):
            for r1, r2 in zip(p.data, q.data):
                for x, y in zip(r1, r2):
                    self.assertAlmostEqual(x, y, delta=1e-9, msg=name)

    def test_a_killed_worker_is_replaced_and_training_goes_on(self):
        brain, self.rng = M.Brain.from_bytes(self.raw), random.Random(0)
        stream = [M.EOS] + list(range(40)) * 10
        self.job(brain, stream, 2)
        os.kill(self.workers.procs[1].pid, signal.SIGKILL)
        self.workers.procs[1].join(5)
        losses, _, _ = self.job(brain, stream, 3)
        self.assertEqual(len(losses), 3)                          # only the step in flight was lost
        self.assertEqual(self.workers.step, 5)
        self.assertEqual(self.workers.restarts, 1)
        self.assertIn("worker 1", self.workers.failures[0])
        a, b = self.replicas()
        self.assertEqual(a, b)
        self.assertEqual(M.Brain.from_bytes(a).step, 5)

    def test_a_hung_worker_is_replaced(self):
        brain, self.rng = M.Brain.from_bytes(self.raw), random.Random(0)
        old_timeout, M.WORKER_TIMEOUT = M.WORKER_TIMEOUT, 2.0
        self.addCleanup(setattr, M, "WORKER_TIMEOUT", old_timeout)
        hung = self.workers.procs[0]
        os.kill(hung.pid, signal.SIGSTOP)
        stream = [M.EOS] + list(range(40)) * 10
        losses, _, _ = self.job(brain, stream, 2)
        self.assertEqual(len(losses), 2)
        self.assertFalse(hung.is_alive())
        self.assertIn("did not answer", self.workers.last_failure)
        self.assertEqual(M.Brain.from_bytes(self.replicas()[0]).step, 2)

    def test_close_returns_quickly_even_with_a_stopped_worker(self):
        os.kill(self.workers.procs[1].pid, signal.SIGSTOP)
        self.workers.close()
        self.assertFalse(any(p.is_alive() for p in self.workers.procs))


def children_of(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def start_program(test, **config):
    """The real program training with two workers in a fresh folder -> (folder, Popen with pipes)."""
    d = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, d)
    with open(os.path.join(d, "corpus.txt"), "w") as f:
        f.write("\n".join(synthetic_corpus()) + "\n")
    with open(os.path.join(d, "tiny.json"), "w") as f:
        json.dump(dict(dict(n_layer=1, n_embd=8, n_head=2, block_size=16, seq_len=12, warmup_steps=10 ** 6,
                            train_workers=2, enable_bpe_after_chars=200, bpe_num_merges=20), **config), f)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "macrogpt.py"), "--corpus", "corpus.txt",
                             "--config", "tiny.json"], cwd=d, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return d, proc


@unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc to find the worker processes")
class OrphanTest(unittest.TestCase):
    def test_workers_leave_when_the_parent_is_killed(self):
        d, proc = start_program(self)
        try:
            deadline = time.time() + 60
            kids = []
            while time.time() < deadline and len(kids) < 2:   # the spawned workers (and a resource tracker)
                time.sleep(0.2)
                kids = children_of(proc.pid)
            self.assertGreaterEqual(len(kids), 2)
        finally:
            proc.kill()
            proc.communicate()
        deadline = time.time() + 30
        while time.time() < deadline and any(os.path.exists("/proc/%d" % k) for k in kids):
            time.sleep(0.2)
        alive = [k for k in kids if os.path.exists("/proc/%d" % k)]
        for k in alive:
            os.kill(k, signal.SIGKILL)
        self.assertEqual(alive, [])


@unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc to find the worker processes")
class WorkerDeathInTheProgramTest(unittest.TestCase):
    def test_a_worker_killed_mid_warmup_is_replaced_and_status_tells(self):
        d, proc = start_program(self, checkpoint_every_seconds=1.0)
        probe = CliCase()
        try:
            probe.status_until(proc, r"warmup step [1-9]")
            victims = children_of(proc.pid)
            self.assertTrue(victims)
            for pid in victims:                                     # the resource tracker, if any, is
                with open("/proc/%d/cmdline" % pid, "rb") as f:     # spared: only spawned workers die
                    if b"spawn_main" in f.read():
                        os.kill(pid, signal.SIGKILL)
                        break
            m = probe.status_until(proc, r"warmup step (\d+)/\d+ .*restarted 1 times")
            step = int(m.group(1))
            probe.status_until(proc, r"warmup step (%s)/" % "|".join(str(step + k) for k in range(1, 500)))
            proc.stdin.write(b"how is the sea today?\n/quit\n")
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        self.assertEqual(proc.returncode, 0, err)
        self.assertNotIn(b"Traceback", err)
        self.assertTrue(out.strip())                                # the reply came
        mem = M.Memory(os.path.join(d, "memory.sqlite3"))
        self.addCleanup(mem.close)
        events = mem.db.execute("SELECT detail FROM events WHERE kind = 'worker'").fetchall()
        self.assertEqual(len(events), 1, events)
        self.assertIn("training goes on", events[0][0])
        self.assertIn("how is the sea today?", [t for _, t in mem.recent_messages(4)])


class AdamPerRowTest(unittest.TestCase):
    def test_a_row_added_late_moves_like_a_fresh_parameter(self):
        cfg = M.Config(grad_clip=1e9)
        rng = random.Random(6)
        p, opt = M.param([[0.1, -0.2], [0.3, 0.4]]), M.Adam(cfg)
        for _ in range(100):
            p.grad = [[rng.gauss(0, 1), rng.gauss(0, 1)] for _ in range(2)]
            opt.update([("p", p)], 0.01)
        p.data.append([0.5, 0.5])                                  # grown, as grow_vocab does
        q, fresh = M.param([[0.5, 0.5]]), M.Adam(cfg)
        for _ in range(5):
            g = [rng.gauss(0, 1), rng.gauss(0, 1)]
            p.grad = [[0.0, 0.0], [0.0, 0.0], g]
            q.grad = [list(g)]
            opt.update([("p", p)], 0.01)
            fresh.update([("q", q)], 0.01)
        self.assertEqual(p.data[2], q.data[0])
        self.assertEqual(opt.state["p"].t, [105, 105, 5])

    def test_counts_survive_a_checkpoint_and_old_files_still_load(self):
        cfg = tiny_trainer_config()
        model, opt = M.GPT(cfg, M.N_BASE_VOCAB, 1), M.Adam(cfg)
        train_step(model, opt, [[1, 2, 3]], [[2, 3, 4]], 0.01)
        model.grow_vocab(M.N_BASE_VOCAB + 2)
        train_step(model, opt, [[1, 2, 3]], [[2, 3, 4]], 0.01)
        body = M.parse_checkpoint(M.checkpoint_bytes(model, opt, 2))
        _, again, _, _ = M.restore_checkpoint(body)
        self.assertEqual(again.state["wte"].t, opt.state["wte"].t)
        self.assertEqual(again.state["wte"].t[-2:], [1, 1])
        for entry in body["adam"].values():                       # format 1 kept one count per tensor
            entry["t"] = 2
        del body["rng"]
        body["version"] = 1
        _, old, _, _ = M.restore_checkpoint(body)
        self.assertEqual(old.state["wte"].t, [2] * (M.N_BASE_VOCAB + 2))


class RandomStateTest(unittest.TestCase):
    def test_rows_added_after_a_restore_continue_the_generator(self):
        cfg = tiny_trainer_config()
        brain = M.Brain.fresh(cfg, 7)
        initial = [list(r) for r in brain.model.wte.data]
        restored = M.Brain.from_bytes(brain.to_bytes())
        restored.model.grow_vocab(len(initial) + 3)
        brain.model.grow_vocab(len(initial) + 3)
        new_rows = restored.model.wte.data[len(initial):]
        self.assertEqual(new_rows, brain.model.wte.data[len(initial):])   # as if never restarted
        for row in new_rows:
            self.assertNotIn(row, initial)


if __name__ == "__main__":
    unittest.main()
