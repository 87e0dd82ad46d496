"""LoSA's cubic sparsity schedule: s_t = S − S·(1 − t/T)³ for rounds t = 1..T.

Large steps first (the dense model tolerates them), small steps near the target, where each extra
percent hurts most; s_T = S exactly.
"""

from __future__ import annotations

from salr.prune.masks import count


def check_rounds(rounds: int) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds: T must be an integer >= 1, got {rounds!r}")


def cubic_sparsity(t: int, rounds: int, target: float) -> float:
    """s_t for round t ∈ [0, T] (s_0 = 0, s_T = target)."""
    check_rounds(rounds)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= target < 1.0:
        raise ValueError(f"target: the sparsity must be a number in [0, 1), got {target!r}")
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= rounds:
        raise ValueError(f"t: the round must be an integer in [0, {rounds}], got {t!r}")
    if t == rounds:
        return float(target)
    return float(target - target * (1.0 - t / rounds) ** 3)


def sparsity_schedule(target: float, rounds: int = 5) -> list[float]:
    """[s_1, ..., s_T]: the mean sparsity after each round."""
    check_rounds(rounds)
    return [cubic_sparsity(t, rounds, target) for t in range(1, rounds + 1)]


def split_steps(total_steps: int, rounds: int, final_share: float | None = None) -> list[int]:
    """Fine-tuning steps per round, every round at least one step.

    final_share None: total_steps split as evenly as possible (earlier rounds get the remainder).
    final_share f in (0, 1): the last round gets round(f·total_steps) steps (the recovery fine-tune at
    the target sparsity; LoSA's reference code gives it 60 % of the data), the other rounds split the
    rest evenly. With T = 1 the one round gets everything.
    """
    check_rounds(rounds)
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < rounds:
        raise ValueError(f"total_steps: need an integer >= rounds ({rounds}) so every round trains, "
                         f"got {total_steps!r}")
    if final_share is None or rounds == 1:
        base, extra = divmod(total_steps, rounds)
        return [base + (1 if t < extra else 0) for t in range(rounds)]
    check_final_share(final_share)
    last = count(final_share, total_steps)  # round half up, as a sparsity ratio counts weights
    if last < 1 or total_steps - last < rounds - 1:
        raise ValueError(f"final_share: {final_share} of {total_steps} steps gives the last round {last} and "
                         f"leaves {total_steps - last} for the other {rounds - 1} rounds; every round needs >= 1")
    return split_steps(total_steps - last, rounds - 1) + [last]


def check_final_share(final_share: float | None) -> None:
    if final_share is None:
        return
    if (isinstance(final_share, bool) or not isinstance(final_share, (int, float))
            or not 0.0 < final_share < 1.0):
        raise ValueError(f"final_share: the last round's fraction of the steps must be None or in (0, 1), "
                         f"got {final_share!r}")
