"""A run that diverges because of an artifact it loaded: the CLI's advice names the artifact (found by probing:
it advised only a lower guidance scale, more steps or another sampler)."""

from __future__ import annotations

import json
from pathlib import Path

import fewstep
from fewstep.cli import main

SHIPPED = Path(fewstep.__file__).parent / "assets" / "s3" / "digits-eps-nfe4.json"


def test_a_diverged_run_names_the_artifact_it_loaded(tmp_path, capsys):
    schedule = json.loads(SHIPPED.read_text())
    schedule["decisions"][1]["relaxation"] = 1e30  # finite, so it loads; the run then overflows
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps(schedule))
    out = tmp_path / "x.png"
    code = main(["generate", "--sampler", "s3", "--sampler-option", f"s3_schedule={damaged}", "--steps", "4",
                 "--quiet", "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert "NaN/Inf at step" in err and f"check the artifact it loaded, --sampler-option s3_schedule={damaged}" in err
    # shipped artifacts given by name are not blamed
    assert main(["generate", "--sampler", "s3", "--guidance-scale", "1e30", "--steps", "4", "--quiet", "--out",
                 str(out)]) == 1  # fmt: skip
    assert "check the artifact" not in capsys.readouterr().err
