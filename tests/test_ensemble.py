"""PredictorEnsemble: its folded forecast is the mean of its members'; bundles load and refuse clearly."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lesa_core import BundleError, CacheSchedule, PredictorConfig, PredictorEnsemble, StagePredictor
from lesa_core.cli import main
from lesa_core.forecasters import BranchHistory, ForecastContext, LesaForecaster
from lesa_core.training import _load_initial

SCHEDULE = CacheSchedule.from_full_steps(10, [0, 1, 2, 5])


def _member(seed: int, **overrides) -> StagePredictor:
    torch.manual_seed(seed)
    config = PredictorConfig(schedule=SCHEDULE.to_dict(), kan_hidden=(8,), hidden_size=4, **overrides)
    predictor = StagePredictor(config)
    with torch.no_grad():
        for heads in predictor.latent.values():
            for head in heads:
                head.weight.normal_(0, 0.3)
                head.bias.normal_(0, 0.3)
    return predictor.eval().requires_grad_(False)


def _members() -> list[StagePredictor]:
    # the three kinds the digits-image 5x ensemble mixes: shared, per-branch, per-channel weights
    return [
        _member(0),
        _member(1, branches=("cond", "uncond")),
        _member(2, branches=("cond", "uncond"), history_weights="channel", history_depths=(2, 8, 6)),
    ]


def _run(forecaster: LesaForecaster, trajectory: list[torch.Tensor], branch: str) -> dict[int, torch.Tensor]:
    memory, out = BranchHistory(), {}
    context = ForecastContext(branch=branch, timesteps=torch.linspace(1, 0, 11))
    for step in range(10):
        full = SCHEDULE.is_full(step)
        hidden = trajectory[step] if full else forecaster.forecast(memory, step, context)
        out[step] = hidden
        forecaster.observe(memory, step, hidden, full)
    return out


def test_ensemble_forecast_is_the_mean_of_its_members_forecasts():
    members = _members()
    ensemble = PredictorEnsemble(members)
    torch.manual_seed(3)
    trajectory = [torch.randn(2, 3, 4) for _ in range(10)]
    times = torch.linspace(1, 0, 11)
    for branch in ("cond", "uncond"):
        got = _run(LesaForecaster(ensemble), trajectory, branch)
        for step in range(10):
            if SCHEDULE.is_full(step):
                continue
            # every member forecasts from the ensemble's own history (its fed-back forecasts)
            history = [got[s] for s in range(step)]
            mean = sum(m.predict(history, times, float(times[step]), branch) for m in members) / len(members)
            torch.testing.assert_close(got[step], mean, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ensemble.predict(history, times, float(times[step]), branch), mean)
    with pytest.raises(ValueError, match="not for 'default'"):  # the per-branch members have no default expert
        _run(LesaForecaster(ensemble), trajectory, "default")


def test_schedule_coefficients_fold_every_predicted_step_as_step_coefficients_do():
    times = torch.linspace(1, 0, 11)
    predicted = [s for s in range(10) if not SCHEDULE.is_full(s)]
    for predictor in (*_members(), PredictorEnsemble(_members())):
        for branch in ("cond", "uncond"):
            table = predictor.schedule_coefficients(times, branch)
            assert sorted(table) == predicted
            for step, (coefficients, constant) in table.items():
                expected, expected_constant = predictor.step_coefficients(times, float(times[step]), branch)
                assert len(coefficients) == len(expected)
                for got, want in zip([*coefficients, constant], [*expected, expected_constant], strict=True):
                    torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(want), rtol=1e-5, atol=1e-6)


def test_ensemble_bundle_round_trip_and_clear_errors(tmp_path, capsys):
    members = _members()
    for i, member in enumerate(members):
        member.save_pretrained(tmp_path / f"m{i}")
    code = main(
        ["ensemble-predictors", "--out", str(tmp_path / "ens"), *(f"m{i}={tmp_path / f'm{i}'}" for i in range(3))]
    )
    assert code == 0
    loaded = StagePredictor.from_pretrained(tmp_path / "ens")  # one loader for both kinds of bundle
    assert isinstance(loaded, PredictorEnsemble) and loaded.names == ["m0", "m1", "m2"]
    assert loaded.schedule.full_steps == SCHEDULE.full_steps and loaded.config.history_weights == "channel"
    for original, member in zip(members, loaded.members, strict=True):
        for (name, a), (_, b) in zip(original.state_dict().items(), member.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    loaded.check_compatible(SCHEDULE, family=None, hidden_size=4)
    # the command names the member that cannot join, and its bundle
    assert (
        main(["ensemble-predictors", "--out", str(tmp_path / "e2"), f"m0={tmp_path / 'm0'}", f"e={tmp_path / 'ens'}"])
        == 2
    )
    assert f"member e ({tmp_path / 'ens'}): an ensemble" in capsys.readouterr().err
    other = StagePredictor(
        dataclasses.replace(members[0].config, schedule=CacheSchedule.from_full_steps(10, [0, 5]).to_dict())
    )
    other.save_pretrained(tmp_path / "other")
    assert (
        main(["ensemble-predictors", "--out", str(tmp_path / "e3"), f"m0={tmp_path / 'm0'}", f"x={tmp_path / 'other'}"])
        == 2
    )
    assert f"member x ({tmp_path / 'other'}) is for" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fine-tune one of its members"):  # train-predictor --init ENSEMBLE
        _load_initial(_member(0), tmp_path / "ens")
    with pytest.raises(BundleError, match="num_steps and schedule must match"):
        loaded.check_compatible(CacheSchedule.from_full_steps(10, [0, 1, 5]), family=None, hidden_size=4)

    # a member trained for another schedule is refused, naming the setting
    other = StagePredictor(
        PredictorConfig(schedule=CacheSchedule.from_full_steps(10, [0, 3]).to_dict(), kan_hidden=(8,))
    )
    with pytest.raises(BundleError, match="differ in schedule"):
        PredictorEnsemble([members[0], other])
    with pytest.raises(BundleError, match="not ensembles"):
        PredictorEnsemble([members[0], loaded])
    # a member outside the bundle directory is refused
    config = json.loads((tmp_path / "ens" / "config.json").read_text())
    (tmp_path / "ens" / "config.json").write_text(json.dumps({**config, "members": ["../m0"]}))
    with pytest.raises(BundleError, match="subdirectory name"):
        StagePredictor.from_pretrained(tmp_path / "ens")
    (tmp_path / "ens" / "config.json").write_text(json.dumps({**config, "members": ["gone"]}))
    with pytest.raises(BundleError, match="gone"):
        StagePredictor.from_pretrained(tmp_path / "ens")
    # a predictor setting on the ensemble would be ignored (its members' apply): refused, naming it
    (tmp_path / "ens" / "config.json").write_text(json.dumps({**config, "taylor_stages": [0]}))
    with pytest.raises(BundleError, match=r"unknown ensemble config keys \['taylor_stages'\].*each member's"):
        StagePredictor.from_pretrained(tmp_path / "ens")
    (tmp_path / "ens" / "config.json").write_text(json.dumps({**config, "hidden_size": 8}))
    with pytest.raises(BundleError, match="its hidden_size 8 differs from its members' \\(4\\)"):
        StagePredictor.from_pretrained(tmp_path / "ens")
    (tmp_path / "ens" / "config.json").write_text(json.dumps(config))
    assert isinstance(StagePredictor.from_pretrained(tmp_path / "ens"), PredictorEnsemble)
    # an --out that holds a bundle (here: a member's) is refused: its config and card would be lost
    before = (tmp_path / "m0" / "config.json").read_text()
    assert (
        main(["ensemble-predictors", "--out", str(tmp_path / "m0"), f"a={tmp_path / 'm0'}", f"b={tmp_path / 'm1'}"])
        == 2
    )
    assert f"--out {tmp_path / 'm0'}: already holds a bundle" in capsys.readouterr().err
    assert (tmp_path / "m0" / "config.json").read_text() == before
    # the command names a bad member argument
    assert main(["ensemble-predictors", "--out", str(tmp_path / "x"), f"{tmp_path / 'm0'}"]) == 2
    # a member named like the ensemble's own files is refused before anything is written
    assert main(["ensemble-predictors", "--out", str(tmp_path / "y"), f"config.json={tmp_path / 'm0'}"]) == 2
    assert not (tmp_path / "y").exists()
