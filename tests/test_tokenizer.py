"""Byte-level BPE: lossless round trips, a hand-worked merge example, append-only retraining."""
import os
import random
import unittest

import macrogpt as M
from tests.helpers import ROOT, tiny_config


class RoundTripTest(unittest.TestCase):
    def setUp(self):
        self.tok = M.Tokenizer()
        self.tok.train(["the cat sat on the mat", "привет мир", "你好世界 你好", "🙂🙂 ok ok"], 40)

    def check(self, text):
        ids = self.tok.encode(text)
        self.assertEqual(self.tok.decode_bytes(ids), M.text_to_bytes(text))
        self.assertEqual(self.tok.decode(ids), M.text_to_bytes(text).decode("utf-8", "replace"))

    def test_texts(self):
        samples = ["", "a", " ", "\x00", "a\x00b", "the cat", "👩‍👩‍👧‍👦 family", "🏳️‍🌈",
                   "中文字符和日本語のかな", "مرحبا بالعالم", "e\u0301 combining", "Zalgo: a\u0300\u0301\u0302",
                   "tabs\tand\nnewlines\r\n", "x" * 5000, "   leading and trailing   ", "_under_score_",
                   "numbers 123 4.5e6", "\x7f\x1b[31m control"]
        for s in samples:
            with self.subTest(s=s[:20]):
                self.check(s)

    def test_every_single_byte(self):
        for b in range(256):
            ids = self.tok.encode(M.bytes_to_text(bytes([b])))
            self.assertEqual(self.tok.decode_bytes(ids), bytes([b]))

    def test_random_byte_strings(self):
        rng = random.Random(7)
        for _ in range(300):
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
            self.assertEqual(self.tok.decode_bytes(self.tok.encode(M.bytes_to_text(data))), data)

    def test_invalid_utf8_is_kept_and_shown_as_replacement(self):
        data = b"ok \xff\xfe bad \xc3"
        ids = self.tok.encode(M.bytes_to_text(data))
        self.assertEqual(self.tok.decode_bytes(ids), data)
        self.assertEqual(self.tok.decode(ids), "ok \ufffd\ufffd bad \ufffd")
        self.assertEqual(M.text_to_bytes(M.bytes_to_text(data)), data)

    def test_specials_decode_to_nothing(self):
        ids = [M.BOS] + self.tok.encode("hi") + [M.EOS, M.PAD]
        self.assertEqual(self.tok.decode(ids), "hi")


class PieceTest(unittest.TestCase):
    def test_pieces_join_back_and_split_by_class(self):
        text = "Hi, 世界! x2  Привет_мир 42"
        pieces = M.split_pieces(text)
        self.assertEqual("".join(pieces), text)
        self.assertEqual(pieces, ["Hi", ",", " 世界", "!", " x", "2", " ", " Привет", "_", "мир", " 42"])


class HandWorkedMergeTest(unittest.TestCase):
    def test_expected_merges_and_ids(self):
        # pieces of "ab ab ab abc": "ab" x1, " ab" x2, " abc" x1
        # pair counts: (a,b)=4, (' ',a)=3, (b,c)=1   -> merge (97, 98) as id 259
        # then (' ',259)=3, (259,c)=1                -> merge (32, 259) as id 260
        # then (260,c)=1 occurs once                 -> stop
        tok = M.Tokenizer()
        added = tok.train(["ab ab ab abc"], 10)
        self.assertEqual(added, [259, 260])
        self.assertEqual(tok.merges, [(97, 98), (32, 259)])
        self.assertEqual(tok.token_bytes(260), b" ab")
        self.assertEqual(tok.encode("ab abc"), [259, 260, 99])
        self.assertEqual(tok.vocab_size, 261)

    def test_ties_go_to_the_smallest_pair(self):
        tok = M.Tokenizer()
        self.assertEqual(tok.train(["xy xy ba ba"], 1), [259])
        self.assertEqual(tok.merges, [(32, 98)])          # (32,98), (98,97), (120,121) all occur twice


class AppendOnlyTest(unittest.TestCase):
    def test_retrain_keeps_every_old_id_and_model_row(self):
        tok = M.Tokenizer()
        tok.train(["the quick brown fox jumps over the lazy dog"] * 3, 20)
        text = "the lazy fox, the brown dog"
        old_ids = tok.encode(text)
        old_vocab = [tok.token_bytes(i) for i in range(tok.vocab_size)]
        old_merges = list(tok.merges)
        model = M.GPT(tiny_config(), tok.vocab_size, seed=3)
        old_rows = [list(r) for r in model.wte.data]

        added = tok.train(["the lazy dog sleeps while the brown fox runs and jumps"] * 5, 30)
        self.assertTrue(added)
        self.assertEqual(added, list(range(len(old_vocab), tok.vocab_size)))
        self.assertEqual(tok.merges[:len(old_merges)], old_merges)
        for i, b in enumerate(old_vocab):
            self.assertEqual(tok.token_bytes(i), b)
        self.assertEqual(tok.decode(old_ids), text)
        self.assertLessEqual(len(tok.encode(text)), len(old_ids))

        model.grow_vocab(tok.vocab_size)
        self.assertEqual(model.vocab_size, tok.vocab_size)
        self.assertEqual(model.wte.data[:len(old_rows)], old_rows)

    def test_state_round_trip_gives_identical_encodings(self):
        tok = M.Tokenizer()
        tok.train(["mississippi river, missing misses"] * 4, 25)
        again = M.Tokenizer.from_dict(M.json.loads(M.json.dumps(tok.to_dict())))
        for s in ["mississippi", "a missing river", "🙂 miss"]:
            self.assertEqual(again.encode(s), tok.encode(s))
        self.assertEqual(again.vocab_size, tok.vocab_size)

    def test_damaged_state_is_a_clear_error(self):
        with self.assertRaises(M.CheckpointError):
            M.Tokenizer.from_dict({"version": 99, "merges": []})
        with self.assertRaises(M.CheckpointError):
            M.Tokenizer.from_dict({"version": 1, "bos": 256, "eos": 257, "pad": 258, "merges": [[5000, 1]]})



class ShippedCorpusTest(unittest.TestCase):
    def test_bpe_compresses_the_shipped_corpus(self):
        # measured on nonames.txt (399,082 bytes of text in 4,734 lines): 0.417 tokens per byte
        # after 384 merges
        lines = M.read_corpus_file(os.path.join(ROOT, "nonames.txt"))
        tok = M.Tokenizer()
        self.assertEqual(len(tok.train(lines, 384)), 384)
        n_bytes = sum(len(M.text_to_bytes(l)) for l in lines)
        n_tokens = sum(len(tok.encode(l)) for l in lines)
        self.assertLess(n_tokens / n_bytes, 0.45)
        self.assertEqual(b"".join(tok.decode_bytes(tok.encode(l)) for l in lines),
                         b"".join(M.text_to_bytes(l) for l in lines))


if __name__ == "__main__":
    unittest.main()
