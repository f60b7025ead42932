"""SVDConfig: which layers to decompose and how."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

DECOMPOSITIONS = ("channel", "spatial")
INITS = ("svd", "random")


@dataclass(frozen=True)
class SVDConfig:
    """How `decompose_` turns layers into SVD form.

    Args:
        decomposition: "channel" (a conv's n × (c·kh·kw) matrix; works for every
            layer) or "spatial" (a 2-D conv's (n·kw) × (c·kh) matrix; Linear,
            Conv1d and Conv3d layers fall back to "channel").
        init: "svd" = exact SVD of the current weights (the decomposed model
            computes the same function); "random" = a fresh random layer in SVD
            form (training from scratch).
        target_modules: patterns of the layers to decompose; None = every
            supported layer. A pattern matches a fully-qualified module name when
            it equals the name, is a dotted suffix of it ("conv1" matches
            "layer1.0.conv1"), or matches it as a whole regular expression.
        exclude_modules: patterns (same rules) of layers to leave dense.

    Example:
        >>> SVDConfig(decomposition="spatial", exclude_modules=("fc",))
    """

    decomposition: str = "channel"
    init: str = "svd"
    target_modules: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] = ()

    def __post_init__(self):
        if self.decomposition not in DECOMPOSITIONS:
            raise ValueError(f"SVDConfig.decomposition={self.decomposition!r}; allowed: {', '.join(DECOMPOSITIONS)}")
        if self.init not in INITS:
            raise ValueError(f"SVDConfig.init={self.init!r}; allowed: {', '.join(INITS)}")
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", _patterns("target_modules", self.target_modules))
        object.__setattr__(self, "exclude_modules", _patterns("exclude_modules", self.exclude_modules))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _patterns(field: str, value) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise TypeError(f"SVDConfig.{field} must be a string or a list of strings, got {type(value).__name__}") from None
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise TypeError(f"SVDConfig.{field} must hold non-empty strings, got {p!r}")
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"SVDConfig.{field}: {p!r} is neither a module name nor a valid regular expression ({e})") from None
    return patterns


def name_matches(fqn: str, patterns: tuple[str, ...]) -> bool:
    """True when a pattern equals `fqn`, is a dotted suffix of it, or fully matches it as a regex."""
    return any(fqn == p or fqn.endswith("." + p) or re.fullmatch(p, fqn) for p in patterns)
