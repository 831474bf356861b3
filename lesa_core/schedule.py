"""Which denoising steps run every transformer block (full) and which are forecast (predicted).

The rule is that of the LESA paper's reference code (CVPR 2026), bit for bit: a counter
`c` starts at 0; step `s` is full if `s < first_enhance` or `c == interval - 1` (then `c = 0`),
otherwise predicted (`c += 1`). The reference code also forces step 3 to be full without
resetting the counter; `force_step3` keeps that (on by default, for parity with its checkpoints).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CacheSchedule:
    """A full/predicted plan for one generation of `num_steps` denoising steps.

    Build it from the reference rule, `CacheSchedule(50, interval=7, first_enhance=3)`, or from
    an explicit list, `CacheSchedule.from_full_steps(50, [0, 1, 2, 3, 12, 22, 32, 42])`.
    """

    num_steps: int
    interval: int | None = None
    first_enhance: int | None = None
    force_step3: bool = True
    explicit_full_steps: tuple[int, ...] | None = None
    full_steps: tuple[int, ...] = field(init=False)
    _full_set: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("num_steps", "interval", "first_enhance"):
            value = getattr(self, name)  # 2.5 or True would build a schedule nobody asked for, silently
            if value is not None and (isinstance(value, bool) or not hasattr(type(value), "__index__")):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.explicit_full_steps is not None:
            steps = tuple(sorted(set(self.explicit_full_steps)))
            if steps and steps[0] < 0:
                raise ValueError(f"full step {steps[0]} is outside 0..{self.num_steps - 1}")
            if not steps or steps[0] != 0:
                raise ValueError("full_steps must include step 0: the first step has no history to forecast from")
            if steps[-1] >= self.num_steps:
                raise ValueError(f"full step {steps[-1]} is outside 0..{self.num_steps - 1}")
        else:
            if self.interval is None or self.first_enhance is None:
                raise ValueError("give interval and first_enhance, or use CacheSchedule.from_full_steps")
            if self.interval < 1:
                raise ValueError(f"interval must be >= 1, got {self.interval}")
            if self.first_enhance < 1:
                raise ValueError(f"first_enhance must be >= 1 (step 0 is always full), got {self.first_enhance}")
            steps = tuple(_reference_full_steps(self.num_steps, self.interval, self.first_enhance, self.force_step3))
        object.__setattr__(self, "full_steps", steps)
        object.__setattr__(self, "_full_set", frozenset(steps))

    @classmethod
    def from_full_steps(cls, num_steps: int, steps: Iterable[int]) -> CacheSchedule:
        return cls(num_steps=num_steps, explicit_full_steps=tuple(int(s) for s in steps))

    @classmethod
    def every_step(cls, num_steps: int) -> CacheSchedule:
        """No acceleration: every step runs in full."""
        return cls.from_full_steps(num_steps, range(num_steps))

    def is_full(self, step: int) -> bool:
        return step in self._full_set

    @property
    def num_full(self) -> int:
        return len(self.full_steps)

    @property
    def num_predicted(self) -> int:
        return self.num_steps - self.num_full

    @property
    def speedup(self) -> float:
        """Theoretical speed-up: total steps over full steps (a predicted step is nearly free)."""
        return self.num_steps / self.num_full

    def to_dict(self) -> dict:
        if self.explicit_full_steps is not None:
            return {"num_steps": self.num_steps, "full_steps": list(self.full_steps)}
        return {
            "num_steps": self.num_steps,
            "interval": self.interval,
            "first_enhance": self.first_enhance,
            "force_step3": self.force_step3,
            "full_steps": list(self.full_steps),
        }

    @classmethod
    def from_dict(cls, data: dict) -> CacheSchedule:
        if data.get("interval") is not None:
            schedule = cls(
                num_steps=int(data["num_steps"]),
                interval=int(data["interval"]),
                first_enhance=int(data["first_enhance"]),
                force_step3=bool(data.get("force_step3", True)),
            )
        else:
            schedule = cls.from_full_steps(int(data["num_steps"]), data["full_steps"])
        if "full_steps" in data and list(schedule.full_steps) != list(data["full_steps"]):
            raise ValueError("schedule's full_steps disagree with its interval/first_enhance rule")
        return schedule

    def describe(self) -> str:
        return f"{self.num_full} of {self.num_steps} steps full ({self.speedup:.2f}x)"


def _reference_full_steps(num_steps: int, interval: int, first_enhance: int, force_step3: bool) -> list[int]:
    full: list[int] = []
    counter = 0
    for step in range(num_steps):
        if step < first_enhance:
            full.append(step)
        elif counter == interval - 1:
            full.append(step)
            counter = 0
        else:
            counter += 1
            if force_step3 and step == 3:
                full.append(step)  # the reference forces step 3 without resetting the counter
    return full
