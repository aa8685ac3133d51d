"""The guidance sweep's search space, checked before anything heavy loads (no torch, no
Ray until a sweep runs), so a bad option answers at once."""

from __future__ import annotations

import dataclasses

from orchestration.config import ConfigError


def parse_scales(text: str | None, *, option: str) -> list[float]:
    if text is None or not text.strip():
        return []
    try:
        scales = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected comma-separated numbers, "
                          "e.g. 1,1.5,2,2.5,3") from None
    if not scales or any(s < 0 for s in scales):
        raise ConfigError(f"{option} {text!r}: scales must be >= 0 (1 = no guidance)")
    return sorted(set(scales))


@dataclasses.dataclass
class SearchSpace:
    """Grid over the given scales, or Optuna (TPE) over their [min, max] ranges."""

    search: str
    decoder_scales: list[float]
    prior_scales: list[float] | None
    goal: object
    num_trials: int

    def describe(self, priors: list[float]) -> str:
        if self.search == "grid":
            return f"{len(self.decoder_scales) * len(priors)} scale pairs (grid)"
        return (f"{self.num_trials} Optuna trials over decoder "
                f"[{min(self.decoder_scales):g}, {max(self.decoder_scales):g}]")

    def param_space(self, priors: list[float]) -> dict:
        from ray import tune

        if self.search == "grid":
            return {"decoder_guidance": tune.grid_search(self.decoder_scales),
                    "prior_guidance": tune.grid_search(priors)}
        prior = (tune.uniform(min(priors), max(priors)) if self.prior_scales
                 and len(priors) > 1 else priors[0])
        return {"decoder_guidance": tune.uniform(min(self.decoder_scales),
                                                 max(self.decoder_scales)),
                "prior_guidance": prior}

    def tune_config(self):
        """Tune's config for a search algorithm; None for the grid (Tune's default)."""
        if self.search == "grid":
            return None
        from ray import tune
        from ray.tune.search.optuna import OptunaSearch

        return tune.TuneConfig(search_alg=OptunaSearch(metric=self.goal.metric,
                                                       mode=self.goal.mode, seed=0),
                               num_samples=self.num_trials, max_concurrent_trials=2)


def search_space(search: str, decoder_scales: list[float], prior_scales: list[float] | None,
                 goal, num_trials: int) -> SearchSpace:
    """Checked before any work: Optuna needs a range and the optional `optuna` package."""
    if search == "optuna":
        if len(decoder_scales) < 2:
            raise ConfigError("--search optuna: give the decoder range as two scales, "
                              "e.g. --decoder-scales 1,3")
        if num_trials < 2:
            raise ConfigError(f"--trials {num_trials}: Optuna needs at least 2 trials")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("--search optuna needs the optuna package: pip install "
                              "'unclip-ray[optuna]' (or use --search grid)") from None
    return SearchSpace(search, decoder_scales, prior_scales, goal, num_trials)
