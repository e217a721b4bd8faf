"""The background trainer with a tiny model: warmup resume, burst triggers, frozen base, rollback."""
import asyncio
import os
import shutil
import tempfile
import types
import unittest

import macrogpt as M
from tests.helpers import TOPICS, Clock, synthetic_corpus, tiny_trainer_config


class TrainerTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.ckpt = os.path.join(self.dir, "macrogpt.ckpt")
        self.memory = M.Memory(os.path.join(self.dir, "memory.sqlite3"))
        self.addCleanup(self.memory.close)
        train, self.heldout = M.split_heldout(synthetic_corpus(), 5)
        self.memory.add_corpus_lines(train, "seed")
        self.clock = Clock()

    def trainer(self, cfg, brain=None, pool=None):
        brain = brain or M.Brain.fresh(cfg, seed=1)
        corpus = M.Corpus(cfg, self.memory, brain.tok, self.heldout, seed=1)
        t = M.Trainer(cfg, corpus, self.memory, brain, pool or M.Pool(0, 1), ckpt_path=self.ckpt, now=self.clock, seed=1)
        t.grow_tokenizer()
        return t

    def run_tick(self, trainer):
        return asyncio.run(trainer.tick())

    def warmed_up(self, cfg):
        t = self.trainer(cfg)
        while not t.brain.progress.warmup_done:
            self.run_tick(t)
        return t

    def test_bpe_grows_model_and_field_together(self):
        t = self.trainer(tiny_trainer_config())
        self.assertGreater(t.brain.tok.vocab_size, M.N_BASE_VOCAB)
        self.assertEqual(t.brain.model.vocab_size, t.brain.tok.vocab_size)
        self.assertEqual(t.corpus.field.vocab_size, t.brain.tok.vocab_size)
        self.assertIs(t.corpus.tok, t.brain.tok)

    def test_a_retrain_adds_the_retrain_merges_not_the_first_count(self):
        t = self.trainer(tiny_trainer_config(bpe_num_merges=20, bpe_retrain_merges=3, bpe_retrain_every_chars=50))
        first = t.brain.tok.vocab_size
        self.assertEqual(first, M.N_BASE_VOCAB + 20)
        t.corpus.add(["H: a new line about %s and %s" % (a, b) for a in TOPICS[:3] for b in TOPICS[3:6]], "chat")
        self.assertTrue(t.grow_tokenizer())
        self.assertEqual(t.brain.tok.vocab_size, first + 3)
        self.assertEqual(t.brain.model.vocab_size, first + 3)

    def test_warmup_resumes_after_restart(self):
        cfg = tiny_trainer_config()                              # checkpoint_every_seconds = 0: a job is one step
        t = self.trainer(cfg)
        self.run_tick(t)
        self.assertEqual(t.brain.step, 1)
        self.assertFalse(t.brain.progress.warmup_done)
        self.assertEqual(M.Brain.load_or_fresh(self.ckpt, cfg, seed=1).step, 1)
        again = self.trainer(cfg, M.Brain.load_or_fresh(self.ckpt, cfg, seed=1))
        while not again.brain.progress.warmup_done:
            self.run_tick(again)
        self.assertEqual(again.brain.step, 16)
        self.assertEqual(again.brain.model.n_deltas, 1)
        h = again.brain.progress.heldout
        self.assertTrue(h.field_bpb > 0 and h.model_bpb > 0)
        self.assertLessEqual(h.mix_bpb, min(h.field_bpb, h.model_bpb) + 1e-9)
        self.assertEqual(M.Brain.load_or_fresh(self.ckpt, cfg).step, 16)

    def test_workers_load_the_brain_only_after_it_changed(self):
        cfg = tiny_trainer_config(warmup_steps=8)
        t = self.trainer(cfg)
        loads = []
        original = t.pool.load
        t.pool.load = lambda brain: (loads.append(brain.step), original(brain))
        self.run_tick(t)
        self.run_tick(t)
        self.assertEqual(len(loads), 1)                          # two jobs, one load
        t.brain.model.add_delta()
        t.pool.reset(t.brain)                                    # a change made here must travel
        self.run_tick(t)
        self.assertEqual(len(loads), 2)
        self.assertEqual(t.pool.local.brain.model.n_deltas, 1)

    def test_burst_waits_for_material_and_cooldown(self):
        cfg = tiny_trainer_config(idle_training=False)
        t = self.warmed_up(cfg)
        self.clock.t += 100
        self.assertFalse(t.burst_due())                          # nothing new yet
        t.corpus.add(["H: where does the river go at night?", "A: it goes to the sea."], "chat")
        self.assertTrue(t.burst_due())
        step = t.brain.step
        self.assertTrue(self.run_tick(t))
        self.assertEqual(t.pool.step, step + cfg.micro_steps)
        self.assertEqual(t.brain.progress.bursts, 1)
        t.corpus.add(["H: and the moon, where does it sleep?", "A: behind the hills."], "chat")
        self.assertFalse(t.burst_due())                          # within the 30 s cooldown
        self.clock.t += 31
        self.assertTrue(t.burst_due())

    def test_material_still_waiting_for_a_burst_survives_a_restart(self):
        cfg = tiny_trainer_config(idle_training=False)
        t = self.warmed_up(cfg)
        t.corpus.add(["H: where does the river go at night?", "A: it goes to the sea."], "chat")
        pending = t.corpus.pending.bytes
        self.assertGreater(pending, 0)
        again = self.trainer(cfg, M.Brain.load_or_fresh(self.ckpt, cfg, seed=1))
        self.assertEqual(again.corpus.pending.bytes, pending)
        self.clock.t += 100
        self.assertTrue(again.burst_due())
        self.run_tick(again)
        third = self.trainer(cfg, M.Brain.load_or_fresh(self.ckpt, cfg, seed=1))
        self.assertEqual(third.corpus.pending.bytes, 0)          # that material has had its burst

    def test_frozen_base_is_untouched_by_bursts(self):
        cfg = tiny_trainer_config(forget_tolerance=10.0, idle_training=False)
        t = self.warmed_up(cfg)
        base = {n: [list(r) for r in p.data] for n, p in t.brain.model.base_params()}
        deltas = {n: [list(r) for r in p.data] for n, p in t.brain.model.delta_params()}
        self.clock.t += 100
        t.corpus.add(["H: a brand new question about lamps", "A: lamps glow at dusk."], "chat")
        self.run_tick(t)
        self.assertEqual(t.brain.progress.bursts, 1)
        self.assertEqual({n: p.data for n, p in t.brain.model.base_params()}, base)
        changed = {n: p.data for n, p in t.brain.model.delta_params()}
        self.assertNotEqual(changed, deltas)

    def test_harmful_burst_is_rolled_back_and_logged(self):
        cfg = tiny_trainer_config(forget_tolerance=0.0, lr=0.5, lr_min=0.5, micro_steps=6, idle_training=False)
        t = self.warmed_up(cfg)
        t.brain.progress.best_nll /= 2                           # a bar no burst of garbage can reach
        before_brain = t.brain
        weights = {n: [list(r) for r in p.data] for n, p in t.brain.model.named_params()}
        self.clock.t += 100
        garbage = ["%08x zq xj %d vv" % (i * 2654435761 % 2 ** 32, i) for i in range(60)]
        t.corpus.add(garbage, "chat")
        self.assertTrue(t.burst_due())
        self.run_tick(t)
        self.assertIs(t.brain, before_brain)
        self.assertEqual({n: p.data for n, p in t.brain.model.named_params()}, weights)
        self.assertEqual(t.pool.step, t.brain.step)                   # the rolled-back steps are gone
        self.assertEqual(self.memory.rejected_bursts(), 1)
        self.assertEqual(M.Brain.load_or_fresh(self.ckpt, cfg).progress.bursts, 1)     # counted across a restart
        self.assertIn("rejected", self.memory.growth_rows()[-1]["note"])

    def test_judge_compares_with_the_best_accepted_state(self):
        cfg = tiny_trainer_config(forget_tolerance=0.02, idle_training=False)
        t = self.warmed_up(cfg)
        now = t.brain.progress.heldout.nll
        t.brain.progress.best_nll = now / 1.01                   # 1% worse than the best: kept
        self.assertTrue(asyncio.run(t.judge("test", cfg.forget_tolerance)))
        self.assertAlmostEqual(t.brain.progress.best_nll, now / 1.01)   # the bar never rises
        t.brain.progress.best_nll = now / 1.05                   # 5% worse: rolled back
        self.assertFalse(asyncio.run(t.judge("test", cfg.forget_tolerance)))

    def test_idle_learning_runs_when_no_burst_is_due_and_a_harmful_phase_is_rolled_back(self):
        cfg = tiny_trainer_config(forget_tolerance=0.0, lr=0.5, lr_min=0.5, idle_steps=6)
        t = self.warmed_up(cfg)
        t.brain.progress.best_nll /= 2
        weights = {n: [list(r) for r in p.data] for n, p in t.brain.model.named_params()}
        step = t.brain.step
        self.assertTrue(self.run_tick(t))                        # nothing to burst on: an idle phase
        self.assertEqual(t.brain.progress.idle_phases, 1)
        self.assertIn("rejected idle", self.memory.growth_rows()[-1]["note"])
        self.assertEqual({n: p.data for n, p in t.brain.model.named_params()}, weights)   # never adopted
        self.assertEqual((t.brain.step, t.pool.step), (step, step + 6))      # the workers train on from it
        for phases in range(2, M.IDLE_PATIENCE + 1):             # one rollback may be noise: try again
            self.assertTrue(self.run_tick(t))
            self.assertEqual(t.brain.progress.idle_phases, phases)
        self.assertEqual((t.brain.step, t.pool.step), (step, step))          # the third: back to the best
        self.assertEqual({n: p.data for n, p in t.brain.model.named_params()}, weights)
        self.assertFalse(self.run_tick(t))                       # a plateau: rest for two minutes
        self.clock.t += 119
        self.assertFalse(self.run_tick(t))
        self.clock.t += 2
        for phases in range(1, M.IDLE_PATIENCE):                 # then try as patiently as before
            self.assertTrue(self.run_tick(t))
            self.assertEqual((t.brain.step, t.pool.step), (step, step + 6 * phases))
        self.assertTrue(self.run_tick(t))
        self.assertEqual((t.brain.step, t.pool.step), (step, step))
        self.assertFalse(self.run_tick(t))                       # then rest for four
        self.clock.t += 239
        self.assertFalse(self.run_tick(t))
        self.clock.t += 2
        self.assertTrue(self.run_tick(t))

    def test_quitting_keeps_warmup_steps_but_never_an_unjudged_phase(self):
        cfg = tiny_trainer_config(idle_steps=4)
        t = self.trainer(cfg)
        asyncio.run(t.job(3, True))                              # warmup steps, not adopted yet
        t.shutdown()
        self.assertEqual(t.brain.step, 3)
        t = self.warmed_up(cfg)
        weights = {n: [list(r) for r in p.data] for n, p in t.brain.model.named_params()}
        step = t.brain.step
        asyncio.run(t.job(4, True))                              # an idle phase cut short by /quit
        self.assertEqual(t.pool.step, step + 4)
        t.shutdown()
        self.assertEqual(t.brain.step, step)
        self.assertEqual({n: p.data for n, p in t.brain.model.named_params()}, weights)

    def test_a_burst_after_an_idle_phase_not_kept_starts_from_the_accepted_brain(self):
        cfg = tiny_trainer_config(forget_tolerance=10.0, lr=0.5, lr_min=0.5, idle_steps=6)
        t = self.warmed_up(cfg)
        best, step = t.brain.progress.best_nll, t.brain.step
        t.brain.progress.best_nll = best / 2
        self.assertTrue(self.run_tick(t))                        # an idle phase, not kept
        self.assertEqual(t.pool.step, step + 6)
        t.brain.progress.best_nll = best
        self.clock.t += 100
        t.corpus.add(["H: where does the river go at night?", "A: it goes to the sea."], "chat")
        self.assertTrue(t.burst_due())
        self.assertTrue(self.run_tick(t))                        # the burst, kept
        self.assertEqual(t.brain.progress.bursts, 1)
        self.assertEqual(t.brain.step, step + cfg.micro_steps)   # not step + 6 + micro_steps

    def test_an_idle_phase_anneals_from_idle_lr_to_the_floor(self):
        cfg = tiny_trainer_config(forget_tolerance=10.0, idle_steps=6, lr=0.01, lr_min=0.001, idle_lr=0.004,
                                  lr_decay_steps=16)
        t = self.warmed_up(cfg)
        rates = []
        original = t.pool.train_step
        t.pool.train_step = lambda batch, lr, *rest: (rates.append(lr), original(batch, lr, *rest))[1]
        self.assertTrue(self.run_tick(t))
        self.assertEqual(t.brain.progress.idle_phases, 1)
        self.assertEqual(len(rates), 6)
        self.assertAlmostEqual(rates[0], 0.004)
        self.assertEqual(rates, sorted(rates, reverse=True))
        self.assertAlmostEqual(rates[-1], 0.001)
        rates.clear()
        self.assertTrue(self.run_tick(t))                        # every phase starts at the peak again
        self.assertAlmostEqual(rates[0], 0.004)
        self.assertEqual(M.idle_lr_at(0, 5, 6, cfg), M.lr_at(0, cfg))   # early on the schedule is higher

    def test_an_idle_phase_must_not_be_worse_than_the_best_even_within_the_burst_tolerance(self):
        cfg = tiny_trainer_config(forget_tolerance=0.05, lr=1e-12, lr_min=0.0, idle_steps=2)
        t = self.warmed_up(cfg)
        t.brain.progress.best_nll /= 1.001                       # the phase changes nothing: 0.1% worse
        self.assertTrue(self.run_tick(t))
        self.assertIn("rejected idle", self.memory.growth_rows()[-1]["note"])

    def test_idle_learning_trains_the_base_and_can_be_switched_off(self):
        cfg = tiny_trainer_config(forget_tolerance=10.0, idle_steps=4)
        t = self.warmed_up(cfg)
        base = {n: [list(r) for r in p.data] for n, p in t.brain.model.base_params()}
        self.assertTrue(self.run_tick(t))
        self.assertEqual(t.brain.progress.idle_phases, 1)
        self.assertNotEqual({n: p.data for n, p in t.brain.model.base_params()}, base)
        off = self.warmed_up(tiny_trainer_config(idle_training=False))
        self.assertFalse(self.run_tick(off))
        self.assertEqual(off.status, "waiting for new material")


class VoiceTest(unittest.TestCase):
    def test_first_reply_from_an_untrained_brain_is_corpus_like(self):
        cfg = tiny_trainer_config()
        brain = M.Brain.fresh(cfg, seed=0)
        lines = synthetic_corpus()
        brain.tok.train(lines, 30)
        brain.model.grow_vocab(brain.tok.vocab_size)
        field = M.NGramField(3, brain.tok.vocab_size, 0.75)
        field.rebuild([brain.tok.encode(l) for l in lines])
        voice = M.Voice(cfg, seed=3)
        corpus = types.SimpleNamespace(field=field, recall=M.Recall(lines), lexicon=None)
        recalled = corpus.recall.answers_for("do you like the rain?")
        self.assertIn("A: I like the rain when it is calm.", recalled)
        vocab = set(" ".join(lines).replace(".", " ").replace(",", " ").replace("?", " ").split())
        known = total = 0
        for _ in range(5):
            reply = voice.reply(brain, corpus, [], "do you like the rain?")
            self.assertTrue(reply)
            self.assertTrue(all(32 <= ord(c) < 127 for c in reply), reply)     # corpus is plain ASCII
            words = reply.replace(".", " ").replace(",", " ").split()
            known += sum(1 for w in words if w in vocab)
            total += len(words)
        self.assertGreater(known / total, 0.8)          # smoothing may coin a word; noise would not pass

    def test_lexicon_guard_lets_words_grow_only_into_known_words(self):
        tok = M.Tokenizer()                                  # bytes only: one letter per token
        lex = M.Lexicon(["I am sure.", "A stretch of sand."])
        p = [1.0] * tok.vocab_size
        allowed = lambda text: {tok.decode([i]).lower() for i, v in enumerate(lex.guard(p, tok, text.encode())) if v > 0}
        self.assertEqual({c for c in allowed("I am sur") if c.isalpha()}, {"e"})
        self.assertNotIn(".", allowed("I am sur"))         # "sur" is not a word: it cannot end here
        self.assertIn(".", allowed("I am sure"))
        self.assertEqual({c for c in allowed("I am sure") if c.isalpha()}, set())   # no "suret..."
        self.assertEqual({c for c in allowed("") if c.isalpha()}, set("iaso"))   # first letters
        self.assertIn("!", allowed("a stretch"))           # punctuation never starts a word
        only_z = [0.0] * tok.vocab_size
        only_z[ord("z")] = 1.0
        self.assertEqual(lex.guard(only_z, tok, b"I am"), only_z)   # never leaves nothing to say
        cafe = M.Lexicon(["un caf\u00e9 noir"])                    # e-acute is c3 a9 in UTF-8
        after_caf = cafe.guard(p, tok, b"caf")
        self.assertGreater(after_caf[0xC3], 0.0)                  # may begin the e-acute ...
        self.assertEqual(after_caf[0xC4], 0.0)                    # ... not another character
        self.assertEqual(after_caf[0xA9], 0.0)                    # a stray continuation byte is not UTF-8
        mid = cafe.guard(p, tok, b"caf\xc3")
        self.assertEqual([i for i, v in enumerate(mid) if v > 0 and i < 256], [0x89, 0xA9])   # É or é
        self.assertEqual(mid[M.EOS], 0.0)                         # a reply never ends mid-character

    def test_lexicon_skips_letter_runs_too_long_to_be_words(self):
        lex = M.Lexicon(["ACGT" * 15000 + " and a cat"])          # all prefixes would take gigabytes
        self.assertEqual(lex.words, {"and", "a", "cat"})

    def test_lexicon_guard_reads_a_capital_final_sigma_as_its_tokens_do(self):
        # "ΣΑΣ".lower() is "σας" but "Σ".lower() is "σ": lowered differently, the word in
        # progress stopped being a known prefix, every token was banned and the guard gave up.
        tok = M.Tokenizer()
        lex = M.Lexicon(["\u03a3\u0391\u03a3\u0391 \u03c3\u03b1\u03b4"])      # "ΣΑΣΑ σαδ"
        p = [1.0] * tok.vocab_size
        p[M.BOS] = p[M.PAD] = 0.0
        guarded = lex.guard(p, tok, "\u03a3\u0391\u03a3".encode() + b"\xce")   # "ΣΑΣ" and half of Α
        self.assertFalse(guarded is p, "the guard gave up")
        self.assertEqual(guarded[M.EOS], 0.0)
        self.assertEqual([i for i, v in enumerate(guarded) if v > 0], [0x91, 0xB1])   # Α or α

    def test_replies_use_only_corpus_words(self):
        # Short lines sharing many letter sequences: a byte-level field backing off from an
        # unseen context joins pieces of different words, so unguarded replies coin words.
        lines = ["A: the %s %s near the %s." % (a, b, c) for a, b, c in
                 zip(TOPICS, TOPICS[3:] + TOPICS[:3], TOPICS[7:] + TOPICS[:7])]
        cfg = tiny_trainer_config(max_gen_tokens=40, min_gen_tokens=6, temperature=1.5,
                                  top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0)
        brain = M.Brain.fresh(cfg, seed=0)
        field = M.NGramField(3, brain.tok.vocab_size, 0.75)
        field.rebuild([brain.tok.encode(l) for l in lines])
        lexicon = M.Lexicon(lines)

        def coined(use_lexicon, n=12):
            voice = M.Voice(cfg, seed=9)
            bad = set()
            for _ in range(n):
                reply = voice.generate(brain, field, 0.0, [], "hello", None, lexicon if use_lexicon else None)
                bad |= {w for w in M.LETTERS_RE.findall(reply.lower()) if w not in lexicon.words}
            return bad
        self.assertTrue(coined(False))                      # the test can fail: unguarded replies coin
        self.assertEqual(coined(True), set())

    def test_a_reply_cut_short_never_ends_inside_a_character(self):
        lines = ["A: \u6211\u559c\u6b22\u4e0b\u96e8\u5929\u56e0\u4e3a\u5f88\u5b89\u9759" * 2,
                 "H: \u4f60\u597d\u5417\u4eca\u5929\u5929\u6c14\u600e\u4e48\u6837" * 2]   # no spaces
        cfg = tiny_trainer_config(max_gen_tokens=14, min_gen_tokens=6)
        brain = M.Brain.fresh(cfg, seed=0)
        field = M.NGramField(3, brain.tok.vocab_size, 0.75)
        field.rebuild([brain.tok.encode(l) for l in lines])
        corpus = types.SimpleNamespace(field=field, recall=M.Recall(lines), lexicon=M.Lexicon(lines))
        for seed in range(4):
            reply = M.Voice(cfg, seed=seed).reply(brain, corpus, [], "\u4f60\u597d")
            self.assertTrue(reply)
            self.assertNotIn("\ufffd", reply)

    def test_clean_reply(self):
        self.assertEqual(M.clean_reply("A: hello there. and then", False), "hello there.")
        self.assertEqual(M.clean_reply("hello there H: next", True), "hello there")
        self.assertEqual(M.clean_reply("one two three", False), "one two")


if __name__ == "__main__":
    unittest.main()
