"""`lesa bench quality`: metrics on known inputs, and a tiny end-to-end run writing every output."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from lesa_core import CacheSchedule, PredictorConfig, StagePredictor, benchmark
from lesa_core.benchmark import BenchConfig, run_quality_benchmark, write_outputs

STEPS = 8
# Tiny levels at 8 steps, built as explicit schedules (the named levels are defined at 50 steps).
SCHEDULES = {
    "tiny2x": CacheSchedule.from_full_steps(STEPS, [0, 1, 2, 4, 6]),
    "tiny4x": CacheSchedule.from_full_steps(STEPS, [0, 1]),
}


# ------------------------------------------------------------------------------------- metrics


def test_psnr_of_identical_samples_is_capped_at_100_db() -> None:
    a = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    assert benchmark.psnr(a, a) == benchmark.PSNR_CAP_DB == 100.0
    assert np.all(benchmark.mse_per_sample(a, a) == 0.0)


def test_psnr_and_mse_on_known_inputs() -> None:
    a = np.zeros((2, 8, 8), np.float32)
    b = np.full((2, 8, 8), 0.1, np.float32)  # MSE 0.01 -> 20 dB
    assert np.allclose(benchmark.mse_per_sample(a, b), 0.01, rtol=1e-6)
    assert benchmark.psnr(a, b) == pytest.approx(20.0, abs=1e-4)
    c = np.full((1, 4, 4, 4), 0.5, np.float32)  # a clip: MSE over every frame, 0.25 -> 6.02 dB
    assert benchmark.psnr(c, np.zeros_like(c)) == pytest.approx(-10 * np.log10(0.25), abs=1e-4)


def test_ssim_of_identical_is_one_and_decreases_with_noise() -> None:
    rng = np.random.default_rng(1)
    a = rng.random((4, 16, 16))
    assert benchmark.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    values = [benchmark.ssim(np.clip(a + rng.normal(0, s, a.shape), 0, 1), a) for s in (0.02, 0.1, 0.3)]
    assert 1.0 > values[0] > values[1] > values[2]
    noisy = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    assert benchmark.ssim(noisy, a) == pytest.approx(benchmark.ssim(a, noisy))  # symmetric


def test_ssim_of_flat_images_is_the_luminance_term() -> None:
    # Flat images have no variance, so contrast * structure = C2 / C2 = 1 and only luminance is left.
    x, y = 0.2, 0.6
    c1 = (benchmark.SSIM_K1 * 1.0) ** 2
    expected = (2 * x * y + c1) / (x**2 + y**2 + c1)
    assert benchmark.ssim(np.full((1, 16, 16), x), np.full((1, 16, 16), y)) == pytest.approx(expected, rel=1e-9)


def test_ssim_is_per_frame_for_clips_and_handles_tiny_images() -> None:
    rng = np.random.default_rng(2)
    clip = rng.random((2, 5, 16, 16))
    damaged = clip.copy()
    damaged[:, 3] = rng.random((2, 16, 16))  # only frame 3 differs
    per_frame = benchmark.ssim_per_frame(damaged, clip)
    assert per_frame.shape == (2, 5)
    assert np.allclose(np.delete(per_frame, 3, axis=1), 1.0)
    assert np.all(per_frame[:, 3] < 0.5)
    small = rng.random((1, 6, 6))  # smaller than the 11-pixel window: the window shrinks
    assert benchmark.ssim(small, small) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        benchmark.ssim(clip, clip[:, :4])


def test_seed_parsing_and_default_prompts() -> None:
    assert benchmark.parse_seeds("1000-1003") == [1000, 1001, 1002, 1003]
    assert benchmark.parse_seeds("1000-1001,1010") == [1000, 1001, 1010]
    with pytest.raises(ValueError, match="runs backwards"):
        benchmark.parse_seeds("5-1")
    # a typo'd bound is refused before the range is built (it used to fill the memory, or overflow later)
    with pytest.raises(ValueError, match="over the largest seed"):
        benchmark.parse_seeds("99999999999999999999")
    with pytest.raises(ValueError, match="more than 100000 seeds"):
        benchmark.parse_seeds("0-640000000")
    assert benchmark.parse_seeds(f"{2**31 - 1}") == [2**31 - 1]
    with pytest.raises(ValueError, match=r"'0-3,2-5': 2, 3 given more than once"):  # a sample in train and val
        benchmark.parse_seeds("0-3,2-5")
    assert min(benchmark.DEFAULT_SEEDS) >= benchmark.TRAINING_SEED_LIMIT
    from lesa_models.evaluator import parse_prompt_digit, parse_prompt_direction

    image = benchmark.default_prompts("image", 16)
    assert [parse_prompt_digit(p) for p in image[:10]] == list(range(10))
    video = benchmark.default_prompts("video", 16)
    assert all(parse_prompt_direction(p) is not None and parse_prompt_digit(p) is not None for p in video)
    # Held out from the predictor-training prompt files, not only by seed.
    root = Path(__file__).resolve().parent.parent / "prompts"
    for kind, prompts in (("image", image), ("video", video)):
        train = root / f"digits-{kind}-train.txt"
        if train.is_file():
            assert not set(prompts) & set(train.read_text().splitlines())


# ------------------------------------------------------------------------------------- the run


def random_predictor(schedule: CacheSchedule, seed: int = 0) -> StagePredictor:
    """An untrained predictor with small random history weights (no committed bundle fits 8 steps)."""
    torch.manual_seed(seed)
    predictor = StagePredictor(PredictorConfig(schedule=schedule.to_dict(), kan_hidden=(8,)))
    for heads in predictor.latent.values():
        for head in heads:
            torch.nn.init.normal_(head.weight, std=0.05)
    return predictor.eval()


@pytest.fixture(autouse=True)
def restore_threads():
    """The benchmark sets torch's thread count for its process; give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_pipe():
    from lesa_models import load_pipeline

    return load_pipeline("digits-image")


def tiny_config(model: str, **overrides) -> BenchConfig:
    settings = dict(
        model=model,
        seeds=[1000, 1001],
        levels=list(SCHEDULES),
        methods=["none", "reuse", "taylorseer1", "taylorseer2", "lesa"],
        batch_sizes=[1, 2],
        steps=STEPS,
        repeats=1,
        quality_batch=2,
        schedules=SCHEDULES,
        threads=1,  # 2 threads on a loaded 2-core box spin far more than they compute
    )
    settings.update(overrides)
    return BenchConfig(**settings)


def test_run_writes_json_markdown_and_pngs(image_pipe, tmp_path: Path) -> None:
    bundles = tmp_path / "predictors"
    random_predictor(SCHEDULES["tiny2x"]).save_pretrained(bundles / "tiny2x")  # tiny4x has none: skipped
    config = tiny_config("digits-image", predictors_dir=bundles)
    result = run_quality_benchmark(config, image_pipe, log=lambda _: None)

    keys = {(r["method"], r["level"]) for r in result.records}
    assert ("none", "none") in keys and ("lesa", "tiny2x") in keys and ("lesa", "tiny4x") not in keys
    assert any("lesa skipped at tiny4x" in note for note in result.notes)
    assert len(result.records) == 1 + 3 * 2 + 1

    none = next(r for r in result.records if r["method"] == "none")
    assert none["mse"] == 0.0  # hooks attached, every step full: bit-identical to no hooks
    assert none["psnr"] == benchmark.PSNR_CAP_DB and none["ssim"] == pytest.approx(1.0)
    for r in result.records:
        assert r["psnr"] <= benchmark.PSNR_CAP_DB and 0.0 <= r["agreement"] <= 1.0
        assert r["total_steps"] == STEPS and r["speedup_wall_b1"] > 0 and r["speedup_wall_b2"] > 0
        assert r["speedup_wall_median_b1"] == r["speedup_wall_b1"]  # one repeat: its fastest is its median
        assert r["speedup_wall_b8"] is None  # not measured in this run: said so, not invented
    reuse = next(r for r in result.records if (r["method"], r["level"]) == ("reuse", "tiny4x"))
    assert reuse["mse"] > 0 and reuse["full_steps"] == 2 and reuse["speedup_theoretical"] == 4.0

    paths = write_outputs(result, tmp_path / "out", json_path=tmp_path / "custom.json")
    data = json.loads(Path(paths["json"]).read_text())
    assert paths["json"] == tmp_path / "custom.json"
    required = {
        "model",
        "method",
        "level",
        "full_steps",
        "total_steps",
        "psnr",
        "ssim",
        "mse",
        "agreement",
        "speedup_theoretical",
        "speedup_wall_b1",
        "speedup_wall_b8",
    }
    assert all(required <= set(record) for record in data["records"])
    header_keys = {"cpu", "torch_threads", "freed_memory_retained", "torch", "load_average_start", "date"}
    assert header_keys <= set(data["header"])
    table = Path(paths["markdown"]).read_text()
    assert "| taylorseer2 | tiny4x | 2/8 |" in table and "wall b2" in table
    for key in ("grid", "difference_grid", "plot"):
        with Image.open(paths[key]) as image:
            assert image.format == "PNG" and image.width > 32

    written = benchmark.update_quality_cards(result)
    assert written == [bundles / "tiny2x"]
    card = StagePredictor.from_pretrained(bundles / "tiny2x").config.quality
    lesa = next(r for r in result.records if r["method"] == "lesa")
    assert card["psnr"] == lesa["psnr"] and card["seeds"] == [1000, 1001]
    assert {"ssim", "mse", "agreement", "speedup_theoretical", "speedup_wall_b8", "date", "machine"} <= set(card)


def test_in_memory_predictor_and_none_only(image_pipe) -> None:
    config = tiny_config(
        "digits-image",
        methods=["none", "lesa"],
        levels=["tiny4x"],
        predictors={"tiny4x": random_predictor(SCHEDULES["tiny4x"], seed=1)},
        batch_sizes=[1],
    )
    result = run_quality_benchmark(config, image_pipe, log=lambda _: None)
    assert [(r["method"], r["level"]) for r in result.records] == [("none", "none"), ("lesa", "tiny4x")]
    assert result.records[1]["mse"] > 0


def test_lesa_variants_load_their_own_bundles(image_pipe, tmp_path: Path) -> None:
    bundles = tmp_path / "predictors"
    random_predictor(SCHEDULES["tiny4x"], seed=2).save_pretrained(bundles / "paper" / "tiny4x")
    elsewhere = tmp_path / "somewhere"
    random_predictor(SCHEDULES["tiny4x"], seed=3).save_pretrained(elsewhere)
    config = tiny_config(
        "digits-image",
        methods=["lesa-paper", "lesa-x"],
        levels=["tiny4x"],
        predictors_dir=bundles,
        bundles={("lesa-x", "tiny4x"): elsewhere},
        batch_sizes=[1],
    )
    result = run_quality_benchmark(config, image_pipe, log=lambda _: None)
    assert [(r["method"], r["bundle"]) for r in result.records] == [
        ("lesa-paper", str(bundles / "paper" / "tiny4x")),
        ("lesa-x", str(elsewhere)),
    ]
    assert result.records[0]["forecaster"] == "lesa"


def test_bundle_for_another_model_is_skipped_with_a_note(image_pipe, tmp_path: Path) -> None:
    wrong = random_predictor(SCHEDULES["tiny4x"])
    wrong.config.family = "WanTransformer3DModel"  # digits-image is a FLUX transformer
    wrong.save_pretrained(tmp_path / "tiny4x")
    config = tiny_config("digits-image", methods=["lesa"], levels=["tiny4x"], predictors_dir=tmp_path, batch_sizes=[1])
    result = run_quality_benchmark(config, image_pipe, log=lambda _: None)
    assert result.records == []
    assert any("lesa skipped at tiny4x" in n and "WanTransformer3DModel" in n for n in result.notes)
    # named with --bundle, it is an error instead: the table would silently lack the row asked for
    named = tiny_config("digits-image", methods=["lesa"], levels=["tiny4x"], bundles={("lesa", "tiny4x"): tmp_path / "tiny4x"}, batch_sizes=[1])  # fmt: skip
    with pytest.raises(ValueError, match="--bundle lesa:tiny4x: .*WanTransformer3DModel"):
        run_quality_benchmark(named, image_pipe, log=lambda _: None)


def test_target_checks_on_synthetic_records() -> None:
    def rec(method: str, level: str, mse: float, agreement: float = 1.0, wall: float | None = 4.8) -> dict:
        return dict(
            method=method,
            level=level,
            mse=mse,
            psnr=-10 * np.log10(mse),
            agreement=agreement,
            agreement_full=1.0,
            agreement_delta_pp=100 * (agreement - 1.0),
            speedup_theoretical=5.0,
            speedup_wall_b8=wall,
        )

    records = [rec("reuse", "5x", 1e-2), rec("taylorseer1", "5x", 4e-3), rec("taylorseer2", "5x", 8e-3)]
    records.append(rec("lesa", "5x", 1e-3, agreement=0.9375, wall=4.0))
    checks = {c["target"]: c for c in benchmark.target_checks(records)}
    assert checks["MSE <= 0.5x best TaylorSeer"]["passed"]  # 1e-3 <= 0.5 * 4e-3
    assert "taylorseer1" in checks["MSE <= 0.5x best TaylorSeer"]["detail"]
    assert checks["better than reuse"]["passed"]
    assert not checks["agreement within 2 pp of full compute"]["passed"]  # -6.25 pp
    assert not checks["wall speed-up b8 >= 0.9x theoretical"]["passed"]  # 4.0 < 4.5


def test_mse_ratio_interval_says_how_much_the_seeds_pin_the_ratio_down() -> None:
    ts = {"mse_per_seed": [4e-4] * 32}
    steady = {"mse_per_seed": [2e-4] * 32}
    low, high = benchmark.mse_ratio_interval(steady, ts)
    assert low == pytest.approx(0.5) and high == pytest.approx(0.5)
    # One mode flip among 32 seeds: the same mean ratio (0.5), but the seeds no longer pin it down.
    flipped = {"mse_per_seed": [1e-4] * 31 + [1e-4 + 32 * 1e-4]}
    assert np.mean(flipped["mse_per_seed"]) / 4e-4 == pytest.approx(0.5)
    low, high = benchmark.mse_ratio_interval(flipped, ts)
    assert low < 0.3 and high > 0.9
    assert benchmark.mse_ratio_interval(flipped, ts) == (low, high)  # fixed resampling: reruns agree
    # Older records kept only PSNR per seed; mismatched seed counts give no interval.
    old = {"psnr_per_seed": [-10 * np.log10(2e-4)] * 32}
    assert benchmark.mse_ratio_interval(old, ts)[0] == pytest.approx(0.5, rel=1e-9)
    assert benchmark.mse_ratio_interval({"mse_per_seed": [1e-4] * 31}, ts) is None


def test_unknown_method_or_level_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown methods"):
        BenchConfig(model="digits-image", methods=["fora"])
    with pytest.raises(ValueError, match="known levels"):
        BenchConfig(model="digits-image", levels=["9x"])
    # An empty selection would print an empty table and exit 0; a bundle for a level or method the
    # run leaves out would be silently ignored.
    with pytest.raises(ValueError, match="at least one level and one method"):
        BenchConfig(model="digits-image", levels=[])
    with pytest.raises(ValueError, match="--bundle lesa:6.25x"):
        BenchConfig(model="digits-image", levels=["5x"], methods=["lesa"], bundles={("lesa", "6.25x"): Path("b")})
    with pytest.raises(ValueError, match="seeds 'a-b': expected ranges"):
        benchmark.parse_seeds("a-b")


def tiny_video_pipe():
    """A random 1-layer Wan transformer in the video pipeline: exercises the per-frame paths fast."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from lesa_models.pipeline import DigitsPipeline
    from lesa_models.text_encoder import get_text_encoder

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=1,
        text_dim=384,
        freq_dim=32,
        ffn_dim=32,
        num_layers=1,
        rope_max_seq_len=32,
    )
    return DigitsPipeline(
        transformer,
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
        get_text_encoder(),
        name="tiny-video",
        kind="video",
        sizes=[(16, 16)],
        num_frames=[4],
    )


def test_video_run_reports_direction_and_writes_strips(tmp_path: Path) -> None:
    config = tiny_config("tiny-video", methods=["none", "taylorseer1"], levels=["tiny2x"], batch_sizes=[1])
    result = run_quality_benchmark(config, tiny_video_pipe(), log=lambda _: None)
    record = result.records[-1]
    assert {"agreement_direction", "agreement_direction_full"} <= set(record)
    assert result.reference.shape == (2, 4, 16, 16)
    paths = write_outputs(result, tmp_path)
    names = sorted(p.name for p in paths["strips"])
    assert names == ["strip_none.gif", "strip_none.png", "strip_taylorseer1.gif", "strip_taylorseer1.png"]
    with Image.open(tmp_path / "strip_taylorseer1.gif") as gif:
        assert gif.n_frames == 4
    assert "direction agree" in Path(paths["markdown"]).read_text()


def test_cli_bench_quality_smoke(tmp_path: Path, capsys, monkeypatch) -> None:
    from lesa_core.cli import main

    # without --out-dir the outputs go to scratch, never over the committed benchmarks/results/<model>/
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "bench" / "digits-image"
    code = main(
        [
            "bench",
            "quality",
            "--model",
            "digits-image",
            "--seeds",
            "1000-1001",
            "--steps",
            "6",
            "--levels",
            "2x",
            "--methods",
            "none,reuse",
            "--batch-sizes",
            "1",
            "--repeats",
            "1",
            "--threads",
            "1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| reuse | 2x | 3/6 |" in printed
    assert not (tmp_path / "benchmarks").exists()
    assert (out / "quality.json").is_file() and (out / "digits-image_grid.png").is_file()
    assert main(["bench", "quality", "--methods", "fora", "--out-dir", str(out)]) == 2
    # outputs that cannot be written are refused before the run, not after it (minutes to hours)
    a_file = out / "quality.json"
    for flags, says in ((["--out-dir", str(a_file)], "is a file, not a folder"),
                        (["--out-dir", str(out), "--json", str(out)], "is a directory")):  # fmt: skip
        assert main(["bench", "quality", "--seeds", "1000", "--levels", "2x", "--methods", "reuse", *flags]) == 2
        assert says in capsys.readouterr().err
    # settings found wrong are named in one line, not an "unexpected ValueError", nor a run without the rows asked for
    for flags, says in ((["--batch-sizes", "a"], "--batch-sizes 'a': expected comma-separated integers"),
                        (["--guidance", "nan"], "--guidance must be a finite number >= 0"),
                        (["--predictors", str(tmp_path / "none")], "none: no such directory"),
                        (["--steps", "200"], "digits-image refuses these settings: num_inference_steps must be in"),
                        (["--methods", "lesa-nothere", "--predictors", str(out)], "lesa-nothere: no usable bundle at any of 2x")):  # fmt: skip
        args = ["bench", "quality", "--seeds", "1000", "--levels", "2x", "--methods", "reuse", "--out-dir", str(out)]
        assert main([*args, "--batch-sizes", "1", "--repeats", "1", *flags]) == 2
        err = capsys.readouterr().err
        assert says in err and "unexpected" not in err and "Traceback" not in err


def benchmark_script(name: str) -> Any:
    """Import benchmarks/<name>.py (a script, not a package module)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_flops_counts_predicted_steps_as_cheap_but_not_free(tmp_path: Path) -> None:
    """benchmarks/bench_flops.py: a 5x generation computes a fifth of full compute's FLOPs, plus
    what its predicted steps still run (so a little under the step ratio on the video model)."""
    bench_flops = benchmark_script("bench_flops")
    out = tmp_path / "flops.json"
    argv = ["--models", "digits-video", "--methods", "reuse,lesa", "--levels", "5x", "--batch", "1"]
    assert bench_flops.main([*argv, "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert [(r["method"], r["level"], r["full_steps"]) for r in records] == [("reuse", "5x", 10), ("lesa", "5x", 10)]
    for r in records:
        assert r["speedup_steps"] == 5.0 and 4.5 < r["speedup_flops"] < 5.0
        assert r["gflops_per_generation"] < r["gflops_full_compute"] / 4.5


def test_bench_edits_compares_accelerated_edits_with_the_same_edits_at_full_compute(tmp_path: Path) -> None:
    """benchmarks/bench_edits.py (few steps, training-free methods), both models: a record per edit,
    method and level, kept pixels exact wherever some are kept, and a labelled grid per edit."""
    bench_edits = benchmark_script("bench_edits")
    argv = ["--seeds", "2000-2001", "--levels", "2x", "--methods", "reuse,taylorseer1", "--steps", "8"]
    assert bench_edits.main([*argv, "--repeats", "1", "--out", str(tmp_path)]) == 0
    for model, edits in (("digits-image", ("inpaint", "sdedit", "variation")), ("digits-video", ("first_frame",))):
        records = json.loads((tmp_path / model / "edits" / "edits.json").read_text())["records"]
        assert [(r["edit"], r["method"]) for r in records] == [
            (edit, method) for edit in edits for method in ("none", "reuse", "taylorseer1")
        ]
        assert all(r["kept_exact"] is (None if r["edit"] in ("sdedit", "variation") else True) for r in records)
        assert all(0 <= r["agreement"] <= 1 and 0 < r["moved"] < 1 for r in records)
        assert all((r["direction_agreement"] is None) == (model == "digits-image") for r in records)
        accelerated = [r for r in records if r["method"] != "none"]
        assert all(r["psnr_vs_full"] > 15 and r["speedup_theoretical"] == 2.0 for r in accelerated)
        assert all((tmp_path / model / "edits" / f"{edit}_grid.png").is_file() for edit in edits)


def test_bench_variation_strength_reads_the_digit_kept_and_the_spread_per_strength(tmp_path: Path) -> None:
    """benchmarks/bench_variation_strength.py (few steps and seeds): a record per strength and prompt."""
    bench = benchmark_script("bench_variation_strength")
    out = tmp_path / "strength.json"
    assert bench.main(["--strengths", "0.3,0.9", "--per-source", "2", "--steps", "4", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert [(r["strength"], r["prompt"]) for r in records] == [
        (0.3, "none"),
        (0.3, "the digit"),
        (0.9, "none"),
        (0.9, "the digit"),
    ]
    assert all(0 <= r["digit_kept"] <= 1 and r["spread"] > 0 for r in records)
    unprompted = [r for r in records if r["prompt"] == "none"]
    assert unprompted[0]["spread"] < unprompted[1]["spread"]  # more strength, more apart


def test_bench_gpu_times_levels_and_checks_their_quality_against_full_compute(tmp_path: Path) -> None:
    """benchmarks/bench_gpu.py, run on the CPU: each level gets a wall speed-up and a PSNR vs full compute."""
    bench_gpu = benchmark_script("bench_gpu")
    out = tmp_path / "gpu.json"
    argv = ["--models", "digits-image", "--device", "cpu", "--dtype", "float32", "--steps", "6", "--levels", "2x"]
    assert bench_gpu.main([*argv, "--batch-sizes", "2", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["device_type"] == "cpu" and result["failures"] == {}
    full, fast = result["records"]
    assert (full["level"], full["psnr_vs_full"], full["speedup_wall"]) == ("none", None, 1.0)
    # No LESA bundle is trained for 6 steps, so the level falls back to TaylorSeer, and says so.
    assert (fast["level"], fast["method"], fast["full_steps"], fast["batch_size"]) == ("2x", "taylorseer", 3, 2)
    assert 10.0 < fast["psnr_vs_full"] < 100.0 and fast["speedup_wall"] > 0


def test_bench_production_scale_smoke_times_every_method_and_counts_predicted_calls(tmp_path: Path) -> None:
    """benchmarks/bench_production_scale.py at its tiny scale on the CPU: both families, each method skips
    the calls its schedule predicts (the hooks' own count), and the JSON holds a record per cell."""
    bench = benchmark_script("bench_production_scale")
    out = tmp_path / "scale.json"
    argv = ["--scale", "tiny", "--device", "cpu", "--dtype", "float32", "--steps", "10", "--levels", "2x"]
    assert bench.main([*argv, "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["failures"] == {}
    cells = {(r["family"], r["method"]): r for r in result["records"]}
    # FLUX also times one preview of a streamed request (its VAE decode), as a share of a generation
    preview = cells.pop(("flux", "preview"))
    # (shares only: which share is larger is a timing, and one repeat on a loaded CPU can invert it)
    assert preview["seconds_median"] > 0 and preview["share_of_none_none"] > 0 and preview["share_of_2x_lesa"] > 0
    assert set(cells) == {(f, m) for f in ("flux", "wan") for m in ("none", "reuse", "taylorseer", "lesa")}
    for (family, method), record in cells.items():
        calls_per_step = 2 if family == "wan" else 1  # Wan runs CFG as two calls
        assert record["full_steps"] == (10 if method == "none" else 5)
        assert record["predicted_calls"] == (10 - record["full_steps"]) * calls_per_step
        assert record["speedup_wall"] > 0 and record["seconds_median"] > 0
