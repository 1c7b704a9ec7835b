"""Every user choice of a pruning run, parsed and validated once: ``PruneSpec``.

The CLI, the Python API, recipes and benchmarks all build a ``PruneSpec`` from the same flat
options (``PruneSpec.from_options(unit="width", ratio=0.2, ...)``, the names of ``secateurs
prune``'s flags) and hand it to ``secateurs.run.prune``. Validation happens here, in two steps,
both before any weight is read:

- ``PruneSpec.from_options`` checks the options against each other (an option that does not
  apply to the chosen units is refused, not ignored);
- ``PruneSpec.check_config(config)`` checks them against the model's ``config.json`` (layer
  counts, protected layers, what the architecture's adapter can prune).

The budget has ONE meaning: ``ratio`` is a fraction of the decoder's parameters (all parameters
but the embeddings and the output head, unless ``include_embeddings``), for every unit kind;
``remove`` is a count (depth: units; experts: per MoE layer); ``params`` a parameter count.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from secateurs.defaults import (
    DEFAULT_SHORTLIST,
    DEPTH_SHARE,
    HEAL_DAMPING,
    HEAL_OBJECTIVE,
    HEAL_OBJECTIVES,
    HEAL_SAMPLES,
    HEAL_TARGETS,
    JUDGE_SAMPLES,
    LATENCY_ENGINE,
    RECONSTRUCT_DAMPING,
    RECONSTRUCT_SAMPLES,
    SEARCH_GENERATIONS,
)
from secateurs.errors import ConfigError
from secateurs.plan import SL_PROTECTED, Plan, given_plan, parse_protected, read_plan_file

DEPTH_KINDS = ("block", "attn", "mlp")
WIDTH_KINDS = ("heads", "channels")
# --unit words → the unit kinds they prune
UNIT_WORDS: dict[str, tuple[str, ...]] = {
    "block": ("block",),
    "attn": ("attn",),
    "mlp": ("mlp",),
    "subblock": ("attn", "mlp"),
    "heads": ("heads",),
    "channels": ("channels",),
    "width": WIDTH_KINDS,
    "experts": ("experts",),
    "auto": ("auto",),  # every layer's form chosen together (``evolve``)
}
MODES = ("auto", "memory", "sequential", "stream")
ALLOCATIONS = ("uniform", "global")


def parse_units(text: str | tuple[str, ...]) -> tuple[str, ...]:
    """``--unit``: one word of ``UNIT_WORDS``, or ``block,width`` (blocks and a width kind)."""
    if isinstance(text, tuple):
        return text
    words = [w.strip() for w in str(text).split(",") if w.strip()]
    unknown = [w for w in words if w not in UNIT_WORDS]
    if unknown or not words:
        raise ConfigError(
            f"Unknown --unit {text!r}; expected one of {', '.join(UNIT_WORDS)} or block,width "
            "(block,heads / block,channels)."
        )
    if len(words) == 1:
        return UNIT_WORDS[words[0]]
    width = [w for w in words if UNIT_WORDS[w][0] in WIDTH_KINDS]
    if len(words) != 2 or "block" not in words or len(width) != 1:
        raise ConfigError(
            f"Combined units are a block and a width kind (block,width / block,heads / "
            f"block,channels), not {text!r}."
        )
    return ("block", *UNIT_WORDS[width[0]])


def parse_layers(value: Any) -> tuple[int, int] | None:
    """``--layers 4:28`` (or (4, 28)) → (4, 28): the layers width pruning may touch."""
    if value is None:
        return None
    if isinstance(value, str):
        start, sep, stop = value.partition(":")
        try:
            pair = (int(start or 0), int(stop)) if sep else (int(start), int(start) + 1)
        except ValueError as err:
            raise ConfigError(f"--layers takes START:STOP (e.g. 4:28), not {value!r}.") from err
    elif len(value) != 2 or not all(_whole(v) for v in value):
        raise ConfigError(f"--layers takes START:STOP (e.g. 4:28), not {value!r}.")
    else:
        pair = (int(value[0]), int(value[1]))
    if not 0 <= pair[0] < pair[1]:  # no model needed to see it selects nothing
        raise ConfigError(f"--layers {pair[0]}:{pair[1]} selects no layer: 0 <= START < STOP.")
    return pair


def unit_word(kinds: tuple[str, ...]) -> str:
    """The ``--unit`` word of ``kinds`` (its inverse of ``parse_units``)."""
    for word, value in UNIT_WORDS.items():
        if value == kinds:
            return word
    return "block," + unit_word(kinds[1:])


@dataclass(frozen=True)
class Budget:
    """How much goes: exactly one of ``ratio`` (of the decoder's parameters), ``remove`` (a
    count), ``params`` (a parameter count) or ``latency`` (``--unit auto``: a fraction of the
    dense model's time per token on ``engine``, by its latency table); none for an explicit
    selection."""

    ratio: float | None = None
    remove: int | None = None
    params: int | None = None
    include_embeddings: bool = False
    latency: float | None = None
    engine: str | None = None

    def __post_init__(self) -> None:
        amounts = ("ratio", "remove", "params", "latency")
        given = [n for n in amounts if getattr(self, n) is not None]
        if len(given) > 1:
            raise ConfigError(f"Give one of --ratio, --remove, --params or --latency, not {given}.")
        self._check_latency()
        if self.ratio is not None and not (_number(self.ratio) and 0 < self.ratio < 1):
            raise ConfigError(
                f"--ratio is a fraction of the decoder's parameters in (0, 1), not {self.ratio!r}"
                + (" (a percentage? use 0.2 for 20%)." if _number(self.ratio) else ".")
            )
        for name in ("remove", "params"):
            value = getattr(self, name)
            if value is not None and (not _whole(value) or value < 1):
                raise ConfigError(f"--{name} takes a positive whole number, not {value!r}.")

    def _check_latency(self) -> None:
        if self.latency is not None and not (_number(self.latency) and 0 < self.latency < 1):
            raise ConfigError(
                "--latency is a fraction of the dense model's time per token in (0, 1) (0.7: "
                f"0.7× the dense model's decode time), not {self.latency!r}."
            )
        if self.engine is not None and self.latency is None:
            raise ConfigError("--engine names the engine whose speed --latency budgets; add it.")
        if self.latency is not None and self.include_embeddings:
            raise ConfigError("--include-embeddings counts parameters for --ratio, not --latency.")
        if self.latency is not None:
            from secateurs.targets import LATENCY_ENGINES

            try:
                engine = LATENCY_ENGINES.canonical(self.engine or LATENCY_ENGINE)
            except ConfigError as err:
                raise ConfigError(f"--engine: {err}") from None
            object.__setattr__(self, "engine", engine)

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.ratio, self.remove, self.params, self.latency))


@dataclass(frozen=True)
class CriterionSpec:
    """A criterion as the user named it: ``given`` ("ppl+"), the registered ``name`` ("ppl"),
    its ``options`` (checked against the criterion's constructor), and the layers never removed
    (``protected``, relative: negatives count from the end; ``NAME+`` means Shortened LLaMA's
    set unless ``--protect`` says otherwise)."""

    given: str = "ppl+"
    names: tuple[str, ...] = ("ppl",)  # one name, or BLOCK,WIDTH for combined units
    options: Mapping[str, Any] = field(default_factory=dict)
    protected: tuple[int, ...] = SL_PROTECTED
    protect: str | None = None  # as given (None: from the + suffix)

    @classmethod
    def parse(
        cls, text: str, protect: Any = None, options: Mapping[str, Any] | None = None
    ) -> CriterionSpec:
        from secateurs.criteria import CRITERIA

        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        if not parts or len(parts) > 2:
            raise ConfigError(f"--criterion takes NAME or BLOCK,WIDTH, not {text!r}.")
        names = tuple(CRITERIA.canonical(p.rstrip("+")) for p in parts)
        plus = parts[0].endswith("+")
        protected = parse_protected(protect if protect is not None else ("sl" if plus else "none"))
        spec = cls(str(text), names, dict(options or {}), protected, _text(protect))
        spec.check_options()
        return spec

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def width_name(self) -> str:
        return self.names[-1]

    def check_options(self) -> None:
        """Unknown criterion options are refused with the known ones (before any work)."""
        from secateurs.criteria import CRITERIA

        if len(set(self.names)) > 1 and self.options:
            raise ConfigError("Criterion options need one criterion for both kinds (not A,B).")
        own = set(CRITERIA.fact(self.name, "accepts"))  # declared: no import
        known = own | SEARCH_OPTIONS
        unknown = sorted(set(self.options) - known)
        if unknown:
            search = ", ".join(sorted(SEARCH_OPTIONS - own))
            raise ConfigError(
                f"Criterion {self.name!r} has no option {', '.join(unknown)}; its options: "
                f"{', '.join(sorted(own)) or 'none'} (with --iterative ppl or --unit subblock "
                f"also the search's: {search}){_suggest(unknown[0], known)}."
            )
        if set(self.options) & own:  # the criterion checks their values when built (imports it)
            CRITERIA.get(self.name)(**self.criterion_options())

    def criterion_options(self) -> dict[str, Any]:
        """The options the criterion's constructor takes (search options left out)."""
        from secateurs.criteria import CRITERIA

        accepted = _accepted(CRITERIA.get(self.name))
        return {k: v for k, v in self.options.items() if k in accepted}


# Options of the greedy depth search, given with --option as the ppl criterion's are.
SEARCH_OPTIONS = frozenset({"objective", "top_k", "batch_size"})


@dataclass(frozen=True)
class Selection:
    """How units are chosen: by scores (default), by re-scoring after each removal
    (``iterative``; ``ppl`` runs the greedy search re-scoring a ``shortlist``), from saved
    ``scores``, or given explicitly (``blocks`` / ``attn`` / ``mlp`` indices, or a ``plan``
    file / dict: a bare plan or another run's ``secateurs.json``)."""

    iterative: bool = False
    shortlist: int | str = DEFAULT_SHORTLIST  # or "all": re-score every candidate
    generations: int = SEARCH_GENERATIONS  # --unit auto: the evolutionary search's length
    judge_samples: int = JUDGE_SAMPLES  # --unit auto: windows that judge candidates
    scores: str | None = None
    blocks: str | tuple[int, ...] | None = None
    attn: str | tuple[int, ...] | None = None
    mlp: str | tuple[int, ...] | None = None
    plan: Any = None

    def __post_init__(self) -> None:
        if self.plan is not None and any(x is not None for x in (self.blocks, self.attn, self.mlp)):
            raise ConfigError("Give either --plan or --blocks/--attn/--mlp, not both.")
        for name in ("blocks", "attn", "mlp"):
            _layer_list(getattr(self, name), name)  # parsed once here: bad text fails now
        if self.shortlist != "all" and (not _whole(self.shortlist) or self.shortlist < 0):
            raise ConfigError(f"--shortlist takes a count ≥ 0 or 'all', not {self.shortlist!r}.")
        for name in ("generations", "judge_samples"):
            if not _whole(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} takes a positive whole number.")
        if self.explicit and (self.iterative or self.scores is not None):
            raise ConfigError(
                "An explicit selection (--blocks/--plan) takes no --iterative/--scores."
            )

    @property
    def explicit(self) -> bool:
        return any(x is not None for x in (self.blocks, self.attn, self.mlp, self.plan))

    @property
    def shortlist_count(self) -> int | None:
        """Candidates re-scored per search step after the first (None: all of them)."""
        return None if self.shortlist == "all" else int(self.shortlist)

    def layer_lists(self) -> dict[str, tuple[int, ...]]:
        return {k: _layer_list(getattr(self, k), k) for k in ("blocks", "attn", "mlp")}

    def plan_for(self, num_layers: int) -> Plan:
        """The explicit plan for a model of ``num_layers`` layers (checked against it)."""
        if self.plan is not None:
            data = self.plan if isinstance(self.plan, dict) else read_plan_file(Path(self.plan))
            return given_plan(data, num_layers)
        lists = self.layer_lists()
        return Plan(num_layers, lists["blocks"], lists["attn"], lists["mlp"])


@dataclass(frozen=True)
class AllocationSpec:
    """Where width and experts go: ``uniform`` or ``global`` over ``layers`` (START:STOP),
    within per-layer bounds, channels rounded to ``round_to``; ``uniform_widths`` evens a global
    allocation out; ``sensitivity`` sizes global allocation by measured per-layer loss (None:
    the criterion's default); ``target``: an engine whose shapes the allocation must keep;
    ``depth_share``: for block,width, the share of the budget taken by whole blocks;
    ``min_keep``: experts kept per MoE layer at least."""

    mode: str = "uniform"
    layers: tuple[int, int] | None = None
    min_ratio: float = 0.0
    max_ratio: float = 0.9
    round_to: int = 1
    uniform_widths: bool | tuple[str, ...] = False
    sensitivity: bool | None = None
    target: str | None = None
    depth_share: float = DEPTH_SHARE
    min_keep: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", parse_layers(self.layers))
        if self.mode not in ALLOCATIONS:
            raise ConfigError(f"Unknown allocation {self.mode!r}; expected one of {ALLOCATIONS}.")
        if not 0 <= self.min_ratio <= self.max_ratio < 1:
            raise ConfigError(
                f"Per-layer bounds need 0 <= min_ratio <= max_ratio < 1 (a layer must keep "
                f"something); got min {self.min_ratio}, max {self.max_ratio}."
            )
        if not _whole(self.round_to) or self.round_to < 1:
            raise ConfigError(f"--round-to takes a positive whole number, not {self.round_to!r}.")
        if self.uniform_widths and self.mode != "global":
            raise ConfigError(
                "--uniform-widths rounds a global allocation; add --allocation global."
            )
        if not 0 < self.depth_share < 1:
            raise ConfigError(f"--depth-share must be in (0, 1); got {self.depth_share}.")
        if self.target is not None:
            from secateurs.targets import TARGETS

            TARGETS.get(self.target)

    def layer_range(self, num_layers: int) -> list[int]:
        start, stop = self.layers or (0, num_layers)
        if not 0 <= start < stop <= num_layers:
            raise ConfigError(f"--layers {start}:{stop} is not inside 0:{num_layers}.")
        return list(range(start, stop))


@dataclass(frozen=True)
class FitSpec:
    """Closed-form repair of what remains. Depth: ``heal`` fits a least-squares correction of
    each removed run into the preceding MLP output projection. Width: ``reconstruct`` re-fits
    the kept output-projection columns (None: on), ``compensate`` folds removed units' mean
    output into the bias (FLAP; None: the criterion's default)."""

    heal: bool = False
    heal_samples: int = HEAL_SAMPLES
    heal_bias: bool = False
    heal_target: str = "local"
    heal_damping: float | str = HEAL_DAMPING  # 'auto': chosen on held-out windows
    heal_objective: str = HEAL_OBJECTIVE
    reconstruct: bool | None = None
    reconstruct_damping: float = RECONSTRUCT_DAMPING
    reconstruct_samples: int = RECONSTRUCT_SAMPLES
    compensate: bool | None = None

    def __post_init__(self) -> None:
        if self.heal_target not in HEAL_TARGETS:
            raise ConfigError(
                f"--heal-target must be one of {HEAL_TARGETS}; got {self.heal_target!r}."
            )
        if self.heal_objective not in HEAL_OBJECTIVES:
            raise ConfigError(
                f"--heal-objective must be one of {HEAL_OBJECTIVES}; got {self.heal_objective!r}."
            )
        for name in ("heal_samples", "reconstruct_samples"):
            if not _whole(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} takes a positive whole number.")
        if self.heal_damping != "auto" and not (
            _number(self.heal_damping) and self.heal_damping >= 0
        ):
            raise ConfigError(f"--heal-damping must be ≥ 0 or 'auto'; got {self.heal_damping!r}.")
        if not (_number(self.reconstruct_damping) and self.reconstruct_damping >= 0):
            raise ConfigError(
                f"--reconstruct-damping must be ≥ 0; got {self.reconstruct_damping!r}."
            )

    @property
    def reconstructing(self) -> bool:
        return self.reconstruct is not False


@dataclass(frozen=True)
class DataSpec:
    """Calibration windows and how they are batched; ``data_dir`` (else $SECATEURS_DATA_DIR,
    else the hub) is where named datasets are read."""

    calibration: str = "c4"
    n_samples: int = 10
    calib_seq_len: int = 128
    seed: int = 0
    batch_size: int = 8
    data_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("n_samples", "calib_seq_len", "batch_size"):
            if not _whole(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} takes a positive whole number.")
        if not _whole(self.seed):
            raise ConfigError(f"--seed takes a whole number, not {self.seed!r}.")

    def config(self, n_samples: int | None = None):
        """The ``CalibrationConfig`` of these windows (``n_samples`` windows if given)."""
        from secateurs.data import CalibrationConfig

        count = max(self.n_samples, n_samples or 0)
        return CalibrationConfig(self.calibration, count, self.calib_seq_len, self.seed)


@dataclass(frozen=True)
class ModeSpec:
    """Where the weights live: ``memory`` (loaded whole), ``sequential`` (one layer at a time
    from a local safetensors checkpoint), ``stream`` (an explicit block plan copied tensor by
    tensor, nothing computed), ``auto`` (memory unless the checkpoint would not fit)."""

    mode: str = "auto"
    dtype: str | None = None
    device: str = "cpu"
    max_memory: float | None = None  # GB; auto switches to sequential above it
    offload_dir: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"Unknown mode {self.mode!r}; expected one of {MODES}.")


_GROUPS = {
    "budget": Budget,
    "selection": Selection,
    "allocation": AllocationSpec,
    "fit": FitSpec,
    "data": DataSpec,
    "mode": ModeSpec,
}
# flat option name → (group, field) where they differ
_RENAMED = {
    "allocation": ("allocation", "mode"),
    "mode": ("mode", "mode"),
}
_SWITCHES = ("sequential", "stream", "in_memory")  # flags for mode="sequential" / ... / "memory"
_TOP = ("unit", "criterion", "protect", "options")


@dataclass(frozen=True)
class PruneSpec:
    """One pruning run's choices (see the module docstring)."""

    units: tuple[str, ...] = ("block",)
    criterion: CriterionSpec = field(default_factory=CriterionSpec)
    budget: Budget = field(default_factory=Budget)
    selection: Selection = field(default_factory=Selection)
    allocation: AllocationSpec = field(default_factory=AllocationSpec)
    fit: FitSpec = field(default_factory=FitSpec)
    data: DataSpec = field(default_factory=DataSpec)
    mode: ModeSpec = field(default_factory=ModeSpec)

    def __post_init__(self) -> None:
        check_spec(self)

    # --- building ------------------------------------------------------------------------
    @classmethod
    def from_options(cls, **options: Any) -> PruneSpec:
        """A spec from flat options named as ``secateurs prune``'s flags (unit, criterion,
        ratio, remove, heal, allocation, ...); ``None`` means "not given". Unknown names are
        refused with a suggestion."""
        given = {k.replace("-", "_"): v for k, v in options.items() if v is not None}
        _check_known(given)
        groups: dict[str, dict[str, Any]] = {name: {} for name in _GROUPS}
        for key, value in given.items():
            if key in _TOP or key in _SWITCHES:
                continue
            group, name = _where(key, value)
            groups[group][name] = value
        for switch in _SWITCHES:
            if given.get(switch):
                groups["mode"]["mode"] = "memory" if switch == "in_memory" else switch
        built = {name: kind(**groups[name]) for name, kind in _GROUPS.items()}
        units = parse_units(given.get("unit", "block"))
        default = "activation" if units == ("auto",) else "ppl+"  # auto ranks width units
        criterion = CriterionSpec.parse(
            given.get("criterion", default), given.get("protect"), given.get("options")
        )
        check_applicable(units, set(given), built["selection"])
        return cls(units, criterion, **built)

    def replaced(self, **options: Any) -> PruneSpec:
        """This spec with some flat options changed (validated again)."""
        return PruneSpec.from_options(**{**self.to_options(), **options})

    # --- JSON ----------------------------------------------------------------------------
    def to_options(self) -> dict[str, Any]:
        """The flat options that rebuild this spec (``from_options(**spec.to_options())``):
        the unit and criterion, and every other option whose value is not its default."""
        flat: dict[str, Any] = {
            "unit": unit_word(self.units),
            "criterion": self.criterion.given,
            "protect": self.criterion.protect,
            "options": dict(self.criterion.options) or None,
        }
        for group, kind in _GROUPS.items():
            defaults = asdict(kind()) if group != "budget" else {}
            for key, value in asdict(getattr(self, group)).items():
                if group == "budget" or value != defaults.get(key):
                    flat[_flat_name(group, key)] = value
        return {k: _plain(v) for k, v in flat.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        """What ``secateurs.json`` records under ``spec`` (JSON; round-trips)."""
        return self.to_options()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruneSpec:
        return cls.from_options(**data)

    # --- questions the flow asks ---------------------------------------------------------
    @property
    def depth_kinds(self) -> tuple[str, ...]:
        return tuple(k for k in self.units if k in DEPTH_KINDS)

    @property
    def width_kinds(self) -> tuple[str, ...]:
        return tuple(k for k in self.units if k in WIDTH_KINDS)

    @property
    def combined(self) -> bool:
        return bool(self.depth_kinds) and bool(self.width_kinds)

    @property
    def experts(self) -> bool:
        return self.units == ("experts",)

    @property
    def searches(self) -> bool:
        """The greedy depth search (``--unit subblock``, or ``--iterative`` with ``ppl``): the
        runs that take the search's options."""
        return self.units == ("attn", "mlp") or (
            self.selection.iterative and self.criterion.name == "ppl"
        )

    @property
    def joint(self) -> bool:
        """``--unit auto``: every layer's form chosen together."""
        return self.units == ("auto",)

    @property
    def needs_windows(self) -> bool:
        """Whether the run reads calibration windows (as far as the spec alone shows: an
        explicit plan file may still ask for them)."""
        from secateurs.criteria import CRITERIA

        if self.fit.heal or (self.width_kinds and self.fit.reconstructing):
            return True
        if self.selection.explicit or self.selection.scores is not None:
            return False
        return any(CRITERIA.get(name).needs_calibration for name in self.criterion.names)


def _where(key: str, value: Any) -> tuple[str, str]:
    if key in _RENAMED:
        return _RENAMED[key]
    for group, kind in _GROUPS.items():
        if key in {f.name for f in fields(kind)}:
            return group, key
    raise AssertionError(key)  # _check_known let it through


def _flat_name(group: str, key: str) -> str:
    for flat, where in _RENAMED.items():
        if where == (group, key):
            return flat
    return key


def known_options() -> set[str]:
    names = {f.name for kind in _GROUPS.values() for f in fields(kind)} - {"mode"}
    return names | set(_RENAMED) | set(_TOP) | set(_SWITCHES)


def _check_known(given: Mapping[str, Any]) -> None:
    known = known_options()
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(
            f"Unknown option {unknown[0]!r}{_suggest(unknown[0], known)}; known options: "
            f"{', '.join(sorted(known))}."
        )


def _suggest(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _accepted(criterion: type) -> tuple[str, ...]:
    """The keyword options a criterion's constructor takes."""
    params = inspect.signature(criterion.__init__).parameters.values()
    return tuple(p.name for p in params if p.name != "self" and p.kind != p.VAR_KEYWORD)


def _layer_list(value: Any, name: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            return tuple(int(part) for part in value.split(",") if part.strip())
        except ValueError as err:
            raise ConfigError(
                f"--{name} takes layer indices like '12,13,14', not {value!r}."
            ) from err
    if not all(_whole(i) for i in value):
        raise ConfigError(f"--{name} takes whole layer indices, not {list(value)!r}.")
    return tuple(int(i) for i in value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return ",".join(str(int(i)) for i in value)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # calibration given as a tensor
        return f"tensor{list(value.shape)}"
    return value


def read_scores_file(path: str | os.PathLike) -> dict[str, Any]:
    """A scores file of ``secateurs score`` (checked before any work: exists, JSON, keys)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"--scores {path}: no such file.") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--scores {path} is not a JSON scores file ({err}).") from err
    missing = [
        k for k in ("criterion", "unit", "values") if not isinstance(data, dict) or k not in data
    ]
    if missing:
        raise ConfigError(
            f"--scores {path} lacks {', '.join(missing)}: not written by 'secateurs score'."
        )
    if not isinstance(data["values"], list) or not all(_number(v) for v in data["values"]):
        raise ConfigError(f"--scores {path}: 'values' is not a list of numbers.")
    return data


def scores_file_for(spec: PruneSpec, num_layers: int) -> dict[str, Any]:
    """``spec``'s ``--scores`` file, checked against the spec and a model of ``num_layers``
    layers (``preflight``: from its config alone, before any weight is read)."""
    path, kind = spec.selection.scores, spec.units[0]
    data = read_scores_file(path)
    if (data["criterion"], data["unit"]) != (spec.criterion.name, kind):
        raise ConfigError(
            f"--scores {path} holds {data['criterion']}/{data['unit']} scores, not "
            f"{spec.criterion.name}/{kind}."
        )
    if len(data["values"]) != num_layers:
        raise ConfigError(
            f"--scores {path} covers {len(data['values'])} layers; the model has {num_layers}."
        )
    return data


__all__ = [
    "AllocationSpec",
    "Budget",
    "CriterionSpec",
    "DataSpec",
    "FitSpec",
    "ModeSpec",
    "PruneSpec",
    "Selection",
    "parse_units",
    "read_scores_file",
    "scores_file_for",
]


# --- rules between options ------------------------------------------------------------------
# Options that only mean something for some unit kinds: given elsewhere they are refused.
WIDTH_OPTIONS = frozenset(
    {
        "layers", "min_ratio", "max_ratio", "round_to", "uniform_widths", "sensitivity",
        "target", "reconstruct", "reconstruct_damping", "reconstruct_samples", "compensate",
    }
)  # fmt: skip
HEAL_OPTIONS = frozenset(
    {"heal", "heal_samples", "heal_bias", "heal_target", "heal_damping", "heal_objective"}
)
DEPTH_ONLY = frozenset({"iterative", "scores", "blocks", "attn", "mlp"})


def check_applicable(units: tuple[str, ...], given: set[str], selection: Selection) -> None:
    """Refuse options that do not apply to ``units`` (a silently ignored flag is a bug)."""
    auto = units == ("auto",)
    width = any(k in WIDTH_KINDS for k in units) or selection.plan is not None or auto
    depth = any(k in DEPTH_KINDS for k in units) or selection.plan is not None or auto
    rules = [
        (WIDTH_OPTIONS, width, "width units (--unit heads|channels|width|block,width)"),
        ({"allocation"}, width or units == ("experts",), "width or expert units"),
        ({"min_keep"}, units == ("experts",), "--unit experts"),
        ({"depth_share"}, len(units) > 1 and "block" in units, "--unit block,width"),
        ({"generations", "judge_samples", "latency", "engine"}, auto, "--unit auto"),
        (HEAL_OPTIONS - {"heal"}, "heal" in given, "--heal"),
        (HEAL_OPTIONS, depth, "units with depth (--unit block|attn|mlp|subblock|block,width)"),
        (DEPTH_ONLY, depth and not width and not auto or selection.plan is not None,
         "depth units (--unit block|attn|mlp|subblock)"),
    ]  # fmt: skip
    for names, applies, what in rules:
        used = sorted(names & given)
        if used and not applies:
            flags = ", ".join("--" + n.replace("_", "-") for n in used)
            raise ConfigError(f"{flags} applies to {what} only; --unit is {unit_word(units)}.")


def check_spec(spec: PruneSpec) -> None:
    """Rules between the parts of a spec (no model needed)."""
    _check_criterion_units(spec)
    _check_search_options(spec)
    _check_selection(spec)
    _check_mode(spec)
    if spec.selection.explicit and spec.budget.given:
        raise ConfigError(
            "An explicit selection (--blocks/--attn/--mlp/--plan) takes no --ratio, --remove or "
            "--params: it says what goes."
        )
    if not spec.selection.explicit and not spec.budget.given:
        raise ConfigError(
            "Say what to remove: --ratio R (of the decoder's parameters), --remove N, "
            "--params P, --latency F (--unit auto), or an explicit --blocks/--attn/--mlp/--plan."
        )


def _check_search_options(spec: PruneSpec) -> None:
    """The greedy depth search's options (``--option objective=kl``) without a search would be
    silently ignored: refused, unless the criterion takes them itself."""
    from secateurs.criteria import CRITERIA

    own = set(CRITERIA.fact(spec.criterion.name, "accepts"))
    stray = sorted((set(spec.criterion.options) & SEARCH_OPTIONS) - own)
    if stray and not spec.searches:
        raise ConfigError(
            f"--option {', '.join(stray)}: options of the greedy depth search (--iterative "
            f"with ppl, or --unit subblock), which this run does not do."
        )


def _check_criterion_units(spec: PruneSpec) -> None:
    from secateurs.criteria import CRITERIA

    if spec.selection.explicit:
        return
    names = spec.criterion.names
    if len(names) == 2 and not spec.combined:
        raise ConfigError(
            "--criterion BLOCK,WIDTH names two criteria: use it with --unit block,width."
        )
    for kind in WIDTH_KINDS if spec.joint else spec.units:  # auto ranks groups and channels
        name = spec.criterion.width_name if kind in WIDTH_KINDS else spec.criterion.name
        if kind not in CRITERIA.fact(name, "units"):  # declared: no import
            able = sorted(n for n in CRITERIA.names() if kind in CRITERIA.fact(n, "units"))
            raise ConfigError(
                f"Criterion {name!r} cannot score {kind} units; criteria that can: "
                f"{', '.join(able)}."
            )


def _check_selection(spec: PruneSpec) -> None:
    sel = spec.selection
    single_depth = len(spec.units) == 1 and spec.units[0] in DEPTH_KINDS
    if sel.iterative and not single_depth:
        raise ConfigError("--iterative re-scores depth units (--unit block|attn|mlp) only.")
    if sel.scores is not None and (not single_depth or sel.iterative):
        raise ConfigError("--scores reuses one-shot depth scores (--unit block|attn|mlp).")
    if spec.units == ("attn", "mlp") and spec.criterion.name != "ppl":
        raise ConfigError(
            f"--unit subblock is a greedy search by calibration PPL; criterion "
            f"{spec.criterion.name!r} cannot drive it (use ppl or ppl+)."
        )
    if spec.experts and spec.budget.remove is not None and spec.allocation.mode != "uniform":
        raise ConfigError("--remove N counts experts per layer: use --allocation uniform.")
    if spec.joint and spec.budget.remove is not None:
        raise ConfigError(
            "--unit auto takes a parameter budget (--ratio or --params) or a latency budget "
            "(--latency)."
        )
    if spec.fit.heal and spec.experts:
        raise ConfigError("--heal corrects removed blocks and branches, not experts.")


def _check_mode(spec: PruneSpec) -> None:
    from secateurs.criteria import CRITERIA

    mode = spec.mode.mode
    if mode == "stream":
        if not spec.selection.explicit or spec.fit.heal:
            raise ConfigError(
                "--stream copies an explicit block plan without computing anything: give "
                "--blocks or --plan, and no --heal (use --sequential to score or heal)."
            )
        return
    if mode == "sequential" and spec.joint:
        raise ConfigError(
            "--unit auto assembles candidates in the model itself: it needs the model in "
            "memory (drop --sequential)."
        )
    if mode != "sequential" or spec.selection.explicit:
        return
    for name in set(spec.criterion.names):
        if CRITERIA.get(name).uses_backward:
            raise ConfigError(
                f"Criterion {name!r} needs a backward pass through the whole model in memory; "
                "--sequential scores one layer at a time (layer-wise criteria: "
                f"{', '.join(layerwise_criteria())})."
            )
    if spec.selection.scores is not None:
        raise ConfigError("--sequential scores the checkpoint itself; drop --scores.")


def layerwise_criteria() -> list[str]:
    """Criteria that can be computed one layer at a time (no whole-model backward pass)."""
    from secateurs.criteria import CRITERIA

    return sorted(n for n, c in CRITERIA.items() if not c.uses_backward)
