"""The search's per-sample seeds never reach the held-out evaluation's, and the sampler classes state their process."""

from __future__ import annotations

import pytest

from fewstep import samplers
from fewstep.cli import main
from fewstep.search.objectives import HELD_OUT_SEED, SEARCH_CLASSES


def _usage_line(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_search_refuses_per_class_counts_that_reach_held_out_seeds(capsys, tmp_path):
    most = HELD_OUT_SEED // len(SEARCH_CLASSES)
    assert (most + 1) * len(SEARCH_CLASSES) > HELD_OUT_SEED >= most * len(SEARCH_CLASSES)
    out = tmp_path / "s.json"
    line = _usage_line(capsys, "search", "--nfe", "4", "--num-per-class", str(most + 1), "--quiet", "--out", str(out))
    assert f"--num-per-class {most + 1} is too many" in line and f"use at most {most}" in line
    assert str(HELD_OUT_SEED) in line and not out.exists()


@pytest.mark.parametrize("name", samplers.names())
def test_process_of_is_the_class_process(name):
    cls = samplers.get(name)
    assert samplers.process_of(name) == cls.process
    expected = ("mean-reverting" if name == "mrs" else "flow" if name in ("flow-euler", "flowchef") else "diffusion")
    assert cls.process == expected
