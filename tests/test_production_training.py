"""`lesa record` and `lesa train-predictor` on a production pipeline named in the model config file.

A tiny random Qwen-Image pipeline (true CFG: "cond" and "uncond" branches) is saved to disk and
listed in a models.toml; the real CLI records its trajectories, trains a per-branch bundle for
level 2x, and the loader then serves that bundle as the model's 2x level.
"""

from __future__ import annotations

from production_tiny import build

from lesa_core import CacheConfig
from lesa_core.cli import main
from lesa_core.production import load_models
from lesa_core.trajectories import load_trajectories

STEPS = 4


def test_record_and_train_a_bundle_through_the_cli_then_serve_it(tmp_path, monkeypatch):
    tiny = build("qwenimage")
    tiny.pipe.save_pretrained(tmp_path / "tiny-qwen")
    (tmp_path / "models.toml").write_text(
        f"""
[defaults]
weights_root = "."

[models.tiny-qwen]
source = "./tiny-qwen"
pipeline = "QwenImagePipeline"
sizes = [[32, 32]]
default_steps = {STEPS}
default_guidance = 4.0
call_kwargs = {{ max_sequence_length = 16 }}
levels = {{ "2x" = "tiny-qwen/predictors/2x" }}
"""
    )
    monkeypatch.setenv("LESA_MODELS_CONFIG", str(tmp_path / "models.toml"))
    monkeypatch.delenv("LESA_WEIGHTS_DIR", raising=False)
    (tmp_path / "prompts.txt").write_text("a red cat\nthe blue dog\n")
    records = tmp_path / "records"
    assert main(["record", "--model", "tiny-qwen", "--prompts", str(tmp_path / "prompts.txt"), "--seeds", "0-3",
                 "--steps", str(STEPS), "--out", str(records)]) == 0  # fmt: skip
    data = load_trajectories(records)
    assert set(data.hidden) == {"cond", "uncond"}  # one history per CFG branch
    assert data.hidden["cond"].shape[:2] == (4, STEPS) and float(data.times[0]) == 1.0

    bundle = tmp_path / "tiny-qwen" / "predictors" / "2x"
    assert main(["train-predictor", "--model", "tiny-qwen", "--data", str(records), "--steps", str(STEPS),
                 "--level", "2x", "--out", str(bundle), "--phase1-epochs", "2", "--phase2-epochs", "1",
                 "--batch-size", "4", "--per-branch"]) == 0  # fmt: skip

    served = load_models(names=["tiny-qwen"], device="cpu")["tiny-qwen"]
    predictor = served.bundles["2x"]
    assert predictor.config.family == "QwenImageTransformer2DModel" and predictor.config.branches == ("cond", "uncond")
    out = served.pipe(["a red cat"], seeds=[9], height=32, width=32, num_inference_steps=STEPS,
                      cache=CacheConfig(method="lesa", schedule=predictor.schedule, predictor=predictor))  # fmt: skip
    assert out.stats["cache"] == {"cond": {"full": 2, "predicted": 2}, "uncond": {"full": 2, "predicted": 2}}
    assert out.samples.shape == (1, 32, 32, 3)
