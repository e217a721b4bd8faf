"""A small seeded sample of the fuzzer (tests/fuzz.py): every reader, 25 cases each, in a child process.

Each case must end in a one-line error or a correct load: no traceback, no hang, no memory blow-up,
no file changed that the case was not meant to write. The full runs are `python tests/fuzz.py`.
"""
import unittest

from tests import fuzz

CASES = 25


class FuzzSampleTest(unittest.TestCase):
    def test_every_reader_ends_in_one_line_or_a_correct_load(self):
        results, failures = fuzz.fuzz(fuzz.READERS, CASES, seed=28)
        self.assertEqual(failures, [], "reproduce with: python tests/fuzz.py --reader READER --seed 28 --case N")
        for reader, counts in results.items():
            self.assertEqual(counts["cases"], CASES, reader)
            self.assertGreater(counts["error"], 0, reader)      # the sample reaches both outcomes
            self.assertGreater(counts["load"], 0, reader)


if __name__ == "__main__":
    unittest.main()
