"""Every op's gradient against central finite differences (float64, small shapes)."""
import math
import random
import unittest

import macrogpt as M
from tests.helpers import TOL, max_rel_error


def rand_tensor(rng, rows, cols, scale=1.0, trainable=True):
    t = M.param([[rng.gauss(0, scale) for _ in range(cols)] for _ in range(rows)])
    t.requires_grad = trainable
    return t


def project(out, rng_seed=99):
    """A scalar that depends on every output entry: sum(out * R) / n for a fixed random R, as
    a node of its own (its gradient R / n is written here, not taken from the module)."""
    rng = random.Random(rng_seed)
    R = [[rng.gauss(0, 1) for _ in row] for row in out.data]
    n = sum(len(row) for row in R)
    value = sum(x * r for row, rrow in zip(out.data, R) for x, r in zip(row, rrow)) / n

    def backward_fn(g):
        return ([[g[0][0] * r / n for r in rrow] for rrow in R],)
    return M.Tensor([[value]], (out,), backward_fn)


class OpGradientTest(unittest.TestCase):
    def setUp(self):
        self.rng = random.Random(7)

    def check(self, build, params):
        err = max_rel_error(build, params)
        self.assertLess(err, TOL)

    def test_add_scale(self):
        a, b = rand_tensor(self.rng, 3, 4), rand_tensor(self.rng, 3, 4)
        self.check(lambda: project(M.scale(M.add(M.swiglu(M.add(a, b)), M.swiglu(a)), 0.7)), [a, b])

    def test_swiglu(self):
        a = rand_tensor(self.rng, 3, 8, 1.5)
        self.check(lambda: project(M.swiglu(a)), [a])

    def test_dropout_with_a_fixed_mask(self):
        a = rand_tensor(self.rng, 4, 6)
        self.check(lambda: project(M.dropout(M.swiglu(a), 0.3, random.Random(5))), [a])   # same mask each call
        out = M.dropout(a, 0.5, random.Random(5)).data
        zeroed = sum(v == 0.0 for row in out for v in row)
        self.assertTrue(0 < zeroed < 24)
        for row, orig in zip(out, a.data):
            for v, x in zip(row, orig):
                self.assertIn(v, (0.0, 2.0 * x))                 # survivors scaled by 1 / (1 - p)

    def test_a_model_with_dropout_is_exact_without_a_generator(self):
        cfg = M.Config(n_layer=1, n_embd=8, n_head=2, block_size=8, seq_len=8, dropout=0.5)
        model = M.GPT(cfg, 20, seed=1)
        seq = [[1, 2, 3, 4]]
        self.assertEqual(model.forward(seq).data, model.forward(seq).data)       # eval: no dropout
        self.assertNotEqual(model.forward(seq, random.Random(1)).data, model.forward(seq).data)

    def test_rmsnorm(self):
        x, g = rand_tensor(self.rng, 4, 6), rand_tensor(self.rng, 1, 6)
        self.check(lambda: project(M.rmsnorm(x, g)), [x, g])

    def test_rope_unrotate_is_the_transpose_of_rotate(self):
        # attention's backward maps gradients through rope_unrotate: <R x, g> = <x, R^T g>
        table = M.RopeTable(8, 10000.0)
        for pos in (0, 3, 17):
            cos, sin = table.at(pos)
            x = [self.rng.gauss(0, 1) for _ in range(8)]
            g = [self.rng.gauss(0, 1) for _ in range(8)]
            left = sum(a * b for a, b in zip(M.rope_rotate(x, cos, sin), g))
            right = sum(a * b for a, b in zip(x, M.rope_unrotate(g, cos, sin)))
            self.assertAlmostEqual(left, right, places=12)

    def test_embed(self):
        wte = rand_tensor(self.rng, 6, 4)
        self.check(lambda: project(M.embed(wte, [1, 3, 1, 5])), [wte])

    def test_attention(self):
        table = M.RopeTable(4, 10000.0)
        qkv = rand_tensor(self.rng, 2 * 5, 3 * 8)
        self.check(lambda: project(M.attention(qkv, 2, 5, 2, table)), [qkv])

    def test_cross_entropy_and_mean(self):
        logits = rand_tensor(self.rng, 4, 7, 2.0)
        self.check(lambda: M.mean(M.cross_entropy(logits, [0, 6, 3, 3])), [logits])

    def test_distill_cross_entropy(self):
        logits = rand_tensor(self.rng, 3, 7, 2.0)
        teacher = [([1, 0, 6], [0.5, 0.3, 0.2]), ([2], [1.0]), ([6, 5], [0.25, 0.7])]   # the last sums to 0.95
        self.check(lambda: M.mean(M.cross_entropy(logits, [0, 6, 3], teacher, 0.3)), [logits])

    def test_distill_cross_entropy_values(self):
        rows = [[0.5, -1.0, 2.0], [0.0, 0.0, 1.0]]
        logits = M.param(rows)
        teacher = [([2, 1], [0.6, 0.4]), ([0], [1.0])]
        out = M.cross_entropy(logits, [0, 2], teacher, 0.25).data
        for (row, y, (ids, ws)), got in zip(zip(rows, [0, 2], teacher), out):
            logp = [v - math.log(sum(math.exp(u) for u in row)) for v in row]
            want = -0.75 * logp[y] - 0.25 * sum(w * logp[i] for i, w in zip(ids, ws))
            self.assertAlmostEqual(got[0], want, places=12)
        plain = M.cross_entropy(logits, [0, 2]).data                     # no teacher: plain cross-entropy
        for row, y, got in zip(rows, [0, 2], plain):
            self.assertAlmostEqual(got[0], math.log(sum(math.exp(u) for u in row)) - row[y], places=12)
        zero = M.cross_entropy(logits, [0, 2], teacher, 0.0).data        # and so is beta 0
        self.assertEqual(plain, zero)

    def test_linear_with_deltas_trainable_base(self):
        x = rand_tensor(self.rng, 5, 6)
        lins = [M.Linear(rand_tensor(self.rng, 4, 6)), M.Linear(rand_tensor(self.rng, 3, 6))]
        params = [x]
        for lin in lins:
            params.append(lin.weight)
            for _ in range(2):
                d = M.Delta(rand_tensor(self.rng, len(lin.weight.data), 2), rand_tensor(self.rng, 2, 6), 0.5)
                lin.deltas.append(d)
                params += [d.A, d.B]
        self.check(lambda: project(M.linear(x, lins)), params)

    def test_linear_with_deltas_frozen_base(self):
        # the frozen path computes dA, dB without forming dW: a different formula to check
        x = rand_tensor(self.rng, 5, 6)
        lin = M.Linear(rand_tensor(self.rng, 4, 6, trainable=False))
        d = M.Delta(rand_tensor(self.rng, 4, 3), rand_tensor(self.rng, 3, 6), 0.8)
        lin.deltas.append(d)
        self.check(lambda: project(M.linear(x, [lin])), [x, d.A, d.B])
        loss = project(M.linear(x, [lin]))
        loss.backward()
        self.assertIsNone(lin.weight.grad)


class GraphTest(unittest.TestCase):
    def test_deep_graph_has_no_recursion_limit(self):
        x = M.param([[1.0, 2.0]])
        y = x
        for _ in range(5000):
            y = M.scale(y, 1.0)
        M.mean(y).backward()
        self.assertEqual(x.grad, [[0.5, 0.5]])

    def test_gradient_accumulates_over_shared_use(self):
        x = M.param([[3.0]])
        M.mean(M.add(x, M.scale(x, 2.0))).backward()          # d(x + 2x)/dx = 3
        self.assertAlmostEqual(x.grad[0][0], 3.0)

    def test_matmul_kernel_matches_plain_sums(self):
        rng = random.Random(3)
        X = [[rng.uniform(-2, 2) for _ in range(9)] for _ in range(4)]
        W = [[rng.uniform(-2, 2) for _ in range(9)] for _ in range(5)]
        got = M.matmul_nt(X, W)
        for i in range(4):
            for j in range(5):
                self.assertAlmostEqual(got[i][j], sum(a * b for a, b in zip(X[i], W[j])), places=11)


    def test_matmul_kernel_overflows_to_inf_not_an_exception(self):
        # a damaged checkpoint's weights can reach 1e200; float ** 2 raised OverflowError there
        got = M.matmul_nt([[1e200, 1.0]], [[1e200, 2.0], [1.0, 1.0]])
        self.assertFalse(math.isfinite(got[0][0]))
        h, n = M.prepare_row([1e200, 0.0])                 # the generation path: no exception either
        self.assertEqual(len(M.dots([1.0, 1.0], [h], [n])), 1)

    def test_rms_of_huge_rows_is_not_an_exception(self):
        # a checkpoint claiming the wrong byteorder loads weights near 1e200; sumsq's ** 2 raised there
        self.assertEqual(M.sumsq([1e200, 0.0]), float("inf"))
        self.assertEqual(M.rms_scale([1e200, 1.0]), 0.0)

    def test_fixed_point_kernel_within_its_error_bound(self):
        rng = random.Random(4)
        for M_rows, k in ((1, 1), (7, 72), (40, 288), (3, 5)):
            W = [[rng.gauss(0, 0.3) for _ in range(k)] for _ in range(M_rows)]
            fm = M.FixedMatrix(W)
            wmax = max(abs(v) for r in W for v in r)
            for x in ([rng.gauss(0, 1) for _ in range(k)],
                      [rng.uniform(-1e6, 1e6) for _ in range(k)],
                      [0.0] * (k - 1) + [3.5],                      # all weight on one input
                      [1e-30 * rng.gauss(0, 1) for _ in range(k)]):
                l1 = sum(abs(v) for v in x)
                bound = 0.5 * (k * 2.0 ** (M.FIXED_BITS - 62) + 2.0 ** -M.FIXED_BITS) * wmax * l1
                got = M.fixed_dots(x, fm)
                for w, y in zip(W, got):
                    exact = math.fsum(a * b for a, b in zip(w, x))
                    self.assertLessEqual(abs(y - exact), bound * 1.0001 + 1e-300, (M_rows, k, x[:2]))

    def test_fixed_point_kernel_special_inputs(self):
        W = [[1.0, -2.0], [0.5, 0.25]]
        fm = M.FixedMatrix(W)
        self.assertEqual(M.fixed_dots([0.0, 0.0], fm), [0.0, 0.0])
        self.assertTrue(all(math.isnan(v) for v in M.fixed_dots([float("nan"), 1.0], fm)))
        self.assertTrue(all(math.isnan(v) for v in M.fixed_dots([float("inf"), 1.0], fm)))
        self.assertEqual(M.fixed_dots([3.0, -1.0], M.FixedMatrix([[0.0, 0.0]])), [0.0])
        self.assertTrue(math.isnan(M.fixed_dots([1.0, 1.0], M.FixedMatrix([[float("inf"), 0.0]]))[0]))
        nan_late = M.FixedMatrix([[1.0, 1.0], [1.0, float("nan")]])    # max() skips a NaN not in front
        self.assertTrue(all(math.isnan(v) for v in M.fixed_dots([1.0, 1.0], nan_late)))
        self.assertEqual(M.fixed_dots([1.0, 2.0], M.FixedMatrix([[1e-310, 0.0]])), [0.0])   # below FIXED_TINY
        self.assertEqual(M.fixed_dots([5e-324, 0.0], fm), [0.0, 0.0])
        self.assertAlmostEqual(M.fixed_dots([1.0, 0.0], M.FixedMatrix([[1e-280, 0.0]]))[0] / 1e-280, 1.0, places=7)
        y = M.fixed_dots([2.0, 1.0], fm)
        self.assertAlmostEqual(y[0], 0.0, places=7)
        self.assertAlmostEqual(y[1], 1.25, places=7)


if __name__ == "__main__":
    unittest.main()
