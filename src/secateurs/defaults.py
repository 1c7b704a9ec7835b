"""Defaults shared by the API and the CLI.

Kept in a module that imports nothing heavy: the CLI builds ``--help`` from these values and
must not import torch or transformers to do so.
"""

# Greedy depth search: candidates re-scored per step after the first (None: all of them).
DEFAULT_SHORTLIST = 3

# Healing fits m unknowns per output of the preceding down_proj; 10 windows x 128 tokens would
# under-determine it.
HEAL_SAMPLES = 64
# Healing's ridge λ as a fraction of the mean diagonal of XᵀX (ReplaceMe fits without one).
HEAL_DAMPING = 0.01
HEAL_TARGETS = ("local", "dense")
# What the healing fit minimises: "lsq", the squared error of the stream (closed form); "cosine",
# ReplaceMe's cosine distance of the healed stream to the target, refined from the least-squares
# solution by Adam (docs/depth.md has the measurement that kept lsq the default).
HEAL_OBJECTIVES = ("lsq", "cosine")
HEAL_OBJECTIVE = "lsq"

# --unit block,width: the share of the parameter budget taken by whole blocks. Decided by
# benchmarks/combined.py (docs/plans.md): at 20% of SmolLM2-135M, 0.25 was the best mixed split.
DEPTH_SHARE = 0.25

# What the greedy depth search minimises (secateurs.objectives): "kl", the divergence of the
# pruned model's next-token distributions from the dense model's, made its choices far more
# stable over calibration seeds on SmolLM2 than "nll" (SLEB's calibration NLL): with --heal, 5 of
# 6 seed x budget cases within issue #10's targets at 10 windows, 6 of 6 at 32 (docs/depth.md).
SEARCH_OBJECTIVE = "kl"
# The joint attention/MLP search (--unit subblock) keeps the NLL: with "kl" it was worse at 6
# blocks' worth (WikiText-2 / PTB 239.6 / 457.2 against 231.9 / 409.8) and mixed at 10.
SUBBLOCK_SEARCH_OBJECTIVE = "nll"

# Width reconstruction: ridge λ as a fraction of the mean diagonal of the Gram, and the least
# calibration windows its least-squares fit uses (many more tokens than scoring needs).
RECONSTRUCT_DAMPING = 0.01
RECONSTRUCT_SAMPLES = 64

# --unit auto (secateurs.evolve): generations of the evolutionary search, and the calibration
# windows that judge candidates (drawn apart from the windows the variants are fitted on).
SEARCH_GENERATIONS = 60
JUDGE_SAMPLES = 16
# --latency: the engine whose per-layer table prices the search's candidates (the only one yet).
LATENCY_ENGINE = "llama.cpp"
