"""Stored bench rows follow the shipped sampler artifacts they were made with (EMS, searched schedules)."""

from __future__ import annotations

import json
import shutil

from safetensors import safe_open
from safetensors.torch import save_file
from test_bench_resume_fixes import _FakeDigits

from fewstep.bench import runner
from fewstep.bench.runner import BenchConfig, run_grid
from fewstep.samplers import dpm_solver_v3, s3


def _config(samplers):
    return BenchConfig(models=["digits-eps"], samplers=samplers, steps=[4], classes=[0, 1], num_per_class=1,
                       reference_steps=4, guidance=[("cfg", 3.0)])


def test_rows_are_recomputed_when_shipped_artifacts_change(tmp_path, monkeypatch, capsys):
    """Found in review: the shipped DPM-Solver-v3 EMS and S3 schedules were not part of what a stored row depends
    on, so a new search or an upgrade that replaced them kept reporting the old schedules' rows."""
    schedules = tmp_path / "s3"
    shutil.copytree(s3._ASSETS, schedules)
    ems = tmp_path / "ems.safetensors"
    shutil.copyfile(dpm_solver_v3.SHIPPED_EMS["digits-eps"], ems)
    monkeypatch.setattr(s3, "_ASSETS", schedules)
    monkeypatch.setitem(dpm_solver_v3.SHIPPED_EMS, "digits-eps", ems)
    monkeypatch.setattr(runner, "_DigitsWorld", _FakeDigits)
    out = tmp_path / "out"
    _FakeDigits.runs = []
    rows = run_grid(_config(["ddim", "s3", "dpm-solver-v3"]), out, progress=False)
    assert len(_FakeDigits.runs) == 3
    by_sampler = {r["sampler"]: r for r in rows}
    assert "artifacts" not in by_sampler["ddim"]
    assert by_sampler["s3"]["artifacts"] != by_sampler["dpm-solver-v3"]["artifacts"]  # schedule + EMS vs EMS alone
    stored = json.loads((out / "results.json").read_text())["cells"]
    assert {row.get("artifacts") for row in stored.values()} == {None, by_sampler["s3"]["artifacts"],
                                                                 by_sampler["dpm-solver-v3"]["artifacts"]}

    _FakeDigits.runs = []
    run_grid(_config(["ddim", "s3", "dpm-solver-v3"]), out, progress=False)
    assert _FakeDigits.runs == []  # unchanged artifacts: every row reused

    schedule = schedules / "digits-eps-nfe4.json"
    schedule.write_text(schedule.read_text() + "\n")  # a re-searched schedule (another size: no stale memo)
    run_grid(_config(["ddim", "s3", "dpm-solver-v3"]), out, progress=True)
    assert _FakeDigits.runs == ["digits-eps|s3|4|cfg:3.0"]
    assert "recomputing 1 stored row(s) made with other shipped sampler artifacts" in capsys.readouterr().out

    _FakeDigits.runs = []
    with safe_open(ems, "pt") as f:  # new statistics (here: other metadata): both samplers that read them
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, ems, metadata={**metadata, "note": "recalibrated"})
    run_grid(_config(["ddim", "s3", "dpm-solver-v3"]), out, progress=False)
    assert sorted(_FakeDigits.runs) == ["digits-eps|dpm-solver-v3|4|cfg:3.0", "digits-eps|s3|4|cfg:3.0"]


def test_rows_from_before_the_artifact_digests_are_recomputed_once(tmp_path, monkeypatch):
    """A row of an artifact-reading sampler stored without a digest was made with unknown artifacts: recomputed
    once, then reused; rows of samplers that read none are kept."""
    monkeypatch.setattr(runner, "_DigitsWorld", _FakeDigits)
    out = tmp_path / "out"
    run_grid(_config(["ddim", "s3"]), out, progress=False)
    payload = json.loads((out / "results.json").read_text())
    for row in payload["cells"].values():
        row.pop("artifacts", None)
    (out / "results.json").write_text(json.dumps(payload))
    _FakeDigits.runs = []
    run_grid(_config(["ddim", "s3"]), out, progress=False)
    assert _FakeDigits.runs == ["digits-eps|s3|4|cfg:3.0"]
    _FakeDigits.runs = []
    run_grid(_config(["ddim", "s3"]), out, progress=False)
    assert _FakeDigits.runs == []
