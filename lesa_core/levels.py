"""Named acceleration levels: what a user asks for (`"5x"`) and the schedule that serves it.

Levels are defined at 50 steps, where the predictor bundles are trained; at another step count
the same rule is applied and the realised full-step count is what it is (training-free methods
only: a LESA bundle is tied to the exact schedule it was trained for).
"""

from __future__ import annotations

from dataclasses import dataclass

from lesa_core.schedule import CacheSchedule


@dataclass(frozen=True)
class Level:
    name: str
    interval: int
    first_enhance: int
    force_step3: bool = True

    def schedule(self, num_steps: int = 50) -> CacheSchedule:
        if self.name == "none":
            return CacheSchedule.every_step(num_steps)
        return CacheSchedule(num_steps, self.interval, self.first_enhance, self.force_step3)


LEVELS: dict[str, Level] = {
    level.name: level
    for level in (
        Level("none", interval=1, first_enhance=1),
        Level("2x", interval=2, first_enhance=1, force_step3=False),  # 25 of 50 full: even steps
        Level("3.3x", interval=4, first_enhance=3),  # 15 of 50 full
        Level("5x", interval=7, first_enhance=3),  # 10 of 50: the paper's FLUX.1 setting
        Level("6.25x", interval=10, first_enhance=3),  # 8 of 50
    )
}


def level_schedule(name: str, num_steps: int = 50) -> CacheSchedule:
    """The schedule for a named level, or a ValueError naming the known levels."""
    if name not in LEVELS:
        raise ValueError(f"unknown acceleration level {name!r}; known levels: {', '.join(LEVELS)}")
    return LEVELS[name].schedule(num_steps)
