"""Defaults shared by the API and the CLI.

Kept in a module that imports nothing heavy: the CLI builds ``--help`` from these values and
must not import torch or transformers to do so.
"""

# Greedy depth search: candidates re-scored per step after the first (None: all of them).
DEFAULT_SHORTLIST = 3

# Healing fits m unknowns per output of the preceding down_proj; 10 windows x 128 tokens would
# under-determine it.
HEAL_SAMPLES = 64
HEAL_TARGETS = ("local", "dense")
