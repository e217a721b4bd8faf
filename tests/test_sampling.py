"""Sampling filters on hand-computed distributions, the seeded draw, and /set validation."""
import math
import random
import unittest

import macrogpt as M

P = [0.5, 0.3, 0.15, 0.05]


def settings(**kw):
    """A Config with every filter disabled unless given."""
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, repetition_guard=0,
                entropy_low=0.0, entropy_high=100.0)
    base.update(kw)
    return M.Config(**base)


class FilterTest(unittest.TestCase):
    def assertProbs(self, got, want):
        self.assertEqual(len(got), len(want))
        for g, w in zip(got, want):
            self.assertAlmostEqual(g, w, places=12)

    def test_min_p(self):
        # threshold 0.2 * 0.5 = 0.1 drops only 0.05
        self.assertProbs(M.filter_min_p(P, 0.2), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0])

    def test_typical_p(self):
        # H = 1.1421 nats; |-ln p - H| = 0.449, 0.062, 0.755, 1.853 -> order 1, 0, 2, 3
        self.assertAlmostEqual(M.entropy(P), 1.14212, places=4)
        self.assertProbs(M.filter_typical(P, 0.25), [0.0, 1.0, 0.0, 0.0])
        self.assertProbs(M.filter_typical(P, 0.5), [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0])
        self.assertProbs(M.filter_typical(P, 0.9), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0])

    def test_top_k(self):
        self.assertProbs(M.filter_top_k(P, 2), [0.625, 0.375, 0.0, 0.0])
        self.assertProbs(M.filter_top_k([0.4, 0.2, 0.2, 0.2], 2), [2 / 3, 1 / 3, 0.0, 0.0])

    def test_top_p(self):
        self.assertProbs(M.filter_top_p(P, 0.75), [0.625, 0.375, 0.0, 0.0])
        self.assertProbs(M.filter_top_p(P, 0.9), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0])

    def test_temperature(self):
        self.assertProbs(M.apply_temperature([0.8, 0.2], 0.5), [0.64 / 0.68, 0.04 / 0.68])
        self.assertProbs(M.apply_temperature([0.8, 0.2], 1.0), [0.8, 0.2])
        hot = M.apply_temperature([0.8, 0.2], 2.0)
        self.assertAlmostEqual(hot[0], math.sqrt(0.8) / (math.sqrt(0.8) + math.sqrt(0.2)))

    def test_disable_values_change_nothing(self):
        self.assertProbs(M.filter_min_p(P, 0.0), P)
        self.assertProbs(M.filter_typical(P, 1.0), P)
        self.assertProbs(M.filter_top_k(P, 0), P)
        self.assertProbs(M.filter_top_p(P, 1.0), P)

    def test_never_empty(self):
        self.assertProbs(M.filter_top_p(P, 0.0), [1.0, 0.0, 0.0, 0.0])
        self.assertProbs(M.filter_min_p(P, 1.0), [1.0, 0.0, 0.0, 0.0])
        self.assertEqual(sum(1 for p in M.filter_typical(P, 0.0) if p > 0), 1)
        self.assertProbs(M.filter_top_k(P, 1), [1.0, 0.0, 0.0, 0.0])
        strict = settings(top_k=1, top_p=0.01, min_p=1.0, typical_p=0.01, repetition_guard=2)
        probs = M.Sampler(strict).filtered([0.25] * 4, history=[0, 0, 0])
        self.assertAlmostEqual(sum(probs), 1.0)
        self.assertEqual(sum(1 for p in probs if p > 0), 1)

    def test_adaptive_temperature(self):
        s = settings(entropy_low=0.5, entropy_high=1.5, entropy_temp_boost=1.2, entropy_temp_focus=0.8)
        self.assertAlmostEqual(M.adaptive_temperature([0.99, 0.01], 1.0, s), 1.2)     # H = 0.056
        self.assertAlmostEqual(M.adaptive_temperature([0.1] * 10, 1.0, s), 0.8)       # H = 2.303
        self.assertAlmostEqual(M.adaptive_temperature(P, 1.0, s), 1.0)                # H = 1.142

    def test_repetition_blocklist(self):
        self.assertEqual(M.repetition_blocklist([5, 6, 7, 5, 6], 3), {7})
        self.assertEqual(M.repetition_blocklist([5, 6, 7, 5, 6], 0), set())
        self.assertEqual(M.repetition_blocklist([1, 2, 3], 3), set())
        probs = M.Sampler(settings(repetition_guard=3)).filtered([0.25] * 8, history=[5, 6, 7, 5, 6])
        self.assertEqual(probs[7], 0.0)
        self.assertAlmostEqual(probs[0], 1 / 7)


class DrawTest(unittest.TestCase):
    def test_seed_reproduces_and_frequencies_follow_probs(self):
        a, b = M.Sampler(settings(), seed=42), M.Sampler(settings(), seed=42)
        draws = [a.sample(P) for _ in range(4000)]
        self.assertEqual(draws, [b.sample(P) for _ in range(4000)])
        for i, p in enumerate(P):
            self.assertAlmostEqual(draws.count(i) / 4000, p, delta=0.03)
        self.assertNotEqual(draws, [M.Sampler(settings(), seed=43).sample(P) for _ in range(4000)])

    def test_filtered_tokens_are_never_drawn(self):
        s = M.Sampler(settings(top_k=2), seed=1)
        self.assertEqual({s.sample(P) for _ in range(500)}, {0, 1})


class SetCommandTest(unittest.TestCase):
    def test_valid_and_invalid_settings(self):
        cfg = M.Config()
        self.assertEqual(M.validate_setting(cfg, "top_k", "20").top_k, 20)
        self.assertEqual(M.validate_setting(cfg, "temperature", "0.5").temperature, 0.5)
        for name, value, words in [("top_k", "abc", "integer"), ("top_p", "1.5", "top_p"),
                                   ("n_embd", "8", "unknown"), ("temperature", "nan", "finite"),
                                   ("temperature", "0", "temperature")]:
            with self.assertRaises(M.MacroError) as ctx:
                M.validate_setting(cfg, name, value)
            self.assertIn(words, str(ctx.exception))
            self.assertEqual(len(str(ctx.exception).splitlines()), 1)


if __name__ == "__main__":
    unittest.main()


class PointerTest(unittest.TestCase):
    def test_the_worked_example(self):
        probs, share = M.pointer_probs([(1.0, [7, 8, 9, 5])], {9, 5}, [3, 7, 8], False, 10)
        self.assertEqual((probs[9], sum(probs), share), (1.0, 1.0, M.POINTER_WEIGHTS[2]))

    def test_news_starts_a_reply_and_continues_it(self):
        lines = [(1.0, [M.EOS, 4, 5, 6, 7, M.EOS]), (0.5, [M.EOS, 4, 8, M.EOS])]
        probs, share = M.pointer_probs(lines, {6, 7, 8}, [1, 2], True, 10)
        self.assertEqual(share, M.POINTER_START)
        self.assertAlmostEqual(probs[6], 2 / 3)        # the better line's news weighs twice
        self.assertAlmostEqual(probs[8], 1 / 3)
        probs, _ = M.pointer_probs(lines, {6, 7, 8}, [1, 6], False, 10)
        self.assertEqual(probs[7], 1.0)
        self.assertEqual(M.pointer_probs(lines, {6, 7, 8}, [1, 5], False, 10), (None, 0.0))   # 5 is not news

    def test_the_voice_with_the_pointer_still_sums_to_one(self):
        rng = random.Random(2)
        field = M.normalize([rng.random() for _ in range(12)])
        copy, share = M.pointer_probs([(1.0, [M.EOS, 3, 4, 5, M.EOS])], {5}, [3, 4], False, 12)
        self.assertAlmostEqual(sum(M.mix(copy, field, share)), 1.0, places=12)
