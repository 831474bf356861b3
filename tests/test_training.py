"""Recording trajectories and the two-phase training, as smoke tests on tiny data (the real
bundles are trained once, offline, and committed; CI never retrains them)."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from lesa_core import CacheSchedule, PredictorConfig, StagePredictor
from lesa_core.cli import main
from lesa_core.training import TrainSettings, forecast_loss, sample_loss, train_predictor
from lesa_core.trajectories import RecordSettings, TrajectoryError, load_trajectories, record

STEPS = 6


@pytest.fixture(scope="module")
def pipe():
    from lesa_models import load_pipeline

    return load_pipeline("digits-image")


@pytest.fixture(scope="module")
def recorded(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("traj")
    width, height = pipe.info.sizes[0]
    settings = RecordSettings("digits-image", STEPS, 4.0, height, width)
    record(
        pipe,
        ["digit 3", "a handwritten seven", "the number 1", "digit 0", "a five"],
        [0, 1, 2, 3, 4],
        out,
        settings,
        shard_size=2,
        progress=False,
    )
    return out, settings


def test_record_stores_what_reruns_the_sample(pipe, recorded):
    out, settings = recorded
    data = load_trajectories(out)
    assert data.seeds == [0, 1, 2, 3, 4] and set(data.hidden) == {"cond", "uncond"}
    n, steps, tokens, channels = data.hidden["cond"].shape
    assert (n, steps, channels) == (5, STEPS, pipe.info.hidden_size)
    assert data.times.shape == (STEPS + 1,) and float(data.times[0]) == 1.0
    again = pipe(
        data.prompts[:1],
        seeds=data.seeds[:1],
        height=settings.height,
        width=settings.width,
        num_inference_steps=STEPS,
        guidance_scale=4.0,
    )
    # same sample (to float rounding: the shard was generated in a batch of 2)
    torch.testing.assert_close(torch.as_tensor(again.samples), data.final[:1], rtol=0, atol=1e-4)


def test_a_refused_recording_removes_only_the_folders_it_made(tmp_path):
    """Refused before its first shard, `record` leaves the filesystem as it found it: every folder
    of `out_dir` it made is removed again (not only the last one), never one that was there."""

    class Refusing:
        def initial_noise(self, *args):
            raise ValueError("refused")

    settings = RecordSettings("digits-image", STEPS, 4.0, 16, 16)
    kept = tmp_path / "kept"
    kept.mkdir()
    for out in (kept / "a" / "b" / "rec", kept):
        with pytest.raises(ValueError, match="refused"):
            record(Refusing(), ["digit 3"], [0], out, settings, progress=False)
        assert list(tmp_path.iterdir()) == [kept] and not any(kept.iterdir())


def copy_of(recording, to):
    """A scratch copy of the module's recording, for tests that damage it."""
    to.mkdir()
    for f in recording.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def test_corrupt_shard_is_detected_and_re_recorded(pipe, recorded, tmp_path):
    out, settings = recorded
    copy = copy_of(out, tmp_path / "copy")
    shard = copy / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-50])
    with pytest.raises(TrajectoryError, match="shard-00001.*corrupt or truncated"):
        load_trajectories(copy)
    before = {f.name: f.stat().st_mtime_ns for f in copy.iterdir()}
    prompts = load_trajectories(out).prompts
    record(pipe, prompts, [0, 1, 2, 3, 4], copy, settings, shard_size=2, progress=False)
    after = {f.name: f.stat().st_mtime_ns for f in copy.iterdir()}
    assert after["shard-00000.safetensors"] == before["shard-00000.safetensors"]  # kept
    assert after["shard-00001.safetensors"] != before["shard-00001.safetensors"]  # re-recorded
    assert torch.equal(load_trajectories(copy).hidden["cond"], load_trajectories(out).hidden["cond"])
    with pytest.raises(TrajectoryError, match="holds trajectories recorded with"):
        record(
            pipe,
            prompts,
            [0, 1, 2, 3, 4],
            copy,
            RecordSettings("digits-image", STEPS + 1, 4.0, settings.height, settings.width),
            progress=False,
        )


def test_a_recording_is_never_overwritten_by_another_and_poisoned_shards_are_refused(pipe, recorded, tmp_path):
    out, settings = recorded
    copy = copy_of(out, tmp_path / "copy")
    before = {f.name: f.read_bytes() for f in copy.iterdir()}
    # Other seeds into a used directory: refused, every shard kept (it used to re-record shard 0
    # with the new seeds and drop the rest from the manifest).
    with pytest.raises(TrajectoryError, match="holds another recording"):
        record(pipe, ["digit 6", "digit 7"], [6, 7], copy, settings, shard_size=2, progress=False)
    assert {f.name: f.read_bytes() for f in copy.iterdir()} == before
    # Its first seeds only: refused too (it used to keep shard 0 and orphan the others)
    with pytest.raises(TrajectoryError, match="another recording"):
        record(pipe, ["digit 3", "a handwritten seven"], [0, 1], copy, settings, shard_size=2, progress=False)
    assert {f.name: f.read_bytes() for f in copy.iterdir()} == before
    # The same recording resumed with another --shard-size: said so (it read as "another recording")
    prompts = load_trajectories(out).prompts
    for other_size in (1, 3, 16):
        with pytest.raises(TrajectoryError, match="recorded with --shard-size 2; resume with --shard-size 2"):
            record(pipe, prompts, [0, 1, 2, 3, 4], copy, settings, shard_size=other_size, progress=False)
    assert {f.name: f.read_bytes() for f in copy.iterdir()} == before
    with pytest.raises(ValueError, match="shard_size must be at least 1"):
        record(pipe, ["digit 6"], [6], tmp_path / "other", settings, shard_size=0, progress=False)
    # A shard whose tensor bytes were overwritten passes the header checks but holds NaN: refused
    # by name before it can train a predictor to NaN.
    shard = copy / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-4000:-3000] = b"\xff" * 1000  # fp16 0xffff is NaN
    shard.write_bytes(bytes(data))
    with pytest.raises(TrajectoryError, match="shard-00001.*do not hold what was recorded"):
        load_trajectories(copy)
    # ... and so is one zeroed (a torn write: finite, so only its checksum tells), which a resumed
    # `lesa record` re-records instead of keeping
    data[-4000:-3000] = bytes(1000)
    shard.write_bytes(bytes(data))
    with pytest.raises(TrajectoryError, match="shard-00001.*do not hold what was recorded"):
        load_trajectories(copy)
    record(pipe, load_trajectories(out).prompts, [0, 1, 2, 3, 4], copy, settings, shard_size=2, progress=False)
    assert torch.equal(load_trajectories(copy).hidden["cond"], load_trajectories(out).hidden["cond"])
    (copy / "dataset.json").write_text("{not json")
    with pytest.raises(TrajectoryError, match="dataset.json: not a `lesa record` manifest"):
        load_trajectories(copy)
    # Trajectories of one model never train a predictor for another.
    args = ["train-predictor", "--data", str(out), "--level", "5x", "--out", str(tmp_path / "b")]
    assert main([*args, "--model", "digits-video"]) == 2


def test_training_state_is_written_atomically(pipe, recorded, tmp_path):
    out, _ = recorded
    work = tmp_path / "work"
    settings = TrainSettings(phase1_epochs=1, phase2_epochs=0, batch_size=4)
    train_predictor(pipe, out, CacheSchedule.from_full_steps(STEPS, [0, 1, 3]), tmp_path / "b", settings, work,
                    progress=False)  # fmt: skip
    assert sorted(p.name for p in work.iterdir()) == ["train_state.pt"]  # no half-written .tmp left


def test_out_that_holds_other_work_is_refused_before_training(pipe, recorded, tmp_path, monkeypatch, capsys):
    out, _ = recorded
    schedule = CacheSchedule.from_full_steps(STEPS, [0, 1, 3])
    settings = TrainSettings(phase1_epochs=1, phase2_epochs=0, batch_size=4, kan_hidden=(8,))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(ValueError, match="notes.txt: already holds a file"):
        train_predictor(pipe, out, schedule, a_file, settings, progress=False)
    assert not (tmp_path / "notes.txt.work").exists()
    # another run's bundle: its first validation replaced it with an untrained predictor
    train_predictor(pipe, out, schedule, tmp_path / "first", settings, work_dir=tmp_path / "w1", progress=False)
    weights = (tmp_path / "first" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"first: already holds a bundle \(config.json\)"):
        train_predictor(pipe, out, schedule, tmp_path / "first", settings, progress=False)
    cli = ["train-predictor", "--model", "digits-image", "--data", str(out), "--steps", str(STEPS)]
    assert main([*cli, "--interval", "2", "--first-enhance", "1", "--out", str(tmp_path / "first")]) == 2
    assert "first: already holds a bundle (config.json); choose a new directory" in capsys.readouterr().err
    assert (tmp_path / "first" / "model.safetensors").read_bytes() == weights
    # a finished run whose bundle was removed says so (it failed on a missing config.json)
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "first" / name).unlink()
    with pytest.raises(ValueError, match=r"first: the bundle this run saved .* is gone.*remove .*w1"):
        train_predictor(pipe, out, schedule, tmp_path / "first", settings, work_dir=tmp_path / "w1", progress=False)
    # "." names the directory it is run in ("PosixPath('.') has an empty name")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    train_predictor(pipe, out, schedule, ".", settings, progress=False)
    assert StagePredictor.from_pretrained(tmp_path / "here").schedule == schedule
    assert (tmp_path / "here.work" / "train_state.pt").is_file()


@pytest.mark.parametrize("base", ["last", "taylor1"])
def test_two_phase_training_writes_a_usable_bundle_and_resumes(pipe, recorded, tmp_path, base):
    out, _ = recorded
    schedule = CacheSchedule.from_full_steps(STEPS, [0, 1, 3])
    settings = TrainSettings(
        phase1_epochs=3,
        phase2_epochs=1,
        batch_size=4,
        kan_hidden=(8,),
        validate_every=2,
        base=base,
        train_tokens=4,
        phase2_updates_per_rollout=2,
    )
    predictor, report = train_predictor(pipe, out, schedule, tmp_path / "bundle", settings, progress=False)
    assert report.best_epoch != "none" and report.best_val_mse < float("inf")
    phases = {h["phase"] for h in report.history if "phase" in h}
    assert phases == {1, 2}
    loaded = StagePredictor.from_pretrained(tmp_path / "bundle")
    assert loaded.config.training["data"]["samples"] == 5
    assert loaded.config.hidden_size == pipe.info.hidden_size and loaded.config.base == base
    # resuming a finished run trains no further epochs and keeps the same best bundle
    again, report2 = train_predictor(pipe, out, schedule, tmp_path / "bundle", settings, progress=False)
    assert report2.best_epoch == report.best_epoch
    # another run's state is refused rather than silently mixed
    with pytest.raises(ValueError, match="another training run"):
        train_predictor(
            pipe, out, schedule, tmp_path / "bundle", TrainSettings(phase1_epochs=9, kan_hidden=(8,)), progress=False
        )
    # ... and so is the same run on other trajectories (it resumed and mixed the two datasets)
    other = record(pipe, ["digit 3", "digit 4"], [7, 8], tmp_path / "other", recorded[1], progress=False)
    with pytest.raises(ValueError, match="another training run"):
        train_predictor(pipe, other, schedule, tmp_path / "bundle", settings, progress=False)
    # a state file that is not one names itself, instead of torch's advice to unpickle it
    state = tmp_path / "bundle.work" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"train_state.pt: not a readable training state"):
        train_predictor(pipe, out, schedule, tmp_path / "bundle", settings, progress=False)


@pytest.mark.parametrize("stop_after", [1, 4], ids=["in-epoch-1", "in-epoch-3"])
def test_an_interrupted_and_resumed_run_trains_the_weights_an_uninterrupted_one_does(
    pipe, recorded, tmp_path, monkeypatch, stop_after
):
    """The epoch orders and token subsets continue where they stopped (their generator is kept in
    the state), so resuming is not a different training run; nor is its time only the last run's.
    Stopped in its first epoch, a run has saved the untrained bundle already: it resumes too."""
    import lesa_core.training as training

    out, _ = recorded
    schedule = CacheSchedule.from_full_steps(STEPS, [0, 1, 3])
    settings = TrainSettings(phase1_epochs=4, batch_size=2, kan_hidden=(8,), validate_every=100, train_tokens=4)

    def last_weights(bundle) -> dict:  # the last epoch's, from the resumable state (not the best bundle)
        return torch.load(tmp_path / f"{bundle}.work" / "train_state.pt", weights_only=True)["predictor"]

    train_predictor(pipe, out, schedule, tmp_path / "whole", settings, progress=False)
    calls = [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] > stop_after:  # 2 batches an epoch: a Ctrl-C
            raise KeyboardInterrupt
        time.sleep(0.5)  # a slow first run: its time must count in the resumed run's
        return forecast_loss(*args, **kwargs)

    monkeypatch.setattr(training, "forecast_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_predictor(pipe, out, schedule, tmp_path / "resumed", settings, progress=False)
    monkeypatch.setattr(training, "forecast_loss", forecast_loss)
    began = time.perf_counter()
    _, report = train_predictor(pipe, out, schedule, tmp_path / "resumed", settings, progress=False)
    took = time.perf_counter() - began
    whole, resumed = last_weights("whole"), last_weights("resumed")
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    if stop_after > 1:  # (stopped in epoch 1, the slow batch was never saved: its epoch reruns)
        assert report.seconds >= took + stop_after * 0.5


def test_training_splits_the_experts_where_the_paper_does_for_the_models_family(pipe, recorded, tmp_path, monkeypatch):
    """HunyuanVideo's variant of the method moves the second stage threshold to 0.4: training
    takes the thresholds of the model's transformer class."""
    import lesa_core.training as training
    from lesa_core.predictor import stage_thresholds_for

    assert stage_thresholds_for("HunyuanVideoTransformer3DModel") == (0.9, 0.4)
    assert stage_thresholds_for("FluxTransformer2DModel") == stage_thresholds_for(None) == (0.9, 0.5)
    asked = []
    monkeypatch.setattr(training, "stage_thresholds_for", lambda family: asked.append(family) or (0.8, 0.3))
    out, _ = recorded
    schedule = CacheSchedule.from_full_steps(STEPS, [0, 1, 3])
    settings = TrainSettings(phase1_epochs=1, phase2_epochs=0, batch_size=4, kan_hidden=(8,), train_tokens=4)
    predictor, _ = train_predictor(pipe, out, schedule, tmp_path / "b", settings, progress=False)
    assert asked == [pipe.info.transformer_class] and tuple(predictor.config.stage_thresholds) == (0.8, 0.3)


def test_phase3_backpropagates_the_final_sample_error_through_the_sampler(pipe, recorded, tmp_path):
    out, _ = recorded
    schedule = CacheSchedule.from_full_steps(STEPS, [0, 1, 3])
    data = load_trajectories(out)
    predictor = StagePredictor(PredictorConfig(schedule=schedule.to_dict(), kan_hidden=(8,)))
    loss = sample_loss(pipe, predictor, data.subset([0, 1]), schedule)
    loss.backward()
    # the gradient reaches every stage's history weights that a predicted step (2, 4, 5) used
    assert all(
        head.weight.grad is not None and head.weight.grad.abs().sum() > 0 for head in predictor.latent["shared"][1:]
    )
    assert all(p.grad is None for p in pipe.transformer.parameters())  # only activations carry it
    settings = TrainSettings(
        phase1_epochs=1,
        phase2_epochs=1,
        phase3_epochs=2,
        batch_size=4,
        kan_hidden=(8,),
        train_tokens=4,
        phase2_updates_per_rollout=1,
    )
    _, report = train_predictor(pipe, out, schedule, tmp_path / "bundle", settings, progress=False)
    assert {h["phase"] for h in report.history if "phase" in h} == {1, 2, 3}
    assert any(str(h["epoch"]).startswith("phase3") for h in report.history)
    assert all(p.requires_grad for p in pipe.transformer.parameters())  # unfrozen afterwards

    # --init fine-tunes a trained bundle: its first validation is that bundle's best score
    # (phase 3 in batches of 1: one update per training trajectory, phase 1 and 2 keep batch_size)
    tune = dataclasses.replace(
        settings,
        phase1_epochs=0,
        phase2_epochs=0,
        phase3_epochs=1,
        phase3_batch_size=1,
        init_from=str(tmp_path / "bundle"),
    )
    _, tuned = train_predictor(pipe, out, schedule, tmp_path / "tuned", tune, progress=False)
    state = torch.load(tmp_path / "tuned.work" / "train_state.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 4  # 4 training trajectories (1 of 5 held out); batch 4: 1 update
    assert tuned.history[0] == {"epoch": "init", "val_final_mse": pytest.approx(report.best_val_mse)}
    record = StagePredictor.from_pretrained(tmp_path / "tuned").config.training
    assert record["initial"]["settings"]["phase3_epochs"] == 2  # how the starting bundle was trained
    with pytest.raises(ValueError, match="kan_hidden"):
        train_predictor(pipe, out, schedule, tmp_path / "x", dataclasses.replace(tune, kan_hidden=(4,)), progress=False)

    class NoGradPipeline:  # what a diffusers pipeline offers: no differentiable sampler
        info = pipe.info

    with pytest.raises(ValueError, match="differentiable"):
        train_predictor(NoGradPipeline(), out, schedule, tmp_path / "other", settings, progress=False)


def test_a_schedule_with_nothing_to_predict_says_so(pipe, recorded, tmp_path):
    out, _ = recorded
    every = CacheSchedule.from_full_steps(STEPS, list(range(STEPS)))
    with pytest.raises(ValueError, match="runs every step in full"):  # not "taylor_stages () cover ..."
        train_predictor(pipe, out, every, tmp_path / "b", TrainSettings(phase1_epochs=1, kan_hidden=(8,)))


def test_guided_loss_weighs_errors_as_the_sampler_sees_them():
    schedule = CacheSchedule.from_full_steps(6, [0, 1, 3])
    predictor = StagePredictor(PredictorConfig(schedule=schedule.to_dict(), kan_hidden=(4,)))  # zero head: h_-1
    times = torch.linspace(1, 0, 7)
    state = torch.randn(2, 1, 3, 8).expand(2, 6, 3, 8)  # a constant trajectory: h_-1 forecasts it exactly
    truth = {"cond": state, "uncond": state}

    def loss(inputs: dict, kind: str = "guided") -> float:
        with torch.no_grad():
            return float(forecast_loss(predictor, inputs, truth, times, schedule, kind, 4.0))

    assert loss(truth) == 0.0
    # CFG moves the sample by 4 cond - 3 uncond: an error both branches share counts once, one in
    # the cond branch alone four times (16x squared)
    shift = torch.randn(1, 1, 3, 8)
    shared = loss({"cond": state + shift, "uncond": state + shift})
    cond_only = loss({"cond": state + shift, "uncond": state})
    assert shared > 0
    assert cond_only == pytest.approx(16 * shared, rel=1e-4)
    # an offset of a whole token is invisible to the final layer's LayerNorm; L1 counts it
    offset = {b: state + torch.randn(1, 1, 3, 1) for b in truth}
    assert loss(offset) < 1e-10 < loss(offset, "l1")
    with pytest.raises(ValueError, match="loss must be"):
        loss(truth, "l2")


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert (
        main(
            [
                "train-predictor",
                "--model",
                "digits-image",
                "--data",
                str(tmp_path),
                "--level",
                "5x",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    assert "no dataset.json" in capsys.readouterr().err
    args = ["train-predictor", "--model", "digits-image", "--data", str(tmp_path), "--level", "5x", "--out", "b"]
    assert main([*args, "--taylor-stages", "0,3"]) == 2
    assert "--taylor-stages '0,3': stages are 0, 1 and 2" in capsys.readouterr().err
    assert (
        main(
            [
                "record",
                "--model",
                "digits-image",
                "--prompts",
                str(tmp_path / "none.txt"),
                "--seeds",
                "0-1",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "no such file" in capsys.readouterr().err


def test_record_refuses_a_file_as_out_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import lesa_core.commands

    def load(name):
        raise AssertionError("the model loaded before --out was checked")

    monkeypatch.setattr(lesa_core.commands, "load_any_pipeline", load)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("digit 3\n")
    args = ["record", "--model", "digits-image", "--prompts", str(prompts), "--seeds", "0", "--steps", "4"]
    for out in (a_file, a_file / "rec"):  # the file itself, or a folder inside it
        assert main([*args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [f"lesa record: error: --out {out}: {a_file} is a file, not a folder"]
    assert a_file.read_text() == ""
    # the check creates nothing: record() makes the folder itself, and removes it when refused
    assert main([*args, "--out", str(tmp_path / "new" / "rec")]) == 1
    assert "the model loaded before" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_python_dash_m_reports_errors_as_the_lesa_command_does(tmp_path):
    """`python -m lesa_core.cli` runs the module as __main__: the commands' CliError is then
    lesa_core.cli's, another class, and every user error printed as an unexpected one (exit 1)."""
    import subprocess
    import sys

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    done = subprocess.run([sys.executable, "-m", "lesa_core.cli", "ensemble-predictors", "a=b", "--out", str(a_file)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"lesa ensemble-predictors: error: --out {a_file}: already holds a file; choose a " \
        "new directory or remove it first"  # fmt: skip
