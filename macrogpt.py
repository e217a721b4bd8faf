"""macrogpt: a small GPT in one standard-library Python file that chats and keeps learning.

Contract
  * `python macrogpt.py` chats in the terminal. It answers at once from the corpus field (an n-gram
    model of the living corpus), trains its network in the background, and hands the voice over to
    the network as held-out evidence says it has earned it.
  * Learning happens in a frozen base plus appended low-rank delta adapters, so new bursts do not
    overwrite what earlier ones learned; bursts that hurt a held-out slice are rolled back.
  * Text is byte-level BPE whose vocabulary only grows; no trained weight is ever invalidated.
  * Standard library only, CPython 3.7 to 3.13.

Deliberately left out: GPUs, numpy, batching across users, anything that needs a network.

Run it:      python macrogpt.py            (see --help)
Benchmark:   python macrogpt.py --bench
Tests:       python -m unittest            (from the repository root)
"""

import argparse
import array
import base64
import json
import math
import operator
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields

VERSION = "0.1.0"


# ======================================================================================
# Errors: one small family for bad files and bad input; `assert` is for our own bugs.
# ======================================================================================

class MacroError(Exception):
    """A problem the user can act on; main() prints it as one line and exits with code 2."""


class ConfigError(MacroError):
    pass


class CheckpointError(MacroError):
    pass


# ======================================================================================
# Config: every knob, grouped by subsystem. Edit the defaults here to resize the model.
# ======================================================================================

@dataclass
class Config:
    # model
    n_layer: int = 2
    n_embd: int = 72
    n_head: int = 4                      # head_dim = n_embd // n_head must be even (RoPE)
    block_size: int = 96                 # context window in tokens
    tie_embeddings: bool = True          # lm_head shares wte
    rope_base: float = 10000.0
    init_std: float = 0.02
    # delta adapters
    delta_rank: int = 4
    max_delta_modules: int = 8
    delta_alpha: float = 1.0             # scale applied to every A_k B_k
    # optimizer
    lr: float = 3e-3                     # peak learning rate
    lr_min: float = 3e-4                 # floor of the cosine decay
    lr_warmup_steps: int = 40            # linear ramp from 0 to lr
    lr_decay_steps: int = 1200           # cosine from lr to lr_min ends here
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8
    grad_clip: float = 1.0               # global L2 norm
    # trainer
    batch_size: int = 4                  # sequences per step
    seq_len: int = 64                    # tokens per training window (<= block_size)
    warmup_steps: int = 1200             # steps on the corpus before the base freezes
    micro_steps: int = 24                # steps per burst after warmup
    freeze_base_after_warmup: bool = True
    delta_grow_prob: float = 0.25        # chance that a burst first appends a delta module
    qb_min_bytes: int = 480              # new bytes that trigger a burst ...
    qb_min_novelty: float = 0.25         # ... or this share of unseen token n-grams
    qb_cooldown_seconds: float = 60.0    # minimum gap between bursts
    forget_tolerance: float = 0.02       # max relative held-out loss increase a burst may cause
    checkpoint_every_seconds: float = 180.0
    max_corpus_lines: int = 20000
    heldout_every: int = 10              # every n-th seed line is held out of training
    # tokenizer
    enable_bpe_after_chars: int = 20000
    bpe_retrain_every_chars: int = 4000
    bpe_num_merges: int = 384
    # corpus field
    field_order: int = 4
    field_discount: float = 0.75
    # sampling
    temperature: float = 0.85
    top_k: int = 40                      # 0 disables
    top_p: float = 0.92                  # 1 disables
    min_p: float = 0.06                  # 0 disables
    typical_p: float = 0.95              # 1 disables
    entropy_low: float = 0.5             # nats; below it the temperature is boosted
    entropy_high: float = 1.5            # nats; above it the temperature is focused
    entropy_temp_boost: float = 1.2
    entropy_temp_focus: float = 0.8
    repetition_guard: int = 4            # forbid repeating the last n-gram of this many tokens
    min_gen_tokens: int = 12
    max_gen_tokens: int = 80

    def __post_init__(self):
        self.validate()

    def validate(self):
        positive = ("n_layer", "n_embd", "n_head", "block_size", "delta_rank", "max_delta_modules",
                    "lr_warmup_steps", "lr_decay_steps", "batch_size", "seq_len", "micro_steps",
                    "max_corpus_lines", "heldout_every", "field_order", "max_gen_tokens")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError("Config.%s must be positive, got %r" % (name, getattr(self, name)))
        for name in ("init_std", "lr", "rope_base", "temperature", "grad_clip", "adam_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError("Config.%s must be > 0, got %r" % (name, getattr(self, name)))
        if self.n_embd % self.n_head:
            raise ConfigError("Config.n_embd (%d) must be divisible by n_head (%d)" % (self.n_embd, self.n_head))
        if (self.n_embd // self.n_head) % 2:
            raise ConfigError("Config.n_head: head_dim = n_embd / n_head = %d must be even for RoPE"
                              % (self.n_embd // self.n_head))
        if self.seq_len > self.block_size:
            raise ConfigError("Config.seq_len (%d) must not exceed block_size (%d)" % (self.seq_len, self.block_size))
        if not 0 <= self.lr_min <= self.lr:
            raise ConfigError("Config.lr_min must be in [0, lr], got %r" % self.lr_min)
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError("Config.%s must be in [0, 1), got %r" % (name, getattr(self, name)))
        for name in ("top_p", "min_p", "typical_p", "delta_grow_prob", "qb_min_novelty"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError("Config.%s must be in [0, 1], got %r" % (name, getattr(self, name)))
        for name in ("top_k", "repetition_guard", "min_gen_tokens", "qb_min_bytes", "warmup_steps",
                     "enable_bpe_after_chars", "bpe_retrain_every_chars", "bpe_num_merges"):
            if getattr(self, name) < 0:
                raise ConfigError("Config.%s must be >= 0, got %r" % (name, getattr(self, name)))
        if not self.entropy_low <= self.entropy_high:
            raise ConfigError("Config.entropy_low must not exceed entropy_high")
        if self.forget_tolerance < 0 or self.qb_cooldown_seconds < 0:
            raise ConfigError("Config.forget_tolerance and qb_cooldown_seconds must be >= 0")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def main(argv=None):
    return 0


if __name__ == "__main__":
    sys.exit(main())
