"""Importing checkpoints from the paper's code: same predictions, and no pickled code runs."""

from __future__ import annotations

import os

import pytest
import torch

from lesa_core import BundleError, CacheSchedule, PredictorConfig, StagePredictor
from lesa_core.cli import main


class ReferenceArgs:  # stands for the reference code's pickled config object
    def __init__(self) -> None:
        self.lr = 1e-4
        self.interval = 7


class Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _reference_file(tmp_path, branches, extra=None):
    schedule = CacheSchedule(10, 3, 2)
    torch.manual_seed(0)
    ours = StagePredictor(PredictorConfig(schedule=schedule.to_dict(), kan_hidden=(12, 12), branches=branches))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    model = {}
    for key, value in ours.state_dict().items():
        kind, branch, rest = key.split(".", 2)
        model[f"{kind}.{rest}" if branch == "shared" else f"{kind}_{branch}.{rest}"] = value
    payload = {"model": model, "args": ReferenceArgs(), "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}}
    payload.update(extra or {})
    path = tmp_path / "reference.pth"
    torch.save(payload, path)
    return path, ours, schedule


@pytest.mark.parametrize("branches", [("shared",), ("cond", "uncond")])
def test_import_gives_identical_predictions(tmp_path, branches):
    path, ours, schedule = _reference_file(tmp_path, branches)
    code = main(
        ["import-reference", str(path), str(tmp_path / "bundle"), "--num-steps", "10"]
        + ["--interval", "3", "--first-enhance", "2"]
    )
    assert code == 0
    imported = StagePredictor.from_pretrained(tmp_path / "bundle")
    assert imported.config.branches == branches
    times = torch.linspace(1, 0, 11)
    history = [torch.randn(2, 6) for _ in range(8)]
    for t in (0.95, 0.6, 0.2):
        for branch in branches:
            torch.testing.assert_close(
                imported.predict(history, times, t, branch), ours.predict(history, times, t, branch)
            )


def test_import_never_runs_pickled_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path, _, _ = _reference_file(tmp_path, ("shared",), extra={"evil": Exploit(str(marker))})
    args = ["import-reference", str(path), str(tmp_path / "b"), "--num-steps", "10", "--interval", "3"]
    # torch's weights-only unpickler refuses the blocked global outright: a clean error, nothing runs
    assert main([*args, "--first-enhance", "2"]) == 2
    assert "posix.system" in capsys.readouterr().err
    assert not marker.exists()


def test_import_errors_name_the_problem(tmp_path, capsys):
    path, _, _ = _reference_file(tmp_path, ("shared",))
    assert (
        main(
            [
                "import-reference",
                str(path),
                str(tmp_path / "b"),
                "--num-steps",
                "50",
                "--interval",
                "7",
                "--first-enhance",
                "3",
            ]
        )
        == 2
    )
    assert "--num-steps is 50" in capsys.readouterr().err
    broken = tmp_path / "broken.pth"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(BundleError, match="not a readable torch checkpoint"):
        from lesa_core.reference_import import load_reference_checkpoint

        load_reference_checkpoint(broken)
    # incomplete checkpoints: each named, never a bare IndexError / KeyError / UnboundLocalError
    from lesa_core.reference_import import import_reference, load_reference_checkpoint

    complete = load_reference_checkpoint(path)  # the safe loader: no pickled code runs
    for label, model in (
        ("empty", {}),
        ("no KAN", {k: v for k, v in complete.items() if not k.startswith("timestep")}),
        ("no grid", {k: v for k, v in complete.items() if not k.endswith(".grid")}),
        ("a stray key", {**complete, "optimizer.step": torch.zeros(1)}),
    ):
        partial = tmp_path / f"{label}.pth"
        torch.save({"model": model}, partial)
        with pytest.raises(BundleError, match=f"{partial}: "):
            import_reference(partial, tmp_path / "out", CacheSchedule(10, 3, 2))


def test_import_names_a_directory_given_as_checkpoint(tmp_path, capsys):
    folder = tmp_path / "run"  # e.g. the reference code's output folder instead of the .pth in it
    folder.mkdir()
    args = [str(folder), str(tmp_path / "b"), "--num-steps", "10", "--interval", "3", "--first-enhance", "2"]
    assert main(["import-reference", *args]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"lesa import-reference: error: checkpoint {folder}: is a directory, "
                                        "expected the torch file saved by the reference code"]  # fmt: skip
    assert not (tmp_path / "b").exists()


def test_import_never_overwrites_a_bundle_or_a_file(tmp_path, capsys):
    """A second import to the same folder would silently replace a bundle (and its quality card)."""
    path, _, _ = _reference_file(tmp_path, ("shared",))
    flags = ["--num-steps", "10", "--interval", "3", "--first-enhance", "2"]
    assert main(["import-reference", str(path), str(tmp_path / "bundle"), *flags]) == 0
    written = (tmp_path / "bundle" / "config.json").read_bytes()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for out, what in ((tmp_path / "bundle", "a bundle (config.json)"), (a_file, "a file")):
        capsys.readouterr()
        assert main(["import-reference", str(path), str(out), *flags]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"lesa import-reference: error: out_dir {out}: already holds {what}; choose a new directory or remove it first"
        ]
    assert (tmp_path / "bundle" / "config.json").read_bytes() == written and a_file.read_text() == "keep me"


def test_import_takes_the_papers_stage_thresholds_for_the_family_or_the_ones_given(tmp_path, capsys):
    """A reference checkpoint holds no thresholds: HunyuanVideo's variant splits its experts at
    t = 0.9 and 0.4, the others at 0.9 and 0.5; steps in (0.4, 0.5] took the wrong expert."""
    path, _, _ = _reference_file(tmp_path, ("shared",))
    flags = ["--num-steps", "10", "--interval", "3", "--first-enhance", "2"]
    for name, extra, expected in (("flux", ["--family", "FluxTransformer2DModel"], (0.9, 0.5)),
                                  ("hunyuan", ["--family", "HunyuanVideoTransformer3DModel"], (0.9, 0.4)),
                                  ("given", ["--stage-thresholds", "0.8,0.3"], (0.8, 0.3))):  # fmt: skip
        assert main(["import-reference", str(path), str(tmp_path / name), *flags, *extra]) == 0
        predictor = StagePredictor.from_pretrained(tmp_path / name)
        assert tuple(predictor.config.stage_thresholds) == expected, name
        assert predictor.stage(0.45) == (1 if expected[1] < 0.45 else 2), name
    capsys.readouterr()
    # the range is the library's check (StagePredictor's), reported naming the flag, before anything is written
    for bad in ("0.3,0.8", "1.5,0.5", "0.9,-0.1", "nan,0.5"):
        assert main(["import-reference", str(path), str(tmp_path / "bad"), *flags, "--stage-thresholds", bad]) == 2
        high, low = (float(part) for part in bad.split(","))
        assert capsys.readouterr().err.strip().splitlines() == [
            "lesa import-reference: error: --stage-thresholds must be (high, low) with "
            f"1 >= high >= low >= 0, got {[high, low]}"
        ]
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):  # not two numbers: argparse's own message
        main(["import-reference", str(path), str(tmp_path / "bad"), *flags, "--stage-thresholds", "0.9"])
    assert "argument --stage-thresholds: expected HIGH,LOW" in capsys.readouterr().err
