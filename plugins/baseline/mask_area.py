"""Drop pairs whose foreground covers too little or too much of the image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from medsynth_core import ConfigError, Filter, Sample, Verdict, foreground_fraction, option


@dataclass(frozen=True)
class MaskAreaConfig:
    """Options of the mask-area filter."""

    min_fraction: float = option(0.01, "Smallest foreground fraction kept.")
    max_fraction: float = option(0.9, "Largest foreground fraction kept.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_fraction <= self.max_fraction <= 1.0:
            raise ConfigError(f"need 0 <= min_fraction <= max_fraction <= 1, got "
                              f"{self.min_fraction} and {self.max_fraction}")


class MaskAreaFilter(Filter):
    """Keep pairs whose foreground fraction lies in [min_fraction, max_fraction]; the score is the fraction."""

    Config = MaskAreaConfig

    def judge(self, samples: Sequence[Sample]) -> list[Verdict]:
        verdicts = []
        for s in samples:
            fraction = foreground_fraction(s.mask) if s.mask is not None else 0.0
            verdicts.append(Verdict(keep=self.config.min_fraction <= fraction <= self.config.max_fraction,
                                    score=fraction))
        return verdicts
