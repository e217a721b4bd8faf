"""Checkpoints: exact round trip, damage detection, atomic replace, growing into a larger Config."""
import os
import random
import shutil
import tempfile
import unittest
from unittest import mock

import macrogpt as M
from tests.helpers import V, random_batch, save_checkpoint, tiny_config, train_delta_randomly


def trained_model(seed=0, **kw):
    rng = random.Random(seed)
    model = M.GPT(tiny_config(**kw), V, seed=seed)
    opt = M.Adam(model.cfg)
    for step in range(3):
        loss = model.loss(*random_batch(rng, 2, 6))
        loss.backward()
        opt.update(model.named_params(), 0.01)
    model.set_trainable(False)
    model.add_delta()
    train_delta_randomly(model, rng)
    return model, opt


class CheckpointTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "model.ckpt")
        self.model, self.opt = trained_model()
        self.seq = [1, 5, 7, 2, 9, 3]

    def tearDown(self):
        shutil.rmtree(self.dir)

    def test_round_trip_gives_identical_logits_and_state(self):
        save_checkpoint(self.path, self.model, self.opt, 42, {"note": "hi"})
        model, opt, step, extra = M.restore_checkpoint(M.read_checkpoint(self.path))
        self.assertEqual(step, 42)
        self.assertEqual(extra, {"note": "hi"})
        self.assertEqual(model.cfg, self.model.cfg)
        self.assertEqual(model.forward([self.seq]).data, self.model.forward([self.seq]).data)
        self.assertEqual(opt.state, self.opt.state)

    def test_truncated_or_garbage_file_fails_clearly_and_is_left_alone(self):
        save_checkpoint(self.path, self.model, self.opt, 1)
        with open(self.path, "rb") as f:
            good = f.read()
        rng = random.Random(0)
        cuts = [0, 1, 10, len(good) // 2, len(good) - 1] + [rng.randrange(len(good)) for _ in range(5)]
        damaged = [good[:n] for n in cuts]
        damaged.append(bytes(rng.randrange(256) for _ in range(500)))
        flipped = bytearray(good)
        flipped[len(good) // 2] ^= 1
        damaged.append(bytes(flipped))
        for blob in damaged:
            with open(self.path, "wb") as f:
                f.write(blob)
            with self.assertRaises(M.CheckpointError) as cm:
                M.restore_checkpoint(M.read_checkpoint(self.path))
            self.assertNotIn("\n", str(cm.exception))
            with open(self.path, "rb") as f:
                self.assertEqual(f.read(), blob)

    def test_deeply_nested_body_is_refused_in_one_line(self):
        body = b"[" * 100000 + b"]" * 100000                   # a correct digest: json itself gives up
        raw = b"%s %d %s\n" % (M.CKPT_MAGIC.encode(), M.CKPT_VERSION, M.hashlib.sha256(body).hexdigest().encode())
        with self.assertRaisesRegex(M.CheckpointError, "body is not valid JSON"):
            M.parse_checkpoint(raw + body)

    def body_with(self, change):
        save_checkpoint(self.path, self.model, self.opt, 1)
        body = M.read_checkpoint(self.path)
        change(body)
        return body

    def test_config_that_is_not_an_object_is_refused_in_one_line(self):
        body = self.body_with(lambda b: b.update(config="a\nb"))
        with self.assertRaisesRegex(M.CheckpointError, "damaged or incomplete"):
            M.restore_checkpoint(body)

    def test_random_state_out_of_range_is_refused_in_one_line(self):
        for word in (-1, 2 ** 64):                         # setstate takes 32-bit words only
            body = self.body_with(lambda b: b["rng"][1].__setitem__(5, word))
            with self.assertRaisesRegex(M.CheckpointError, "damaged or incomplete"):
                M.restore_checkpoint(body)

    def test_progress_of_the_wrong_kind_is_refused_in_one_line(self):
        brain = M.Brain.fresh(tiny_config())
        brain.progress.heldout = M.Heldout(4.0, 3.0, 2.5, 0.5, 100, 300.0)
        good = M.parse_checkpoint(brain.to_bytes())
        for key, value in (("loss", []), ("idle_phases", "3"), ("warmup_done", 1), ("lam", float("nan")),
                           ("heldout", dict(good["extra"]["progress"]["heldout"], mix_bpb=""))):
            body = M.parse_checkpoint(brain.to_bytes())
            body["extra"]["progress"][key] = value
            with self.assertRaisesRegex(M.CheckpointError, "checkpoint progress is damaged"):
                M.Brain.from_body(body)
        self.assertEqual(M.Brain.from_body(good).progress, brain.progress)

    def test_extra_parts_of_the_wrong_kind_are_refused_in_one_line(self):
        good = M.parse_checkpoint(M.Brain.fresh(tiny_config()).to_bytes())
        for change in (lambda b: b.update(extra=False), lambda b: b["extra"].update(tokenizer=[1]),
                       lambda b: b["extra"].update(progress=["abc"]), lambda b: b["extra"].update(progress=7)):
            body = M.json.loads(M.json.dumps(good))
            change(body)
            with self.assertRaisesRegex(M.CheckpointError, "no tokenizer state|progress is damaged"):
                M.Brain.from_body(body)

    def test_sizes_beyond_the_stored_weights_are_refused_before_allocating(self):
        real_zeros = M.zeros

        def zeros(rows, cols):                             # vocab_size 10**9 was a MemoryError after 30 s
            self.assertLessEqual(rows * cols, 10 ** 6, "allocated what the file only claims")
            return real_zeros(rows, cols)
        for change in (lambda b: b.update(vocab_size=10 ** 9), lambda b: b["config"].update(n_layer=10 ** 6),
                       lambda b: b["config"].update(n_embd=10 ** 5), lambda b: b["config"].update(delta_rank=10 ** 7)):
            body = self.body_with(change)
            with mock.patch.object(M, "zeros", zeros):
                with self.assertRaisesRegex(M.CheckpointError, "claim more weights than it holds"):
                    M.restore_checkpoint(body)

    def test_step_and_alphas_of_the_wrong_kind_are_refused_in_one_line(self):
        for change in (lambda b: b.update(step="x"), lambda b: b.update(step=None), lambda b: b.update(step=-1),
                       lambda b: b.update(delta_alphas=[10 ** 400]), lambda b: b.update(delta_alphas=["1"])):
            with self.assertRaisesRegex(M.CheckpointError, "damaged or incomplete \\(TypeError: (step|a delta alpha) is"):
                M.restore_checkpoint(self.body_with(change))

    def test_future_version_is_refused(self):
        save_checkpoint(self.path, self.model, self.opt, 1)
        with open(self.path, "rb") as f:
            data = f.read().replace(b"macrogpt-checkpoint %d " % M.CKPT_VERSION, b"macrogpt-checkpoint 9 ", 1)
        with open(self.path, "wb") as f:
            f.write(data)
        with self.assertRaisesRegex(M.CheckpointError, "newer macrogpt"):
            M.read_checkpoint(self.path)

    def test_crash_before_rename_keeps_previous_checkpoint(self):
        save_checkpoint(self.path, self.model, self.opt, 1)
        other, other_opt = trained_model(seed=5)
        with mock.patch("os.replace", side_effect=OSError("simulated crash")):
            with self.assertRaises(M.CheckpointError):          # one line for the user, not OSError
                save_checkpoint(self.path, other, other_opt, 2)
        model, _, step, _ = M.restore_checkpoint(M.read_checkpoint(self.path))
        self.assertEqual(step, 1)
        self.assertEqual(model.forward([self.seq]).data, self.model.forward([self.seq]).data)

    def test_unwritable_path_is_one_clear_error(self):
        bad = os.path.join(self.path + "-missing-folder", "x.ckpt")
        with self.assertRaises(M.CheckpointError) as cm:
            save_checkpoint(bad, self.model, self.opt, 1)
        self.assertIn("cannot write checkpoint", str(cm.exception))

    def test_killed_writer_leaves_previous_checkpoint(self):
        # a kill after the temp file is written but before the rename leaves only a stray .tmp
        save_checkpoint(self.path, self.model, self.opt, 1)
        with open(M.temp_name(self.path), "wb") as f:
            f.write(b"macrogpt-checkpoint 1 half-writ")
        _, _, step, _ = M.restore_checkpoint(M.read_checkpoint(self.path))
        self.assertEqual(step, 1)
        save_checkpoint(self.path, self.model, self.opt, 3)
        self.assertFalse(os.path.exists(M.temp_name(self.path)))


class GrowConfigTest(unittest.TestCase):
    def setUp(self):
        self.model, self.opt = trained_model(seed=3)
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "model.ckpt")
        save_checkpoint(self.path, self.model, self.opt, 7)
        self.seq = [4, 8, 15, 16, 2, 3]
        self.before = self.model.forward([self.seq]).data

    def tearDown(self):
        shutil.rmtree(self.dir)

    def max_logit_change(self, **kw):
        cfg = tiny_config(**kw)
        model, opt, step, _ = M.restore_checkpoint(M.read_checkpoint(self.path), cfg)
        self.assertEqual(model.cfg, cfg)
        self.assertEqual(step, 7)
        after = model.forward([self.seq]).data
        return max(abs(a - b) for ra, rb in zip(after, self.before) for a, b in zip(ra, rb))

    def test_growing_keeps_the_function_close(self):
        # logits here reach about 3; each growth must move them by less than 1e-2 (measured: 1e-3 to 4e-3)
        self.assertLess(self.max_logit_change(n_layer=3), 1e-2)
        self.assertLess(self.max_logit_change(n_embd=12, n_head=3), 1e-2)
        self.assertLess(self.max_logit_change(delta_rank=4), 1e-12)
        self.assertLess(self.max_logit_change(block_size=20), 1e-12)
        self.assertLess(self.max_logit_change(n_layer=4, n_embd=16, n_head=4, delta_rank=3), 1e-2)

    def test_grown_model_keeps_training(self):
        model, opt, _, _ = M.restore_checkpoint(M.read_checkpoint(self.path), tiny_config(n_layer=3))
        loss = model.loss(*random_batch(random.Random(1), 2, 6))
        loss.backward()
        opt.update(model.named_params(), 0.01)

    def test_shrink_or_incompatible_change_names_the_field_and_touches_nothing(self):
        with open(self.path, "rb") as f:
            before = f.read()
        cases = [("n_embd", dict(n_embd=4, n_head=1)), ("n_layer", dict(n_layer=1)),
                 ("delta_rank", dict(delta_rank=1)), ("n_head", dict(n_embd=8, n_head=4)),
                 ("tie_embeddings", dict(tie_embeddings=False))]
        for field, kw in cases:
            with self.assertRaisesRegex(M.CheckpointError, field):
                M.restore_checkpoint(M.read_checkpoint(self.path), tiny_config(**kw))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), before)


if __name__ == "__main__":
    unittest.main()
