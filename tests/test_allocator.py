"""lesa_core/allocator.py: with freed memory retained, a generation stops faulting its pages back in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lesa_core.allocator import freed_memory_retained, retain_freed_memory

# As a server or a benchmark runs them: generations at full compute and at 6.25x in turn (in the
# accelerated ones full steps follow predicted ones). The page faults of the last round, measured
# in a fresh process (the tuning cannot be undone).
FAULTS_OF_A_ROUND = """
import json, resource, sys, torch
from lesa_core.allocator import retain_freed_memory
retained = retain_freed_memory() if sys.argv[1] == "retain" else False
from lesa_models import load_pipeline
from lesa_models.cli import resolve_acceleration
torch.set_num_threads(1)
pipe = load_pipeline("digits-image")
cache = resolve_acceleration(pipe, "6.25x", 50, method="lesa")
width, height = pipe.sizes[0]
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for level in (None, cache):
        pipe(["a handwritten seven"] * 8, seeds=list(range(8)), height=height, width=width, cache=level)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"retained": retained, "faults": faults}))
"""


def _faults(*modes: str) -> list[dict]:
    """The last round's faults in one fresh process per mode (run side by side)."""
    runs = [
        subprocess.Popen([sys.executable, "-c", FAULTS_OF_A_ROUND, mode], stdout=subprocess.PIPE, text=True)
        for mode in modes
    ]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tunes glibc's malloc, on Linux only")
def test_generations_reuse_freed_memory_instead_of_faulting_it_back_in():
    default, retained = _faults("default", "retain")
    assert retained["retained"] and not default["retained"]
    # measured on a 2-core Intel Xeon: ~210,000-230,000 faults a round by default, ~500-2,300 retained
    assert retained["faults"] * 10 < default["faults"], (default, retained)


def test_retaining_is_idempotent_and_reported():
    first = retain_freed_memory()
    assert retain_freed_memory() is first and freed_memory_retained() is first
    assert first == (sys.platform.startswith("linux") and __import__("platform").libc_ver()[0] == "glibc")
