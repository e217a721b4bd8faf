"""The export read by transformers itself: same logits, same token ids, and a PyTorch step comes home.

Runs only where torch, transformers and tokenizers are installed (not a macrogpt dependency):
    python3.11 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch transformers tokenizers
    /tmp/hfvenv/bin/python -m unittest tests.test_hf_interop -v
"""
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import unittest

import macrogpt as M
from tests.helpers import MIXED, SCRIPT, brain_with_deltas, tiny_trainer_config

try:
    import tokenizers
    import torch
    import transformers
except ImportError as e:                       # the project itself needs none of them
    MISSING = "needs torch, transformers and tokenizers (%s)" % e
else:
    MISSING = None

TEXTS = [MIXED, "H: how is the sea today?\nA: the sea is quiet.", "日本語のテキストと中文，한국어 텍스트",
         "naïve café — 10,000.50 € ½ ² Ⅻ ٣٤٥ ๑๒", "tabs\tand\n\nnewlines   and  spaces  ", "x__y--z!!?? 🙂👍🏽🇫🇷 é"]


def config(**kw):
    return tiny_trainer_config(n_layer=2, n_embd=16, n_head=2, block_size=16, exact_generation=True, **kw)


def gap(rows_a, rows_b):
    return max(abs(x - y) for ra, rb in zip(rows_a, rows_b) for x, y in zip(ra, rb))


@unittest.skipIf(MISSING, MISSING)
class TransformersInteropTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp()
        cls.brain = brain_with_deltas(config())                      # live head deltas: exported untied
        cls.folder = os.path.join(cls.dir, "hf")
        M.export_hf(cls.brain, cls.folder)
        torch.manual_seed(0)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir)

    def sequences(self):
        tok, V = self.brain.tok, self.brain.tok.vocab_size
        rng = random.Random(5)
        return [[M.BOS], tok.encode(TEXTS[1])[:16], [rng.randrange(V) for _ in range(16)],
                [M.EOS, M.PAD, V - 1, 0, 255, 259]]

    def hf_model(self, folder):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
        return model.eval()

    def hf_logits(self, model, seq):
        with torch.no_grad():
            return model(torch.tensor([seq])).logits[0].tolist()

    def test_transformers_logits_equal_macrogpt(self):
        model = self.hf_model(self.folder)
        self.assertEqual(model.config.vocab_size, self.brain.tok.vocab_size)
        for seq in self.sequences():
            ours = self.brain.model.forward([seq]).data
            self.assertLess(gap(self.hf_logits(model, seq), ours), 1e-4, seq)
            cache = self.brain.model.new_cache()                      # the generation path too
            stepped = [self.brain.model.step(cache, t) for t in seq]
            self.assertLess(gap(self.hf_logits(model, seq), stepped), 1e-4, seq)

    def test_tokenizer_ids_equal_macrogpt(self):
        hf = transformers.AutoTokenizer.from_pretrained(self.folder)
        for text in TEXTS:
            ids = hf(text)["input_ids"]
            self.assertEqual(ids, self.brain.tok.encode(text), text)
            self.assertEqual(hf.decode(ids), text)
        self.assertEqual(hf.convert_tokens_to_ids(["<BOS>", "<EOS>", "<PAD>"]), [M.BOS, M.EOS, M.PAD])

    def test_pre_tokenizer_splits_every_code_point_like_piece_re(self):
        pre = tokenizers.Tokenizer.from_file(os.path.join(self.folder, "tokenizer.json")).pre_tokenizer
        alphabet = M.byte_alphabet()
        every = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
        for glue in ("", " ", "a", "1", "  ", "_"):
            text = glue.join(every)
            want = ["".join(alphabet[b] for b in p.encode("utf-8")) for p in M.split_pieces(text)]
            got = [s for s, _ in pre.pre_tokenize_str(text)]
            first_difference = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
            self.assertIsNone(first_difference, "glue %r" % glue)
            self.assertEqual(len(got), len(want), repr(glue))

    def test_peft_lora_adapter_equals_macrogpt_before_and_after_merging(self):
        try:
            import peft
        except ImportError as e:
            self.skipTest("needs peft for --export-lora (%s)" % e)
        folder = os.path.join(self.dir, "lora")
        M.export_hf(self.brain, folder, lora=True)
        model = peft.PeftModel.from_pretrained(self.hf_model(folder), os.path.join(folder, "adapter")).eval()
        for seq in self.sequences():
            ours = self.brain.model.forward([seq]).data
            self.assertLess(gap(self.hf_logits(model, seq), ours), 1e-4, seq)
            with model.disable_adapter():
                self.assertGreater(gap(self.hf_logits(model, seq), ours), 1e-3)      # the adapter matters
        merged = model.merge_and_unload()
        for seq in self.sequences():
            self.assertLess(gap(self.hf_logits(merged, seq), self.brain.model.forward([seq]).data), 1e-4)

    def test_a_pytorch_step_comes_home(self):
        model = self.hf_model(self.folder)
        model.train()
        batch = torch.tensor([self.brain.tok.encode(TEXTS[1])[:16], self.sequences()[2]])
        before = self.hf_logits(model.eval(), self.sequences()[1])
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        model.eval()
        trained = os.path.join(self.dir, "trained")
        model.save_pretrained(trained)
        transformers.AutoTokenizer.from_pretrained(self.folder).save_pretrained(trained)
        cfg_file, ckpt = os.path.join(self.dir, "untied.json"), os.path.join(self.dir, "home.ckpt")
        with open(cfg_file, "w") as f:
            json.dump(config(tie_embeddings=False).to_dict(), f)
        p = subprocess.run([sys.executable, SCRIPT, "--config", cfg_file, "--import", trained, "--ckpt", ckpt],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
        self.assertEqual(p.returncode, 0, p.stderr.decode())
        home = M.Brain.load_or_fresh(ckpt, config(tie_embeddings=False))
        self.assertGreater(gap(self.hf_logits(model, self.sequences()[1]), before), 1e-3)   # it did learn
        for seq in self.sequences():
            self.assertLess(gap(self.hf_logits(model, seq), home.model.forward([seq]).data), 1e-4, seq)


if __name__ == "__main__":
    unittest.main()
