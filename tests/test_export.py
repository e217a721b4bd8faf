"""Export to and import from the Hugging Face Llama format, checked with the standard library alone."""
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest

import macrogpt as M
from tests.helpers import MIXED, SCRIPT, brain_with_deltas, tiny_trainer_config


def max_logit_gap(a, b, seqs):
    gap = 0.0
    for seq in seqs:
        for ra, rb in zip(a.forward([seq]).data, b.forward([seq]).data):
            gap = max(gap, max(abs(x - y) for x, y in zip(ra, rb)))
    return gap


class ExportTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def path(self, *names):
        return os.path.join(self.dir, *names)

    def export(self, brain, name="hf"):
        M.export_hf(brain, self.path(name))
        return self.path(name)

    def sequences(self, brain):
        tok = brain.tok
        return [tok.encode("H: how is the sea today?")[:16], tok.encode(MIXED)[:16], [M.EOS, 5, tok.vocab_size - 1, 7]]

    # -- round trips -------------------------------------------------------------------------
    def test_untied_round_trip_keeps_every_logit(self):
        cfg = tiny_trainer_config(tie_embeddings=False)
        brain = brain_with_deltas(cfg)
        back = M.brain_from_hf(self.export(brain), cfg)
        gap = max_logit_gap(brain.model, back.model, self.sequences(brain))
        self.assertLess(gap, 1e-6)
        self.assertGreater(max_logit_gap(brain.model, M.GPT(cfg, brain.tok.vocab_size, seed=1),
                                         self.sequences(brain)), 1e-3)     # the deltas did matter
        self.assertEqual(back.tok.merges, brain.tok.merges)

    def test_tied_round_trip_stays_tied(self):
        cfg = tiny_trainer_config()
        brain = brain_with_deltas(cfg, head_deltas=False)
        folder = self.export(brain)
        names = set(M.read_safetensors(os.path.join(folder, "model.safetensors")))
        self.assertNotIn("lm_head.weight", names)
        with open(os.path.join(folder, "config.json")) as f:
            self.assertTrue(json.load(f)["tie_word_embeddings"])
        back = M.brain_from_hf(folder, cfg)
        self.assertLess(max_logit_gap(brain.model, back.model, self.sequences(brain)), 1e-6)

    def test_head_deltas_untie_the_export_and_need_an_untied_config(self):
        brain = brain_with_deltas(tiny_trainer_config())
        folder = self.export(brain)
        with open(os.path.join(folder, "config.json")) as f:
            self.assertFalse(json.load(f)["tie_word_embeddings"])
        with self.assertRaisesRegex(M.HFError, '"tie_embeddings": false'):
            M.brain_from_hf(folder, tiny_trainer_config())
        back = M.brain_from_hf(folder, tiny_trainer_config(tie_embeddings=False))
        self.assertLess(max_logit_gap(brain.model, back.model, self.sequences(brain)), 1e-6)

    def test_imported_brain_is_warmed_up_with_a_delta_and_saved(self):
        cfg = tiny_trainer_config(tie_embeddings=False)
        brain = brain_with_deltas(cfg)
        ckpt = self.path("imported.ckpt")
        M.import_hf(self.export(brain), ckpt, cfg)
        back = M.Brain.load_or_fresh(ckpt, cfg)
        self.assertTrue(back.progress.warmup_done)
        self.assertEqual((back.step, back.progress.bpe_chars), (77, 1234))
        self.assertEqual(back.model.n_deltas, 1)
        self.assertLess(max_logit_gap(brain.model, back.model, self.sequences(brain)), 1e-6)

    def test_import_refuses_an_existing_checkpoint_without_force(self):
        cfg = tiny_trainer_config(tie_embeddings=False)
        folder = self.export(brain_with_deltas(cfg))
        ckpt = self.path("c.ckpt")
        with open(ckpt, "wb") as f:
            f.write(b"precious")
        with self.assertRaisesRegex(M.HFError, "--force"):
            M.import_hf(folder, ckpt, cfg)
        with open(ckpt, "rb") as f:
            self.assertEqual(f.read(), b"precious")
        M.import_hf(folder, ckpt, cfg, force=True)
        self.assertEqual(M.Brain.load_or_fresh(ckpt, cfg).tok.vocab_size, brain_with_deltas(cfg).tok.vocab_size)

    # -- safetensors ---------------------------------------------------------------------------
    def test_safetensors_layout_parsed_independently(self):
        cfg = tiny_trainer_config(tie_embeddings=False)
        brain = brain_with_deltas(cfg)
        with open(os.path.join(self.export(brain), "model.safetensors"), "rb") as f:
            data = f.read()
        n = struct.unpack("<Q", data[:8])[0]
        self.assertEqual((8 + n) % 8, 0)
        text = data[8:8 + n].decode("utf-8")
        self.assertTrue(text.startswith("{"))
        self.assertEqual(text.rstrip(" "), text.rstrip(" ").strip())      # padding is spaces only
        header = json.loads(text)
        self.assertEqual(header.pop("__metadata__"), {"format": "pt"})
        entries = sorted((t["data_offsets"], name, t) for name, t in header.items())
        end = 0
        for (a, b), name, t in entries:
            count = 1
            for d in t["shape"]:
                count *= d
            self.assertEqual((t["dtype"], a, b - a), ("F32", end, 4 * count), name)
            end = b
        self.assertEqual(8 + n + end, len(data))
        C, V = cfg.n_embd, brain.tok.vocab_size
        self.assertEqual(header["model.layers.0.mlp.gate_proj.weight"]["shape"], [4 * C, C])
        self.assertEqual(header["model.layers.0.mlp.down_proj.weight"]["shape"], [C, 4 * C])
        self.assertEqual(header["model.norm.weight"]["shape"], [C])
        self.assertEqual(header["lm_head.weight"]["shape"], [V, C])
        self.assertEqual(len(header), 2 + 9 * cfg.n_layer + 1)
        a, b = header["model.layers.0.self_attn.k_proj.weight"]["data_offsets"]
        got = struct.unpack("<%df" % (C * C), data[8 + n + a:8 + n + b])
        want = M.Linear.effective(brain.model.blocks[0].wk)
        self.assertEqual(list(got), [struct.unpack("<f", struct.pack("<f", v))[0] for r in want for v in r])

    def test_half_precision_tensors_are_read(self):
        values = [0.5, -2.0, 1.25, 3.0e-3]
        f16 = struct.pack("<4e", *values)
        bf16 = b"".join(struct.pack("<f", v)[2:] for v in values)       # the top 16 bits of a float32
        header = {"a": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]},
                  "b": {"dtype": "BF16", "shape": [4], "data_offsets": [8, 16]}}
        text = json.dumps(header).encode("utf-8")
        path = self.path("h.safetensors")
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text + f16 + bf16)
        got = M.read_safetensors(path)
        self.assertEqual(got["a"], ([2, 2], list(struct.unpack("<4e", f16))))
        self.assertEqual(got["b"][0], [4])
        for g, v in zip(got["b"][1], values):
            self.assertAlmostEqual(g, v, delta=abs(v) / 128)

    def test_damaged_safetensors_are_refused(self):
        cfg = tiny_trainer_config()
        path = os.path.join(self.export(brain_with_deltas(cfg, head_deltas=False)), "model.safetensors")
        with open(path, "rb") as f:
            data = f.read()
        for bad in (data[:-4], data[:5], b"\xff" * 8 + data[8:], data[:8] + b"[" + data[9:]):
            with open(path, "wb") as f:
                f.write(bad)
            with self.assertRaises(M.HFError):
                M.read_safetensors(path)
        for entry in ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},      # the fuzzer's: a list dtype
                      {"dtype": "F32", "shape": [float("inf")], "data_offsets": [0, 4]}):
            text = json.dumps({"a": entry}).encode("utf-8")
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(text)) + text + b"\0" * 4)
            with self.assertRaisesRegex(M.HFError, "tensor a "):
                M.read_safetensors(path)

    def test_deeply_nested_json_is_refused_in_one_line(self):
        folder = self.export(brain_with_deltas(tiny_trainer_config(), head_deltas=False))
        deep = b"[" * 100000 + b"]" * 100000
        weights = os.path.join(folder, "model.safetensors")
        with open(weights, "rb") as f:
            data = f.read()
        with open(weights, "wb") as f:
            f.write(struct.pack("<Q", len(deep)) + deep + data)
        with self.assertRaisesRegex(M.HFError, "header is not JSON"):
            M.read_safetensors(weights)
        for name in ("config.json", "tokenizer.json"):
            with open(os.path.join(folder, name), "rb") as f:
                good = f.read()
            with open(os.path.join(folder, name), "wb") as f:
                f.write(deep)
            with self.assertRaisesRegex(M.HFError, "%s is not JSON" % name):
                M.brain_from_hf(folder, tiny_trainer_config())
            with open(os.path.join(folder, name), "wb") as f:
                f.write(good)

    def test_unknown_dtype_is_refused_in_one_line(self):
        path = self.path("d.safetensors")
        for dtype in ([], "F\n2", {"a": 1}):
            text = json.dumps({"a": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}).encode("utf-8")
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(text)) + text + b"\0" * 4)
            with self.assertRaisesRegex(M.HFError, "tensor a is .*; macrogpt reads") as cm:
                M.read_safetensors(path)
            self.assertNotIn("\n", str(cm.exception))

    def test_merge_with_a_newline_is_refused_in_one_line(self):
        folder = self.export(brain_with_deltas(tiny_trainer_config(), head_deltas=False))
        path = os.path.join(folder, "tokenizer.json")
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
        tj["model"]["merges"][0] = "\u0120\nd"
        with open(path, "w", encoding="utf-8") as f:
            json.dump(tj, f)
        with self.assertRaisesRegex(M.HFError, "merge .* does not make the next id") as cm:
            M.brain_from_hf(folder, tiny_trainer_config())
        self.assertNotIn("\n", str(cm.exception))

    def test_infinite_shape_is_refused_in_one_line(self):
        path = self.path("s.safetensors")
        for shape in ([float("-inf")], [2, float("inf")]):
            text = json.dumps({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}).encode("utf-8")
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(text)) + text + b"\0" * 4)
            with self.assertRaisesRegex(M.HFError, "tensor a has no valid dtype/shape/data_offsets"):
                M.read_safetensors(path)

    def test_tensor_name_with_a_newline_is_refused_in_one_line(self):
        cfg = tiny_trainer_config()
        folder = self.export(brain_with_deltas(cfg, head_deltas=False))
        path = os.path.join(folder, "model.safetensors")
        tensors = [(name, shape, [flat[i:i + shape[-1]] for i in range(0, len(flat), shape[-1])])
                   for name, (shape, flat) in sorted(M.read_safetensors(path).items())]
        M.write_safetensors(path, tensors + [("x\n.bias", [1, 2], [[0.0, 0.0]])])   # was named on two lines
        with self.assertRaisesRegex(M.HFError, "a tensor name holds 'x\\\\n.bias'") as cm:
            M.brain_from_hf(folder, cfg)
        self.assertNotIn("\n", str(cm.exception))

    def test_lora_export_keeps_deltas_apart_and_adds_up(self):
        cfg = tiny_trainer_config()
        brain = brain_with_deltas(cfg)
        folder = self.path("lora")
        M.export_hf(brain, folder, lora=True)
        with open(os.path.join(folder, "adapter", "adapter_config.json")) as f:
            adapter = json.load(f)
        rank = 2 * cfg.delta_rank
        self.assertEqual((adapter["peft_type"], adapter["r"], adapter["lora_alpha"]), ("LORA", rank, rank))
        self.assertEqual(adapter["base_model_name_or_path"], os.path.abspath(folder))
        base = M.read_safetensors(os.path.join(folder, "model.safetensors"))
        lora = M.read_safetensors(os.path.join(folder, "adapter", "adapter_model.safetensors"))
        self.assertEqual(len(lora), 2 * (7 * cfg.n_layer + 1))
        blk = brain.model.blocks[0]
        for path, lin in (("model.layers.0.mlp.down_proj", blk.fc2), ("model.layers.0.self_attn.q_proj", blk.wq),
                          ("lm_head", brain.model.lm_head)):
            (out_dim, in_dim), w = base[path + ".weight"]
            a_shape, a = lora["base_model.model." + path + ".lora_A.weight"]
            b_shape, b = lora["base_model.model." + path + ".lora_B.weight"]
            self.assertEqual((a_shape, b_shape), ([rank, in_dim], [out_dim, rank]))
            want = lin.effective()
            for i in range(out_dim):
                for j in range(in_dim):
                    got = w[i * in_dim + j] + sum(b[i * rank + k] * a[k * in_dim + j] for k in range(rank))
                    self.assertAlmostEqual(got, want[i][j], delta=1e-6)
        self.assertEqual(base["lm_head.weight"][1], [v for r in brain.model.wte.data
                                                     for v in struct.unpack("<%df" % len(r), struct.pack("<%df" % len(r), *r))])
        M.export_hf(brain, folder, force=True, lora=True)              # an earlier LoRA export is replaceable
        fresh = M.Brain(M.GPT(cfg, brain.tok.vocab_size), M.Adam(cfg), 0, brain.tok, M.Progress())
        with self.assertRaisesRegex(M.HFError, "no delta adapters"):
            M.export_hf(fresh, self.path("none"), lora=True)

    # -- tokenizer ---------------------------------------------------------------------------
    def test_tokenizer_json_is_well_formed(self):
        brain = brain_with_deltas(tiny_trainer_config())
        with open(os.path.join(self.export(brain), "tokenizer.json"), encoding="utf-8") as f:
            tj = json.load(f)
        vocab, merges = tj["model"]["vocab"], tj["model"]["merges"]
        self.assertEqual(len(vocab), brain.tok.vocab_size)
        self.assertEqual(sorted(vocab.values()), list(range(brain.tok.vocab_size)))
        self.assertEqual(len(merges), len(brain.tok.merges))
        self.assertEqual([(t["id"], t["content"], t["special"]) for t in tj["added_tokens"]],
                         [(256, "<BOS>", True), (257, "<EOS>", True), (258, "<PAD>", True)])
        alphabet = M.byte_alphabet()
        self.assertEqual(len(set(alphabet)), 256)
        self.assertTrue(all(c.isprintable() and not c.isspace() for c in alphabet))
        for i, (a, b) in enumerate(brain.tok.merges):
            left, right = merges[i].split(" ")
            self.assertEqual((vocab[left], vocab[right], vocab[left + right]), (a, b, 259 + i))
            self.assertEqual(bytes(alphabet.index(c) for c in left + right), brain.tok.token_bytes(259 + i))

    def test_oniguruma_regex_splits_like_piece_re_on_every_code_point(self):
        regex = M.hf_piece_regex()
        as_python = re.compile(re.sub(r"\\x\{([0-9A-F]+)\}", lambda m: "\\U%08x" % int(m.group(1), 16), regex))
        edges = set()                                  # where an off-by-one in a range would show
        for pattern in (r"[^\W\d_]", r"\d", r"\s"):
            for a, b in M._code_point_ranges(pattern):
                edges.update((a - 1, a, b, b + 1))
        rng = random.Random(0)
        edges.update(rng.randrange(0x110000) for _ in range(20000))
        chars = "".join(chr(c) for c in sorted(edges) if 0 <= c < 0x110000 and not 0xD800 <= c <= 0xDFFF)
        self.assertGreater(len(chars), 5000)
        for text in (chars, " ".join(chars), "a".join(chars), "1".join(chars), "  ".join(chars), MIXED):
            self.assertEqual(as_python.findall(text), M.split_pieces(text))

    def test_tokens_sharing_bytes_cannot_be_exported(self):
        tok = M.Tokenizer([(98, 99), (97, 98), (97, 259), (260, 99)])     # "abc" twice: a+bc, ab+c
        cfg = tiny_trainer_config()
        brain = M.Brain(M.GPT(cfg, tok.vocab_size), M.Adam(cfg), 0, tok, M.Progress())
        with self.assertRaisesRegex(M.HFError, "same bytes"):
            M.export_hf(brain, self.path("dup"))
        self.assertEqual(os.listdir(self.dir), [])

    def test_foreign_tokenizer_is_refused(self):
        cfg = tiny_trainer_config(tie_embeddings=False)
        folder = self.export(brain_with_deltas(cfg))
        path = os.path.join(folder, "tokenizer.json")
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
        good = json.loads(json.dumps(tj))
        tj["model"]["merges"] = tj["model"]["merges"][1:] + tj["model"]["merges"][:1]
        gpt2 = json.loads(json.dumps(good))
        gpt2["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r" ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+"
        ascii_only = json.loads(json.dumps(good))
        ascii_only["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r" ?[a-zA-Z]+| ?[0-9]+| ?[^a-zA-Z0-9\s]+|\s+"
        for bad, why in ((tj, "merge"), (gpt2, "splits text"), (ascii_only, "splits text")):
            with open(path, "w", encoding="utf-8") as f:
                json.dump(bad, f)
            with self.assertRaisesRegex(M.HFError, why):
                M.brain_from_hf(folder, cfg)
        good["model"]["merges"] = [m.split(" ") for m in good["model"]["merges"]]   # tokenizers >= 0.20
        with open(path, "w", encoding="utf-8") as f:
            json.dump(good, f)
        self.assertEqual(M.brain_from_hf(folder, cfg).tok.vocab_size, tj["model"]["vocab"].__len__())

    def test_odd_architectures_and_rope_types_are_refused_in_one_line(self):
        cfg = tiny_trainer_config()
        folder = self.export(brain_with_deltas(cfg, head_deltas=False))
        path = os.path.join(folder, "config.json")
        with open(path, encoding="utf-8") as f:
            good = json.load(f)
        for change, why in ((dict(architectures=0.5), "is a unknown model"),
                            (dict(architectures=["LlamaFor\nCausalLM"]), "is a 'LlamaFor\\\\nCausalLM' model"),
                            (dict(architectures=["MistralForCausalLM"]), "is a MistralForCausalLM model"),
                            (dict(rope_parameters={"rope_type": "\n"}), "uses '\\\\n' RoPE")):
            with open(path, "w", encoding="utf-8") as f:
                json.dump(dict(good, **change), f)
            with self.assertRaisesRegex(M.HFError, why) as cm:
                M.brain_from_hf(folder, cfg)
            self.assertNotIn("\n", str(cm.exception))

    def test_head_dim_of_the_wrong_kind_is_refused_in_one_line(self):
        cfg = tiny_trainer_config()
        folder = self.export(brain_with_deltas(cfg, head_deltas=False))
        path = os.path.join(folder, "config.json")
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
        for head_dim in ({"a": 1}, "8", [8]):
            with open(path, "w", encoding="utf-8") as f:
                json.dump(dict(hf, head_dim=head_dim), f)
            with self.assertRaisesRegex(M.HFError, "has head_dim"):
                M.brain_from_hf(folder, cfg)

    def test_a_foreign_pattern_prints_no_warning(self):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")                 # Python warns of "[[" as a future set syntax
            self.assertFalse(M._splits_like_piece_re({"Regex": "[[a-z]x(?:28)]"}))

    def test_malformed_files_are_refused_in_one_line(self):
        cfg = tiny_trainer_config(tie_embeddings=False)
        folder = self.export(brain_with_deltas(cfg))
        originals = {}
        for name in ("config.json", "tokenizer.json"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                originals[name] = f.read()
        edits = [("config.json", lambda c: c.update(hidden_size="big")),
                 ("config.json", lambda c: c.update(head_dim=None, num_attention_heads=0)),
                 ("config.json", lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0})),
                 ("config.json", lambda c: c.update(rms_norm_eps=1e-5)),
                 ("config.json", lambda c: c.update(intermediate_size=10)),
                 ("config.json", lambda c: c.update(vocab_size=c["vocab_size"] + 64)),
                 ("config.json", lambda c: c.clear()),
                 ("tokenizer.json", lambda t: t.update(model="BPE")),
                 ("tokenizer.json", lambda t: t.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [1, 2]})),
                 ("tokenizer.json", lambda t: t["model"].update(merges=[[1, 2]])),
                 ("tokenizer.json", lambda t: t["model"].update(byte_fallback=True)),
                 ("tokenizer.json", lambda t: t.update(normalizer={"type": "NFC"})),
                 ("tokenizer.json", lambda t: t["model"]["vocab"].update({"extra": 9999}))]
        for name, change in edits:
            obj = json.loads(originals[name])
            change(obj)
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                json.dump(obj, f)
            with self.assertRaises(M.HFError, msg=name):
                M.brain_from_hf(folder, cfg)
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                f.write(originals[name])
        M.brain_from_hf(folder, cfg)

    # -- a partial export never looks complete ------------------------------------------------
    def test_interrupted_export_leaves_nothing_that_looks_complete(self):
        cfg = tiny_trainer_config()
        brain = brain_with_deltas(cfg, head_deltas=False)
        real = M.write_safetensors

        def crash(path, tensors):
            with open(path, "wb") as f:
                f.write(b"half")
            raise KeyboardInterrupt
        M.write_safetensors = crash
        try:
            with self.assertRaises(KeyboardInterrupt):
                M.export_hf(brain, self.path("hf"))
            self.assertEqual(os.listdir(self.dir), [])
            M.write_safetensors = real
            self.export(brain)
            before = sorted(os.listdir(self.path("hf")))
            M.write_safetensors = crash
            with self.assertRaises(KeyboardInterrupt):
                M.export_hf(brain, self.path("hf"), force=True)
        finally:
            M.write_safetensors = real
        self.assertEqual(os.listdir(self.dir), ["hf"])                    # the earlier export, intact
        self.assertEqual(sorted(os.listdir(self.path("hf"))), before)
        M.brain_from_hf(self.path("hf"), cfg)


class ExportCliTest(unittest.TestCase):
    """The real program in a subprocess: each refusal is one line, exit code 2, no traceback."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.cfg = tiny_trainer_config(tie_embeddings=False)
        with open(self.path("tiny.json"), "w") as f:
            json.dump(self.cfg.to_dict(), f)
        self.brain = brain_with_deltas(self.cfg)
        self.brain.save(self.path("macrogpt.ckpt"))

    def path(self, *names):
        return os.path.join(self.dir, *names)

    def run_cli(self, *extra):
        p = subprocess.run([sys.executable, SCRIPT, "--config", "tiny.json"] + list(extra), cwd=self.dir,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")

    def assertRefused(self, pattern, *extra):
        code, out, err = self.run_cli(*extra)
        self.assertEqual(code, 2, out + err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertRegex(err, "^macrogpt: error: .*" + pattern)

    def edit_json(self, name, change):
        with open(self.path("hf", name)) as f:
            obj = json.load(f)
        change(obj)
        with open(self.path("hf", name), "w") as f:
            json.dump(obj, f)

    def test_export_import_and_refusals(self):
        code, out, err = self.run_cli("--export", "hf")
        self.assertEqual(code, 0, err)
        self.assertIn("exported macrogpt.ckpt to hf", out)
        self.assertRefused("not empty; pass --force", "--export", "hf")
        self.assertEqual(self.run_cli("--export", "hf", "--force")[0], 0)
        code, out, err = self.run_cli("--import", "hf", "--ckpt", "back.ckpt")
        self.assertEqual(code, 0, err)
        back = M.Brain.load_or_fresh(self.path("back.ckpt"), self.cfg)
        self.assertLess(max_logit_gap(self.brain.model, back.model, [[1, 2, self.brain.tok.vocab_size - 1, 4]]), 1e-6)
        self.assertRefused("exists; pass --force", "--import", "hf", "--ckpt", "back.ckpt")
        code, out, err = self.run_cli("--export-lora", "lora")
        self.assertEqual(code, 0, err)
        self.assertIn("rank-8 LoRA in adapter", out)
        self.assertRefused("one at a time", "--export", "a", "--import", "hf")

        shutil.copy(self.path("hf", "config.json"), self.path("good.json"))
        self.edit_json("config.json", lambda c: c.update(architectures=["MistralForCausalLM"]))
        self.assertRefused("MistralForCausalLM model", "--import", "hf", "--ckpt", "x.ckpt")
        shutil.copy(self.path("good.json"), self.path("hf", "config.json"))
        self.edit_json("config.json", lambda c: c.update(num_key_value_heads=1))
        self.assertRefused("num_key_value_heads = 1", "--import", "hf", "--ckpt", "x.ckpt")
        shutil.copy(self.path("good.json"), self.path("hf", "config.json"))
        self.edit_json("config.json", lambda c: c.update(hidden_size=16, intermediate_size=64, head_dim=8))
        self.assertRefused('"n_embd": 16 in a --config', "--import", "hf", "--ckpt", "x.ckpt")
        shutil.copy(self.path("good.json"), self.path("hf", "config.json"))

        weights = self.path("hf", "model.safetensors")
        tensors = M.read_safetensors(weights)
        rows = [[v] for v in tensors["model.norm.weight"][1]]
        M.write_safetensors(weights, [(n, s, [f[i:i + s[-1]] for i in range(0, len(f), s[-1])])
                                      for n, (s, f) in tensors.items()]
                            + [("model.layers.0.self_attn.q_proj.bias", [len(rows)], [[r[0] for r in rows]])])
        self.assertRefused("bias tensors", "--import", "hf", "--ckpt", "x.ckpt")
        self.assertFalse(os.path.exists(self.path("x.ckpt")))

        os.mkdir(self.path("notes"))
        with open(self.path("notes", "diary.txt"), "w") as f:
            f.write("mine")
        self.assertRefused("only replaces an earlier export", "--export", "notes", "--force")
        self.assertTrue(os.path.exists(self.path("notes", "diary.txt")))


if __name__ == "__main__":
    unittest.main()
