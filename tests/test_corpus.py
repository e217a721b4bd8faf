"""The Corpus: held out by content, incremental changes equal to a rebuild, no stale caches."""
import asyncio
import copy
import os
import random
import shutil
import tempfile
import unittest
from unittest import mock

import macrogpt as M
from tests.helpers import corpus_lines, synthetic_corpus, tiny_trainer_config


def field_state(field):
    return field.tables, field.totals, field.seen, field.n_tokens


def recall_state(recall):
    return recall.answers, recall.index


class CorpusCase(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.corpus_path = os.path.join(self.dir, "corpus.txt")
        self.write_corpus(synthetic_corpus())

    def write_corpus(self, lines):
        with open(self.corpus_path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def session(self, **kw):
        cfg = tiny_trainer_config(**kw)
        s = M.Session(cfg, self.corpus_path, os.path.join(self.dir, "memory.sqlite3"),
                      os.path.join(self.dir, "macrogpt.ckpt"), seed=3)
        self.addCleanup(s.close)
        return s


class CorpusTest(CorpusCase):
    def assertConsistent(self, s):
        """The invariant: everything derived equals a fresh derivation from the database."""
        corpus, tok = s.corpus, s.brain.tok
        rows = s.memory.corpus_rows()
        self.assertEqual(corpus.ids, {i: tok.encode(line) for i, line in rows})
        fresh = M.NGramField(corpus.field.order, tok.vocab_size, corpus.field.discount)
        for _, line in rows:
            fresh.add(tok.encode(line))
        self.assertEqual(field_state(corpus.field), field_state(fresh))
        rebuilt = M.Recall()
        for i, line in rows:
            rebuilt.add(i, line)
        self.assertEqual(recall_state(corpus.recall), recall_state(rebuilt))
        expected = [M.EOS]
        for _, line in rows:
            expected += tok.encode(line) + [M.EOS]
        self.assertEqual(corpus.stream(), expected)
        held = set(corpus.heldout_lines)
        self.assertTrue(held)
        self.assertEqual(held & set(line for _, line in rows), set())
        self.assertEqual(held & set(corpus.training_lines()), set())
        self.assertEqual(corpus.n_bytes, sum(len(M.text_to_bytes(l)) for _, l in rows))

    def test_every_derived_structure_equals_a_rebuild_after_any_history(self):
        rng = random.Random(5)
        kw = dict(max_corpus_lines=70, enable_bpe_after_chars=200, bpe_retrain_every_chars=300, bpe_num_merges=8,
                  bpe_retrain_merges=8)
        s = self.session(**kw)
        heldout = list(s.corpus.heldout_lines)
        said = ["how is the sea today?", "tell me about the rain", "the lamp is bright", "héllo мир 🙂"]
        grew = pruned = 0
        for turn in range(60):
            kind = rng.random()
            if kind < 0.1:                                    # a restart
                s.close()
                s = self.session(**kw)
            elif kind < 0.2:                                  # someone types a held-out question
                s.respond(rng.choice([l for l in heldout if l.startswith("H: ")])[3:])
            elif kind < 0.35:                                 # the same message again
                s.respond(rng.choice(said))
            else:
                said.append("turn %d about the %s and the %s" % (turn, rng.choice(M.__name__ + "xyz"),
                                                                rng.choice(["moon", "cat", "tea"])))
                s.respond(said[-1])
            before = len(s.memory.corpus_rows())
            grew += s.trainer.grow_tokenizer()
            pruned += before > 70 or len(s.memory.corpus_rows()) == 70
            self.assertConsistent(s)
        self.assertEqual(s.corpus.add(heldout, "chat"), 0)   # never, whatever the source
        self.assertConsistent(s)
        self.assertGreater(grew, 1)                           # BPE retrained along the way
        self.assertGreater(pruned, 5)                         # and the corpus sat at its limit

    def test_a_line_added_at_the_top_of_the_file_leaks_nothing(self):
        self.session().close()
        self.write_corpus(["H: a brand new first line of the file"] + synthetic_corpus())
        s = self.session()
        self.assertEqual(set(s.corpus.heldout_lines) & set(corpus_lines(s.memory)), set())
        self.assertConsistent(s)

    def test_changing_heldout_every_moves_lines_both_ways(self):
        self.session(heldout_every=10).close()
        s = self.session(heldout_every=3)
        held3 = set(s.corpus.heldout_lines)
        self.assertEqual(held3 & set(corpus_lines(s.memory)), set())
        self.assertConsistent(s)
        self.assertEqual(s.memory.message_count(), 0)                # the messages table is untouched
        s.close()
        s = self.session(heldout_every=10)
        train10, held10 = M.split_heldout(synthetic_corpus(), 10)
        self.assertEqual(set(held10) & set(corpus_lines(s.memory)), set())
        self.assertTrue(set(train10) <= set(corpus_lines(s.memory)))   # freed lines train again
        self.assertConsistent(s)

    def test_a_new_message_is_learned_even_when_its_reply_is_old(self):
        s = self.session()
        old_reply = corpus_lines(s.memory)[1]
        assert old_reply.startswith("A:")
        pending = s.corpus.pending.bytes
        added = s.corpus.add(["H: a question never asked before", old_reply], "chat")
        self.assertEqual(added, 1)
        ids = s.brain.tok.encode("H: a question never asked before")
        self.assertIn(ids, list(s.corpus.ids.values()))
        self.assertIn("never", s.corpus.lexicon.words)
        self.assertEqual(s.corpus.pending.bytes - pending, len("H: a question never asked before"))
        self.assertConsistent(s)

    def test_recall_follows_the_corpus_at_its_limit(self):
        s = self.session(max_corpus_lines=40)
        for i in range(30):
            s.corpus.add(["H: where is the zebra number %d" % i, "A: zebra %d is asleep." % i], "chat")
        lines = corpus_lines(s.memory)
        self.assertEqual(len(lines), 40)
        newest = [l for i in range(20, 30) for l in ("H: where is the zebra number %d" % i, "A: zebra %d is asleep." % i)]
        self.assertEqual(lines[-20:], newest)                          # the newest half is always kept
        self.assertEqual(s.corpus.recall.answers_for("where is the zebra?", k=1), ["A: zebra 29 is asleep."])
        self.assertConsistent(s)

    def test_a_turn_at_the_limit_does_not_re_encode_the_corpus(self):
        s = self.session(max_corpus_lines=40)
        for i in range(20):
            s.respond("message number %d" % i)
        calls = []
        s.corpus.reencode = lambda: calls.append(1)
        s.respond("one more at the limit")
        self.assertEqual(calls, [])
        self.assertEqual(len(s.memory.corpus_rows()), 40)

    def test_the_judges_slice_samples_the_whole_held_out_text(self):
        cap = 140
        with mock.patch.object(M, "HELDOUT_MAX_TOKENS", cap):
            s = self.session()
        corpus, tok = s.corpus, s.brain.tok
        units = M.exchanges(corpus.heldout_lines)
        encoded = [[t for line in unit for t in tok.encode(line) + [M.EOS]] for unit in units]
        self.assertGreater(sum(map(len, encoded)), 2 * cap)       # the cap matters here
        self.assertLessEqual(sum(len(u) - 1 for u in corpus.heldout_units), cap)
        whole = [encoded.index(u[1:]) for u in corpus.heldout_units]   # each unit whole, after an EOS
        self.assertTrue(all(u[0] == M.EOS for u in corpus.heldout_units))
        self.assertEqual(whole, sorted(whole))
        self.assertEqual(whole[0], 0)
        self.assertGreaterEqual(whole[-1], len(encoded) // 2)      # not just the first lines
        self.assertEqual([t for w in corpus.heldout_windows for t in w[1:]],
                         [t for u in corpus.heldout_units for t in u[1:]])   # windows cover the units
        self.assertEqual(corpus.heldout_bytes,
                         sum(len(tok.token_bytes(t)) or 1 for u in corpus.heldout_units for t in u[1:]))

    def test_an_answer_is_held_out_with_its_question(self):
        lines = ["H: q%d" % i if i % 2 == 0 else "A: a%d" % i for i in range(400)] + ["prose line"]
        train, held = M.split_heldout(lines, 5)
        self.assertTrue(held)
        for unit in M.exchanges(held):
            if unit[0].startswith("H: "):
                self.assertEqual(len(unit), 2)
                self.assertEqual(lines.index(unit[1]), lines.index(unit[0]) + 1)
        self.assertFalse(set(held) & set(train))


class TeacherTest(CorpusCase):
    """The field's rows that training targets follow (Config.distill_beta)."""

    def test_each_row_is_the_field_without_the_line_it_predicts(self):
        s = self.session()
        corpus, length = s.corpus, 12
        stream = corpus.stream()
        before = copy.deepcopy(field_state(corpus.field))
        batches = [[0, 5], [len(stream) - length - 1]]
        rows = asyncio.run(corpus.teach(stream, batches, length))
        self.assertEqual(field_state(corpus.field), before)              # every line was put back
        lines = [ids for _, ids in sorted(corpus.ids.items())]
        owner, offset = [None], [None]                 # the line and position each stream token has
        for n, ids in enumerate(lines):
            owner += [n] * (len(ids) + 1)
            offset += list(range(len(ids) + 1))
        spans_lines = 0
        for batch, batch_rows in zip(batches, rows):
            for start, (ids, ws) in zip(batch, batch_rows):
                self.assertEqual(len(ids), length * M.TEACHER_TOP_K)
                spans_lines += len({owner[j] for j in range(start + 1, start + length + 1)}) > 1
                for r, j in enumerate(range(start + 1, start + length + 1)):
                    others = M.NGramField(corpus.field.order, corpus.field.vocab_size, corpus.field.discount)
                    others.rebuild(lines[:owner[j]] + lines[owner[j] + 1:])
                    p = others.probs(lines[owner[j]][:offset[j]])
                    top = sorted(range(len(p)), key=lambda i: -p[i])[:M.TEACHER_TOP_K]
                    got = dict(zip(ids[r * M.TEACHER_TOP_K:(r + 1) * M.TEACHER_TOP_K],
                                   ws[r * M.TEACHER_TOP_K:(r + 1) * M.TEACHER_TOP_K]))
                    self.assertEqual(sorted(p[i] for i in got), sorted(p[i] for i in top))   # ties may swap ids
                    z = sum(p[i] for i in top)
                    for i, w in got.items():
                        self.assertAlmostEqual(w, p[i] / z, places=6)
        self.assertGreater(spans_lines, 0)                               # windows crossing a line end

    def test_a_line_gone_meanwhile_teaches_the_truth_and_new_text_starts_afresh(self):
        s = self.session()
        corpus = s.corpus
        stream = corpus.stream()
        asyncio.run(corpus.teach(stream, [[0]], 12))
        self.assertTrue(corpus.teacher)
        first = next(iter(corpus.teacher))
        del corpus.teacher[first]                                        # as if pruned while teaching
        spans = corpus._spans(*corpus._layout()[2:], len(stream), 0, 12)
        ids, ws = corpus._rows(spans, stream)
        k, n = M.TEACHER_TOP_K, spans[0][3] - spans[0][2]
        for r in range(n):
            self.assertEqual(list(ids[r * k:(r + 1) * k]), [stream[1 + r]] * k)
            self.assertEqual(list(ws[r * k:(r + 1) * k]), [1.0] + [0.0] * (k - 1))
        corpus.add(["H: a brand new line"], "chat")
        self.assertIsNone(asyncio.run(corpus.teach(stream, [[0]], 12)))     # the stream is outdated
        corpus.reencode()
        self.assertEqual(corpus.teacher, {})


class FieldRemovalTest(unittest.TestCase):
    def test_bulk_rebuild_equals_adding_line_by_line(self):
        rng = random.Random(2)
        lines = [[rng.randrange(20) for _ in range(rng.randrange(0, 9))] for _ in range(80)]
        for order in (1, 2, 4):
            one_by_one = M.NGramField(order, 30, 0.75)
            for ids in lines:
                one_by_one.add(ids)
            bulk = M.NGramField(order, 30, 0.75)
            bulk.rebuild(lines)
            self.assertEqual(field_state(bulk), field_state(one_by_one), order)

    def test_remove_undoes_add_exactly(self):
        rng = random.Random(1)
        lines = [[rng.randrange(270) for _ in range(rng.randrange(1, 12))] for _ in range(60)]
        field = M.NGramField(4, 300, 0.75)
        for ids in lines:
            field.add(ids)
        for ids in lines[::3]:
            field.remove(ids)
        fresh = M.NGramField(4, 300, 0.75)
        for i, ids in enumerate(lines):
            if i % 3:
                fresh.add(ids)
        self.assertEqual(field_state(field), field_state(fresh))
        self.assertAlmostEqual(sum(field.probs(lines[1][:2])), 1.0, places=10)


if __name__ == "__main__":
    unittest.main()


class BurstMaterialTest(CorpusCase):
    def test_a_burst_starts_where_the_unlearned_lines_begin_and_marks_them_learned(self):
        s = self.session()
        corpus = s.corpus
        corpus.add(["H: a first new line about kites", "A: kites fly."], "chat")
        recent, mark = corpus.take_pending()
        stream, starts, keys = corpus.stream(), corpus._layout()[2], corpus._layout()[3]
        first_new = min(i for i in keys if i > corpus.burst_mark)
        self.assertEqual(recent, starts[keys.index(first_new)])    # the stream position of the first new line
        self.assertEqual(stream[recent - 1], M.EOS)
        corpus.mark_learned(mark)
        self.assertEqual((corpus.burst_mark, s.memory.get_state("burst_mark")), (mark, mark))
        corpus.add(["H: then one about gulls", "A: gulls cry."], "chat")
        recent, _ = corpus.take_pending()                           # only what came after the mark
        self.assertEqual(recent, corpus._layout()[2][corpus._layout()[3].index(mark + 1)])
