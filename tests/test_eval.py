"""--eval: dialogue files are scored line by line with their conversation before them."""
import math
import os
import random
import shutil
import tempfile
import unittest

import macrogpt as M
from tests.helpers import synthetic_corpus, tiny_trainer_config


class ConversationEvalTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_dialogue_files_keep_their_conversations_and_other_files_do_not(self):
        dialogue = self.write("d.txt", "H: hi\nA: hello\n\nH: my dog is Rex\nA: hi Rex\nH: who?\nA: Rex\n")
        self.assertEqual(M.read_conversations(dialogue),
                         [["H: hi", "A: hello"], ["H: my dog is Rex", "A: hi Rex", "H: who?", "A: Rex"]])
        plain = self.write("p.txt", "one line\n\nanother  line\n")
        self.assertEqual(M.read_conversations(plain), [["one line"], ["another line"]])

    def test_line_probs_equal_a_brute_force_rescoring_with_the_prefix(self):
        cfg = tiny_trainer_config(block_size=24, seq_len=24)
        rng = random.Random(3)
        model = M.GPT(cfg, M.N_BASE_VOCAB, seed=2)
        for _, lin in model.linears():                         # a network whose context matters
            lin.weight.data = [[rng.gauss(0, 0.3) for _ in row] for row in lin.weight.data]
        tok = M.Tokenizer()
        field = M.NGramField(cfg.field_order, tok.vocab_size, cfg.field_discount)
        for line in synthetic_corpus()[:20]:
            field.add(tok.encode(line))
        conv = ["H: my cat", "A: a cat", "H: named?"]
        for k, text in enumerate(conv):
            got = M.line_probs(model, field, tok, conv[:k], text, cfg.block_size)
            ids = tok.encode(text) + [M.EOS]
            window = ([M.EOS] + [t for line in conv[:k] for t in tok.encode(line) + [M.EOS]])
            window = window[-(cfg.block_size + 1 - len(ids)):] + ids
            logits = model.forward([window[:-1]]).data            # the training forward, no cache
            for j, (pm, pf) in enumerate(got):
                row = logits[len(window) - 1 - len(ids) + j]
                z = max(row)
                expect = math.exp(row[ids[j]] - z) / sum(math.exp(v - z) for v in row)
                self.assertAlmostEqual(pm, expect, delta=1e-6 * max(1.0, expect))
                self.assertEqual(pf, field.prob(ids[:j], ids[j]))
        with_context = M.line_probs(model, field, tok, conv[:2], conv[2], cfg.block_size)
        alone = M.line_probs(model, field, tok, [], conv[2], cfg.block_size)
        self.assertNotEqual([p for p, _ in with_context], [p for p, _ in alone])   # the context is read
