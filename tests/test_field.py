"""The corpus field: a proper distribution everywhere, back-off, incremental = rebuild = brute force."""
import math
import random
import unittest

import macrogpt as M


def brute_force_kn(seqs, order, V, D, context, token):
    """Interpolated Kneser-Ney recomputed from scratch from the sequences, one query at a time."""
    grams = {k: {} for k in range(1, order + 1)}
    for ids in seqs:
        seq = [M.BOS] * (order - 1) + list(ids) + [M.EOS]
        for i in range(order - 1, len(seq)):
            for k in range(1, order + 1):
                g = tuple(seq[i - k + 1:i + 1])
                grams[k][g] = grams[k].get(g, 0) + 1

    def count(k, gram):
        if k == order:
            return grams[k].get(gram, 0)
        return sum(1 for g in grams[k + 1] if g[1:] == gram)       # distinct left extensions

    ctx = ([M.BOS] * (order - 1) + list(context))[-(order - 1):] if order > 1 else []
    p = 1.0 / V
    for k in range(1, order + 1):
        h = tuple(ctx[len(ctx) - (k - 1):]) if k > 1 else ()
        row = {w: count(k, h + (w,)) for w in range(V)}
        total = sum(row.values())
        if total == 0:
            continue
        types = sum(1 for c in row.values() if c > 0)
        p = D * types / total * p + max(row[token] - D, 0) / total
    return p


def random_seqs(rng, n, vocab):
    return [[rng.randrange(vocab) for _ in range(rng.randrange(0, 9))] for _ in range(n)]


class FieldTest(unittest.TestCase):
    def setUp(self):
        rng = random.Random(3)
        self.V = 262
        self.seqs = random_seqs(rng, 30, 8) + [[1, 2, 3, 4, 5]] * 3
        self.field = M.NGramField(3, self.V, 0.75)
        self.field.rebuild(self.seqs)
        self.contexts = [[], [1], [1, 2], [3, 1, 2], [7, 7], [200, 201], [1, 2, 3, 4], [M.BOS]]

    def test_sums_to_one_everywhere(self):
        for ctx in self.contexts:
            self.assertAlmostEqual(sum(self.field.probs(ctx)), 1.0, places=10)
            self.assertTrue(all(p > 0 for p in self.field.probs(ctx)))

    def test_matches_brute_force_kneser_ney(self):
        for ctx in self.contexts:
            probs = self.field.probs(ctx)
            for tok in [0, 1, 3, 5, M.EOS, 200]:
                want = brute_force_kn(self.seqs, 3, self.V, 0.75, ctx, tok)
                self.assertAlmostEqual(probs[tok], want, places=12)
                self.assertAlmostEqual(self.field.prob(ctx, tok), want, places=12)

    def test_unseen_context_backs_off(self):
        unseen = self.field.probs([250, 251])
        self.assertEqual(unseen, self.field.probs([200, 251]))   # both fall to the order-1 level
        seen = self.field.probs([1, 2])
        self.assertGreater(seen[3], 0.5)                          # "1 2" is always followed by 3
        self.assertLess(unseen[3], 0.2)

    def test_incremental_with_growth_equals_rebuild(self):
        inc = M.NGramField(3, 259, 0.75)
        for ids in self.seqs[:15]:
            inc.add([i % 259 for i in ids])
        inc.vocab_size = self.V                                   # the vocabulary grows mid-stream
        for ids in self.seqs[15:]:
            inc.add(ids)
        fresh = M.NGramField(3, self.V, 0.75)
        fresh.rebuild([[i % 259 for i in ids] for ids in self.seqs[:15]] + self.seqs[15:])
        for ctx in self.contexts:
            for a, b in zip(inc.probs(ctx), fresh.probs(ctx)):
                self.assertAlmostEqual(a, b, places=14)

    def test_novelty(self):
        self.assertEqual(self.field.novelty([1, 2, 3, 4, 5]), 0.0)
        self.assertEqual(self.field.novelty([250, 251, 252]), 1.0)


class MixTest(unittest.TestCase):
    def test_mix_and_lambda_from_evidence(self):
        self.assertEqual(M.mix([1.0, 0.0], [0.0, 1.0], 0.25), [0.25, 0.75])
        model_better = [(0.9, 0.1)] * 20
        field_better = [(0.01, 0.5)] * 20
        self.assertEqual(M.best_lambda(model_better), 1.0)
        self.assertEqual(M.best_lambda(field_better), 0.0)
        lam = M.best_lambda(model_better[:10] + [(0.001, 0.6)] * 10)
        self.assertTrue(0.0 < lam < 1.0)
        self.assertAlmostEqual(M.bits_per_byte(8 * math.log(2), 8), 1.0)


if __name__ == "__main__":
    unittest.main()


class LexiconSplitCharacterTest(unittest.TestCase):
    def test_a_space_and_half_a_letter_may_begin_a_known_word(self):
        tok = M.Tokenizer(merges=((32, 0xD0),))                 # id 259 is b" \xd0", as BPE learns it
        self.assertEqual(tok.token_bytes(259), b" \xd0")
        probs = M.normalize([1.0] * tok.vocab_size)
        kept = M.Lexicon(["my cat is called Мурзик"]).guard(probs, tok, b"my cat is called")
        self.assertGreater(kept[259], 0.0)                      # " М..." begins a word it knows
        refused = M.Lexicon(["my cat is called Max"]).guard(probs, tok, b"my cat is called")
        self.assertEqual(refused[259], 0.0)                     # no Cyrillic word known: still refused
