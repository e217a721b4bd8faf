import unittest

from macrogpt import Config, ConfigError


class ConfigValidationTest(unittest.TestCase):
    def assertRejects(self, field_name, **kw):
        with self.assertRaises(ConfigError) as cm:
            Config(**kw)
        self.assertIn(field_name, str(cm.exception))
        self.assertNotIn("\n", str(cm.exception))

    def test_defaults_are_the_seed_sizes(self):
        c = Config()
        self.assertEqual((c.n_layer, c.n_embd, c.n_head, c.block_size), (2, 72, 4, 96))
        self.assertEqual(c.head_dim, 18)

    def test_n_embd_must_divide_by_n_head(self):
        self.assertRejects("n_head", n_embd=70, n_head=4)

    def test_head_dim_must_be_even_for_rope(self):
        self.assertRejects("head_dim", n_embd=36, n_head=4)

    def test_sizes_must_be_positive(self):
        self.assertRejects("n_layer", n_layer=0)
        self.assertRejects("block_size", block_size=-1)

    def test_probabilities_in_range(self):
        self.assertRejects("top_p", top_p=1.5)
        self.assertRejects("min_p", min_p=-0.1)
        self.assertRejects("lr_min", lr_min=1.0, lr=0.1)

    def test_values_of_the_wrong_kind_are_named(self):
        self.assertRejects("Config.n_embd must be an integer, got 'big'", n_embd="big")
        self.assertRejects("Config.n_layer must be an integer, got 2.5", n_layer=2.5)
        self.assertRejects("Config.n_layer must be an integer, got True", n_layer=True)
        self.assertRejects("Config.lr must be a finite number, got nan", lr=float("nan"))
        self.assertRejects("Config.qb_cooldown_seconds must be a finite number", qb_cooldown_seconds=float("inf"))
        self.assertRejects("Config.tie_embeddings must be true or false, got 1", tie_embeddings=1)
        self.assertEqual(Config(lr=1).lr, 1)                      # an integer is a number

    def test_an_integer_past_the_float_range_is_not_a_number(self):
        self.assertRejects("Config.lr must be a finite number, got 1000", lr=10 ** 400)   # was an OverflowError
        self.assertEqual(Config(top_p=1).top_p, 1)

    def test_temperature_factors_must_be_positive(self):
        self.assertRejects("entropy_temp_focus", entropy_temp_focus=0.0)      # divided by in sampling
        self.assertRejects("entropy_temp_boost", entropy_temp_boost=-1.0)

    def test_field_order_is_bounded(self):
        self.assertRejects("Config.field_order must be at most 16, got 1000", field_order=1000)   # hung the start
        self.assertEqual(Config(field_order=16).field_order, 16)

    def test_field_discount_keeps_probabilities_positive(self):
        self.assertRejects("field_discount", field_discount=1.5)     # gave probabilities down to -0.025
        self.assertRejects("field_discount", field_discount=-0.5)
        self.assertRejects("field_discount", field_discount=1.0)
        self.assertEqual(Config(field_discount=0.0).field_discount, 0.0)

    def test_set_takes_the_kind_from_the_field_not_the_value(self):
        import macrogpt as M
        cfg = Config(top_p=1)                                      # an int in a float field
        self.assertEqual(M.validate_setting(cfg, "top_p", "0.9").top_p, 0.9)
        with self.assertRaisesRegex(M.MacroError, "top_k needs an integer"):
            M.validate_setting(cfg, "top_k", "0.5")

    def test_deeply_nested_config_file_is_one_error(self):
        import os
        import tempfile
        import macrogpt as M
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "config.json")
            with open(path, "w") as f:
                f.write('{"top_k": ' + "[" * 100000 + "]" * 100000 + "}")
            with self.assertRaisesRegex(ConfigError, "cannot read config .*maximum recursion depth"):
                M.load_config(path)

    def test_dict_round_trip(self):
        c = Config(n_layer=3, top_k=7)
        self.assertEqual(Config.from_dict(c.to_dict()), c)


if __name__ == "__main__":
    unittest.main()
