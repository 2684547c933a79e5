"""runtime.py: device and dtype choice, and the rank helpers."""
import pytest

import runtime
from runtime import Dist


@pytest.mark.parametrize("rank, world_size, expected", [
    (0, 1, ["prepare"]),
    (0, 2, ["prepare", "barrier"]),
    (1, 2, ["barrier", "prepare"]),  # after the barrier: rank 0 has prepared it by then
])
def test_rank0_first_runs_rank_0_before_the_others(monkeypatch, rank, world_size, expected):
    calls = []
    monkeypatch.setattr(runtime.dist, "barrier", lambda: calls.append("barrier"))
    d = Dist(rank=rank, world_size=world_size)
    assert d.rank0_first(lambda: calls.append("prepare") or "path") == "path"
    assert calls == expected
