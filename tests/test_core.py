"""Schedule, KAN, predictor and forecasters against independent, straightforward implementations."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch

from lesa_core import (
    LEVELS,
    BundleError,
    CacheSchedule,
    KANLinear,
    PredictorConfig,
    StagePredictor,
    TaylorSeerForecaster,
    level_schedule,
)
from lesa_core.forecasters import (
    BranchHistory,
    ForecastContext,
    LesaForecaster,
    ReuseForecaster,
    extrapolate_full_points,
)


def test_reference_schedule_table():
    schedule = CacheSchedule(50, interval=7, first_enhance=3)
    assert schedule.full_steps == (0, 1, 2, 3, 9, 16, 23, 30, 37, 44)
    assert schedule.speedup == 5.0
    assert CacheSchedule(50, 7, 3, force_step3=False).full_steps == (0, 1, 2, 9, 16, 23, 30, 37, 44)
    assert level_schedule("6.25x").num_full == 8 and level_schedule("6.25x").speedup == 6.25
    assert [level_schedule(n).num_full for n in LEVELS] == [50, 25, 15, 10, 8]
    explicit = CacheSchedule.from_full_steps(10, [5, 0, 5, 9])
    assert explicit.full_steps == (0, 5, 9) and not explicit.is_full(1)
    assert CacheSchedule.from_dict(schedule.to_dict()) == schedule
    with pytest.raises(ValueError, match="step 0"):
        CacheSchedule.from_full_steps(10, [1, 2])
    with pytest.raises(ValueError, match="full step -1 is outside 0..4"):  # not "must include step 0"
        CacheSchedule.from_full_steps(5, [0, -1, 2])
    for bad in (2.5, True):  # 2.5 built a 2-of-10 schedule, silently
        with pytest.raises(ValueError, match="interval must be an integer"):
            CacheSchedule(10, interval=bad, first_enhance=1)
    with pytest.raises(ValueError, match="unknown acceleration level"):
        level_schedule("9x")


def _bspline_basis(x: float, knots: list[float], i: int, k: int) -> float:
    """Cox-de Boor recursion, scalar and recursive: the textbook definition."""
    if k == 0:
        return 1.0 if knots[i] <= x < knots[i + 1] else 0.0
    left = (x - knots[i]) / (knots[i + k] - knots[i]) * _bspline_basis(x, knots, i, k - 1)
    right = (knots[i + k + 1] - x) / (knots[i + k + 1] - knots[i + 1]) * _bspline_basis(x, knots, i + 1, k - 1)
    return left + right


def test_kan_layer_matches_loop_implementation():
    torch.manual_seed(0)
    layer = KANLinear(3, 2, grid_size=5, spline_order=3, grid_range=(-3, 3)).double().requires_grad_(False)
    with torch.no_grad():
        layer.spline_weight.normal_()
    x = torch.tensor([[-2.5, 0.1, 1.7], [0.0, -0.4, 2.9]], dtype=torch.float64)
    knots = [(-3 + j * 6 / 5) for j in range(-3, 5 + 3 + 1)]
    expected = torch.zeros(2, 2, dtype=torch.float64)
    for b in range(2):
        for o in range(2):
            total = 0.0
            for i in range(3):
                xi = float(x[b, i])
                total += float(layer.base_weight[o, i]) * xi / (1 + math.exp(-xi))
                for j in range(5 + 3):
                    coefficient = float(layer.spline_weight[o, i, j] * layer.spline_scaler[o, i])
                    total += coefficient * _bspline_basis(xi, knots, j, 3)
            expected[b, o] = total
    torch.testing.assert_close(layer(x), expected)


def _predictor(num_steps: int = 10, **overrides) -> StagePredictor:
    torch.manual_seed(0)
    schedule = CacheSchedule.from_full_steps(num_steps, [0, 1, 2, 5])
    config = PredictorConfig(schedule=schedule.to_dict(), kan_hidden=(16, 16), **overrides)
    predictor = StagePredictor(config)
    with torch.no_grad():
        for heads in predictor.latent.values():
            for head in heads:
                head.weight.normal_()
                head.bias.normal_()
    return predictor.double().requires_grad_(False)


def test_predictor_matches_formula_written_out():
    predictor = _predictor()
    times = torch.linspace(1, 0, 11, dtype=torch.float64)
    history = [torch.randn(2, 3, 4, dtype=torch.float64) for _ in range(6)]
    for t_curr, stage, depth in ((0.95, 0, 4), (0.7, 1, 8), (0.3, 2, 8)):
        kan = predictor.timestep["shared"][stage]
        head = predictor.latent["shared"][stage]
        gain = float(kan((t_curr - times).float().unsqueeze(0).double()).squeeze())
        window = [history[0]] * max(0, depth - len(history)) + history[-depth:]
        latent = sum(float(head.weight[0, k]) * window[k] for k in range(depth)) + float(head.bias)
        expected = history[-1] + gain * latent
        got = predictor.predict(history, times, t_curr)
        torch.testing.assert_close(got, expected)
        # the folded inference path gives the same forecast
        coefficients, constant = predictor.step_coefficients(times, t_curr)
        folded = window[-1] + constant + sum(c * h for c, h in zip(coefficients, window, strict=True))
        torch.testing.assert_close(folded, expected)


def test_folded_steps_are_shared_per_schedule_and_never_outlive_the_weights():
    predictor = _predictor()
    times = torch.linspace(1, 0, 11)
    table = predictor.folded_steps(times, "cond")
    assert predictor.folded_steps(times.clone(), "cond") is table  # same times by value: one table
    assert predictor.folded_steps(torch.linspace(1, 0.1, 11), "cond") is not table
    # a LESA forecast fills the table; an optimizer-style in-place update gives a fresh one
    table[3] = predictor.step_coefficients(times, float(times[3]))
    with torch.no_grad():
        predictor.latent["shared"][0].bias.add_(1.0)
    fresh = predictor.folded_steps(times, "cond")
    assert fresh is not table and fresh == {}
    # weights loaded as new tensors (assign=True) whose version counters equal the old ones'
    # (two predictors built alike): the first one's table was kept
    first, second = _predictor(), _predictor()
    with torch.no_grad():
        second.latent["shared"][0].weight.mul_(2.0)  # other values, and the same counters as first's:
        first.latent["shared"][0].weight.mul_(1.0)
    table = first.folded_steps(times, "cond")
    table[3] = first.step_coefficients(times, float(times[3]))
    first.load_state_dict(second.state_dict(), assign=True)
    assert first.folded_steps(times, "cond") == {}


def test_predictor_preserves_dtype_and_batches():
    predictor = _predictor().float()
    times = torch.linspace(1, 0, 11)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        history = [torch.randn(3, 5, 8).to(dtype) for _ in range(8)]
        out = predictor.predict(history, times, 0.6)
        assert out.dtype == dtype and out.shape == (3, 5, 8)
        single = predictor.predict([h[1:2] for h in history], times, 0.6)
        torch.testing.assert_close(out[1:2].float(), single.float())


def test_branch_experts_and_errors():
    predictor = _predictor(branches=("cond", "uncond"))
    times = torch.linspace(1, 0, 11, dtype=torch.float64)
    history = [torch.randn(4, dtype=torch.float64) for _ in range(8)]
    assert not torch.equal(
        predictor.predict(history, times, 0.4, "cond"), predictor.predict(history, times, 0.4, "uncond")
    )
    with pytest.raises(ValueError, match="branches"):
        predictor.predict(history, times, 0.4, "other")
    with pytest.raises(ValueError, match="11 schedule times"):
        predictor.predict(history, times[:5], 0.4, "cond")


def test_bundle_round_trip_and_mismatch_errors(tmp_path):
    predictor = _predictor(family="FluxTransformer2DModel", hidden_size=64).float()
    predictor.save_pretrained(tmp_path / "bundle")
    loaded = StagePredictor.from_pretrained(tmp_path / "bundle")
    for (name, a), (_, b) in zip(predictor.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    loaded.check_compatible(predictor.schedule, "FluxTransformer2DModel", 64)
    with pytest.raises(BundleError, match="trained for 4 of 10 steps"):
        loaded.check_compatible(CacheSchedule(50, 7, 3), None, None)
    with pytest.raises(BundleError, match="hidden size 64"):
        loaded.check_compatible(predictor.schedule, None, 128)
    with pytest.raises(BundleError, match="WanTransformer3DModel"):
        loaded.check_compatible(predictor.schedule, "WanTransformer3DModel", None)


def test_corrupt_and_missing_bundles_fail_cleanly(tmp_path):
    _predictor().float().save_pretrained(tmp_path / "b")
    weights = tmp_path / "b" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(BundleError, match="corrupt or truncated"):
        StagePredictor.from_pretrained(tmp_path / "b")
    with pytest.raises(BundleError, match="missing"):
        StagePredictor.from_pretrained(tmp_path / "nothing")
    (tmp_path / "b" / "config.json").write_text("{not json")
    with pytest.raises(BundleError, match="not a valid predictor config"):
        StagePredictor.from_pretrained(tmp_path / "b")
    # valid JSON, wrong types or sizes; bytes that are not UTF-8: each named as the bundle's config
    good = json.loads(json.dumps(asdict(_predictor().config)))
    for broken in (
        {**good, "schedule": "x"}, {**good, "schedule": None}, {**good, "history_depths": [-1, 8, 8]},
        # loaded fine before, and failed the first request's forecast instead
        {**good, "stage_thresholds": [0.9]}, {**good, "stage_thresholds": [0.3, 0.7]},
        {**good, "history_depths": [4, 8]}, {**good, "taylor_stages": [3]},
        {**good, "grid_size": 0}, {**good, "stage_thresholds": ["0.9", "0.5"]}, {**good, "base": "taylor3"},
        {**good, "kan_hidden": [0]},
    ):  # fmt: skip
        (tmp_path / "b" / "config.json").write_text(json.dumps(broken))
        with pytest.raises(BundleError, match=r"config.json: not a valid predictor config"):
            StagePredictor.from_pretrained(tmp_path / "b")
    for not_an_object, says in (([], "got a JSON list"), (None, "got null"), (7, "got a JSON int")):
        (tmp_path / "b" / "config.json").write_text(json.dumps(not_an_object))
        with pytest.raises(
            BundleError, match=f"config.json: not a valid predictor config \\(expected a JSON object, {says}"
        ):
            StagePredictor.from_pretrained(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_bytes(b'{"schedule": "\xff"}')
    with pytest.raises(BundleError, match=r"config.json: not a valid predictor config"):
        StagePredictor.from_pretrained(tmp_path / "b")


def _feed(forecaster, trajectory, full_steps, steps):
    memory = BranchHistory()
    context = ForecastContext(branch="default", timesteps=torch.linspace(1, 0, len(trajectory) + 1))
    out = {}
    for step in range(steps):
        full = step in full_steps
        hidden = trajectory[step] if full else forecaster.forecast(memory, step, context)
        out[step] = hidden
        forecaster.observe(memory, step, hidden, full)
    return out


def test_reuse_and_taylorseer_exactness():
    base, slope, curve = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    linear = [base + slope * s for s in range(12)]
    quadratic = [base + slope * s + curve * s * s for s in range(12)]
    full = {0, 1, 3, 6, 10}
    reuse = _feed(ReuseForecaster(), linear, full, 12)
    assert torch.equal(reuse[5], linear[3]) and torch.equal(reuse[11], linear[10])
    first = _feed(TaylorSeerForecaster(1), linear, full, 12)
    for step in range(12):
        torch.testing.assert_close(first[step], linear[step])
    # order 1 is not exact on the quadratic: the test above can fail
    assert not torch.allclose(_feed(TaylorSeerForecaster(1), quadratic, full, 12)[5], quadratic[5])


def test_taylorseer_order_2_is_the_papers_formula_not_newtons_polynomial():
    """TaylorSeer's reference code: factors F0 = h, F_{i+1} = (F_i - F_i of the previous full step)
    / their distance, forecast sum F_i x^i / i!. The benchmark's baseline must be that, not the
    interpolating polynomial (which the LESA predictor's taylor2 base is, and which differs)."""
    q = [torch.randn(3, 4) for _ in range(12)]
    full = {0, 1, 3, 6, 10}
    second = _feed(TaylorSeerForecaster(2), q, full, 12)
    f1_at_1 = (q[1] - q[0]) / 1
    f1_at_3 = (q[3] - q[1]) / 2
    f2_at_3 = (f1_at_3 - f1_at_1) / 2
    for step in (4, 5):  # after full steps 0, 1, 3
        x = step - 3
        torch.testing.assert_close(second[step], q[3] + f1_at_3 * x + f2_at_3 * x * x / 2)
    f1_at_6 = (q[6] - q[3]) / 3
    f2_at_6 = (f1_at_6 - f1_at_3) / 3
    torch.testing.assert_close(second[8], q[6] + f1_at_6 * 2 + f2_at_6 * 4 / 2)
    torch.testing.assert_close(second[2], q[1] + f1_at_1 * 1)  # two full steps so far: order 1
    newton = extrapolate_full_points([(0, q[0]), (1, q[1]), (3, q[3])], 5, 2)
    assert not torch.allclose(second[5], newton)


def test_lesa_forecaster_feeds_back_predictions():
    predictor = _predictor().float().eval()
    trajectory = [torch.randn(2, 4) for _ in range(10)]
    out = _feed(LesaForecaster(predictor), trajectory, set(predictor.schedule.full_steps), 10)
    times = torch.linspace(1, 0, 11)
    history = [out[s] for s in range(4)]
    torch.testing.assert_close(out[4], predictor.predict(history, times, float(times[4])))
    history.append(out[4])
    torch.testing.assert_close(out[5], trajectory[5])  # step 5 is full


def test_lesa_forecaster_recomputes_its_constants_for_each_generation():
    predictor = _predictor().float().eval()
    forecaster = LesaForecaster(predictor)
    history = [torch.randn(2, 4) for _ in range(8)]
    first = forecaster.forecast(BranchHistory(history=list(history)), 4, _context())
    with torch.no_grad():
        for head in predictor.latent["shared"]:
            head.weight.mul_(2.0)
    # same generation: the step's constants are reused; a new generation (new times) sees new weights
    assert torch.equal(forecaster.forecast(BranchHistory(history=list(history)), 4, _context(same=True)), first)
    again = forecaster.forecast(BranchHistory(history=list(history)), 4, _context())
    torch.testing.assert_close(again, predictor.predict(history, torch.linspace(1, 0, 11), 0.6))
    assert not torch.equal(again, first)


_TIMES = [torch.linspace(1, 0, 11)]


def _context(same: bool = False) -> ForecastContext:
    if not same:  # new_generation hands the forecaster a new times tensor
        _TIMES[0] = torch.linspace(1, 0, 11)
    return ForecastContext(branch="default", timesteps=_TIMES[0])


def test_predict_steps_equals_predict_per_step():
    predictor = _predictor()
    times = torch.linspace(1, 0, 11, dtype=torch.float64)
    trajectory = torch.randn(3, 10, 5, 2, dtype=torch.float64)
    steps = [1, 2, 4, 6, 9]
    batched = predictor.predict_steps(trajectory, steps, times)
    for i, step in enumerate(steps):
        history = [trajectory[:, j] for j in range(step)]
        torch.testing.assert_close(batched[:, i], predictor.predict(history, times, float(times[step])))


def test_channel_history_weights_variant(tmp_path):
    """One weight per history slot and channel: the formula, the folded inference path, the
    vectorised training path and a bundle round trip all agree."""
    predictor = _predictor(history_weights="channel", hidden_size=4)
    times = torch.linspace(1, 0, 11, dtype=torch.float64)
    history = [torch.randn(2, 3, 4, dtype=torch.float64) for _ in range(6)]
    for t_curr, stage, depth in ((0.95, 0, 4), (0.3, 2, 8)):
        kan, head = predictor.timestep["shared"][stage], predictor.latent["shared"][stage]
        assert head.weight.shape == (4, depth)
        gain = float(kan((t_curr - times).float().unsqueeze(0).double()).squeeze())
        window = [history[0]] * max(0, depth - len(history)) + history[-depth:]
        latent = sum(head.weight[:, k] * window[k] for k in range(depth)) + head.bias
        expected = history[-1] + gain * latent
        torch.testing.assert_close(predictor.predict(history, times, t_curr), expected)
        coefficients, constant = predictor.step_coefficients(times, t_curr)
        folded = window[-1] + constant.double() + sum(c.double() * h for c, h in zip(coefficients, window, strict=True))
        torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)  # folded in float32
    trajectory = torch.randn(3, 10, 5, 4, dtype=torch.float64)
    batched = predictor.predict_steps(trajectory, [1, 4, 9], times)
    for i, step in enumerate([1, 4, 9]):
        expected = predictor.predict([trajectory[:, j] for j in range(step)], times, float(times[step]))
        torch.testing.assert_close(batched[:, i], expected)
    forecaster_out = _feed(LesaForecaster(predictor.float().eval()), [h.float() for h in trajectory.unbind(1)],
                           set(predictor.schedule.full_steps), 10)  # fmt: skip
    window = [forecaster_out[s] for s in range(4)]
    torch.testing.assert_close(forecaster_out[4], predictor.predict(window, times.float(), float(times[4])))
    predictor.save_pretrained(tmp_path / "bundle")
    loaded = StagePredictor.from_pretrained(tmp_path / "bundle")
    assert loaded.config.history_weights == "channel"
    torch.testing.assert_close(
        loaded.predict(window, times.float(), 0.3), predictor.predict(window, times.float(), 0.3)
    )
    with pytest.raises(BundleError, match="hidden_size"):
        _predictor(history_weights="channel")


def test_taylor_base_variant_corrects_taylorseer():
    # With its history head at zero, the improved variant is exactly its base, the quadratic
    # through the last three full steps ...
    torch.manual_seed(0)
    schedule = CacheSchedule.from_full_steps(10, [0, 1, 2, 5])
    config = PredictorConfig(schedule=schedule.to_dict(), kan_hidden=(8,), base="taylor2")
    predictor = StagePredictor(config).eval()
    trajectory = [torch.randn(2, 3) for _ in range(10)]
    full = set(schedule.full_steps)
    lesa = _feed(LesaForecaster(predictor), trajectory, full, 10)
    taylor = {}  # the quadratic through the last three full steps (Newton's form)
    for step in range(10):
        points = [(s, trajectory[s]) for s in sorted(full) if s < step]
        taylor[step] = trajectory[step] if step in full else extrapolate_full_points(points, step, 2)
    for step in range(10):
        torch.testing.assert_close(lesa[step], taylor[step])
    # ... and once trained, its batched training path matches the inference path.
    with torch.no_grad():
        for head in predictor.latent["shared"]:
            head.weight.normal_()
    times = torch.linspace(1, 0, 11)
    lesa = _feed(LesaForecaster(predictor), trajectory, full, 10)
    stacked = torch.stack([lesa[s] for s in range(10)], dim=1)
    predicted = [s for s in range(10) if s not in full]
    batched = predictor.predict_steps(stacked, predicted, times, full_steps=sorted(full))
    for i, step in enumerate(predicted):
        torch.testing.assert_close(batched[:, i], lesa[step])
    with pytest.raises(ValueError, match="base"):
        predictor.predict([trajectory[0]], times, 0.5)


def test_taylor_stages_variant_forecasts_those_stages_like_taylorseer(tmp_path):
    # schedule times linspace(1, 0, 11): steps 3, 4 are stage 1 (0.5 < t <= 0.9), 6-9 stage 2
    predictor = _predictor(taylor_stages=(1,)).float().eval()
    times = torch.linspace(1, 0, 11)
    assert predictor.learned_steps(times) == [6, 7, 8, 9]
    trajectory = [torch.randn(2, 4) for _ in range(10)]
    full = set(predictor.schedule.full_steps)
    mixed = _feed(LesaForecaster(predictor), trajectory, full, 10)
    taylor = _feed(TaylorSeerForecaster(1), trajectory, full, 10)
    for step in (3, 4):  # stage 1: TaylorSeer order 1 from the last two full steps
        torch.testing.assert_close(mixed[step], taylor[step])
    window = [mixed[s] for s in range(6)]  # stage 2: the learned expert, fed the TaylorSeer forecasts
    torch.testing.assert_close(mixed[6], predictor.predict(window, times, float(times[6])))
    predictor.save_pretrained(tmp_path / "bundle")
    assert StagePredictor.from_pretrained(tmp_path / "bundle").config.taylor_stages == (1,)


def test_a_taylor_stage_after_a_learned_one_stays_taylorseer_in_every_generation():
    """The first learned step folds the schedule's coefficients: never those of a TaylorSeer stage
    (here stage 2, steps 6-9, after the learned stage 1), in this generation or the next (the
    folded table is kept across generations)."""
    predictor = _predictor(taylor_stages=(2,)).float().eval()
    assert predictor.learned_steps(torch.linspace(1, 0, 11)) == [3, 4]
    trajectory = [torch.randn(2, 4) for _ in range(10)]
    full = set(predictor.schedule.full_steps)
    forecaster = LesaForecaster(predictor)
    for _ in range(2):
        mixed = _feed(forecaster, trajectory, full, 10)
        taylor = _feed(TaylorSeerForecaster(1), trajectory, full, 10)
        for step in (6, 7, 8, 9):
            torch.testing.assert_close(mixed[step], taylor[step])
