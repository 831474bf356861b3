"""Evaluator, media encoders and the `lesa generate` command."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import random
import shutil

import numpy as np
import pytest

import lesa_models
from lesa_models import data, evaluator, media


def test_prompt_parsers():
    assert evaluator.parse_prompt_digit("a bold seven") == 7
    assert evaluator.parse_prompt_digit("digit 4 moving up") == 4
    assert evaluator.parse_prompt_digit("a cat") is None
    assert evaluator.parse_prompt_direction("digit 7 moving to the left") == "left"
    assert evaluator.parse_prompt_direction("a two sliding to the upper right") == "up-right"
    assert evaluator.parse_prompt_direction("the number 1 moves diagonally down-left") == "down-left"
    assert evaluator.parse_prompt_direction("a nine") is None


def test_judge_recognises_training_style_data():
    train_split, _ = data.digit_splits()
    rng = random.Random(1)
    clips, _, labels, directions = data.sample_video_batch(train_split, 16, rng)
    assert all(evaluator.motion_direction(c.numpy()) == d for c, d in zip(clips, directions, strict=True))
    frames = np.mean([(evaluator.classify_frames(c.numpy()) == y).mean() for c, y in zip(clips, labels, strict=True)])
    assert frames >= 0.9
    images, _, labels = data.sample_image_batch(train_split, 40, 16, rng)
    assert (evaluator.classify_digits(images.numpy()) == np.array(labels)).mean() >= 0.9
    assert evaluator.motion_direction(np.zeros((8, 16, 16), np.float32)) == "static"


def test_media_encoders():
    rng = np.random.default_rng(0)
    image = rng.random((16, 16), dtype=np.float32)
    clip = rng.random((8, 16, 16), dtype=np.float32)
    assert media.image_bytes(image, "png").startswith(b"\x89PNG")
    assert media.image_bytes(image, "jpeg").startswith(b"\xff\xd8")
    assert media.image_bytes(image, "webp")[8:12] == b"WEBP"
    assert media.gif_bytes(clip).startswith(b"GIF8")
    assert media.mp4_bytes(clip)[4:8] == b"ftyp"
    assert media.thumbnail_png(clip).startswith(b"\x89PNG")
    assert media.grid(rng.random((10, 16, 16)), rows=2).shape == (2 * 17 + 1, 5 * 17 + 1)
    with pytest.raises(ValueError, match="format"):
        media.image_bytes(image, "bmp")


def test_cli_generate_writes_png(tmp_path):
    from lesa_core.cli import main

    out = tmp_path / "seven.png"
    rc = main(
        [
            "generate",
            "--model",
            "digits-image",
            "--prompt",
            "a bold seven",
            "--seed",
            "3",
            "--steps",
            "4",
            "--guidance",
            "4",
            "--acceleration",
            "none",
            "--output",
            str(out),
        ]
    )
    assert rc == 0 and out.read_bytes().startswith(b"\x89PNG")


def test_cli_generate_edits_varies_and_animates_a_given_image(tmp_path, capsys):
    """`--image` as the API's uploads: a masked edit keeps the opaque pixels exactly, `--prompt ''`
    makes a variation, a video model starts its clip from the image; bad flags name themselves."""
    from PIL import Image

    from lesa_core.cli import main

    common = ["--steps", "8", "--acceleration", "none", "--scale", "1"]
    source = tmp_path / "one.png"
    assert main(["generate", "--prompt", "a handwritten one", "--seed", "1", *common, "--output", str(source)]) == 0
    one = np.asarray(Image.open(source))
    mask = np.zeros((16, 16, 4), np.uint8)
    mask[:, :4, 3] = 255  # keep the left strip, redraw the rest
    Image.fromarray(mask, mode="RGBA").save(tmp_path / "mask.png")
    edit, variation, clip = tmp_path / "seven.png", tmp_path / "variation.png", tmp_path / "clip.gif"
    args = ["--image", str(source), *common]
    assert main(["generate", "--prompt", "a handwritten seven", *args, "--mask", str(tmp_path / "mask.png"),
                 "--output", str(edit)]) == 0  # fmt: skip
    edited = np.asarray(Image.open(edit))
    assert np.array_equal(edited[:, :4], one[:, :4]) and not np.array_equal(edited, one)
    assert main(["generate", "--prompt", "", *args, "--seed", "5", "--output", str(variation)]) == 0
    varied = np.asarray(Image.open(variation)).astype(float)
    assert 0 < np.abs(varied - one).mean() < 60  # near the image (strength 0.5), not the image
    video = ["generate", "--model", "digits-video", "--prompt", "digit 1 moving right", *args]
    assert main([*video, "--output", str(clip)]) == 0
    first = np.asarray(Image.open(clip).convert("L"))
    assert np.abs(first.astype(int) - one).max() <= 1
    capsys.readouterr()
    for flags, message in (
        (["--mask", str(tmp_path / "mask.png")], "--mask and --strength need --image"),
        (["--image", str(tmp_path / "none.png")], f"--image {tmp_path / 'none.png'}: cannot read it"),
        (["--image", str(tmp_path / "mask.png"), "--mask", str(source)], "no alpha channel"),
        (["--image", str(source), "--strength", "2"], "--strength must be in 0..1"),
    ):
        assert main(["generate", "--prompt", "x", *common, *flags, "--output", str(tmp_path / "x.png")]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "text.png").write_text("not a picture")
    assert main(["generate", "--prompt", "x", "--image", str(tmp_path / "text.png"), "--output", str(edit)]) == 2
    assert "not an image Pillow can read" in capsys.readouterr().err
    assert main([*video, "--strength", "0.5", "--output", str(clip)]) == 2
    assert "a video model keeps --image as its first frame" in capsys.readouterr().err


def test_cli_generate_reports_user_errors(tmp_path, capsys):
    from lesa_core.cli import main

    rc = main(["generate", "--model", "digits-audio", "--prompt", "x", "--output", str(tmp_path / "x.png")])
    assert rc == 2 and "known models" in capsys.readouterr().err
    rc = main(["generate", "--prompt", "a one", "--steps", "2", "--output", str(tmp_path / "x.png")])
    assert rc == 2 and "--steps must be in" in capsys.readouterr().err


def test_cli_generate_refuses_what_the_pipeline_refuses_before_its_progress_bar(tmp_path, capsys):
    from lesa_core.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("digit 3\n")
    out = tmp_path / "gen"
    # (named by the flags typed, not the pipeline's argument names)
    for extra, says in ((["--guidance", "-1"], "--guidance must be a finite number >= 0, got -1.0"),
                        (["--steps", "101"], "--steps must be in 4..100, got 101"),
                        (["--size", "8x8"], "size 8x8 (width x height) not supported by digits-image"),
                        (["--frames", "3"], "--frames must be None for the image model digits-image")):  # fmt: skip
        rc = main(["generate", "--prompts", str(prompts), "--steps", "4", "--output", str(out), *extra])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # transformers may print a "Loading weights" bar before
        assert rc == 2 and last.startswith(f"lesa generate: error: {says}"), err
        assert "%|" not in last and "it/s" not in last and "step/s" not in err and "Traceback" not in err
        assert not out.exists()  # nor an output folder made for samples never generated


def test_a_failed_generate_removes_the_empty_folders_it_made_and_keeps_what_it_wrote(tmp_path, capsys, monkeypatch):
    from lesa_core.cli import main
    from lesa_models import media

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("digit 3\ndigit 4\n")
    encode, calls = media.image_bytes, []

    def interrupted_at(n):
        def image_bytes(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt  # Ctrl-C while the samples are written
            return encode(*args, **kwargs)

        return image_bytes

    out = tmp_path / "new" / "gen"
    monkeypatch.setattr(media, "image_bytes", interrupted_at(1))
    assert main(["generate", "--prompts", str(prompts), "--steps", "4", "--output", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # nothing written: both folders it made are gone
    calls.clear()
    monkeypatch.setattr(media, "image_bytes", interrupted_at(2))
    assert main(["generate", "--prompts", str(prompts), "--steps", "4", "--output", str(out)]) == 130
    assert [p.name for p in out.iterdir()] == ["000.png"]  # the sample written before stays, and its folder


def test_an_output_under_a_file_names_that_file(tmp_path, capsys):
    from lesa_core.cli import main

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for output in (a_file / "x.png", a_file / "sub" / "x.png"):
        assert main(["generate", "--prompt", "a one", "--steps", "4", "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert (
            err.strip().splitlines()[-1] == f"lesa generate: error: --output {output}: {a_file} is a file, not a folder"
        )


def test_cli_eval_writes_its_grid_in_the_format_its_name_says(tmp_path, capsys):
    """A still grid for an image model (PNG, JPEG, WEBP), an animated strip for a video model
    (GIF, MP4); a name whose format cannot hold what the model makes is refused before the work."""
    from PIL import Image

    from lesa_core.cli import main

    quick = ["--per-class", "1", "--steps", "4"]
    for model, name, fmt in (("digits-image", "g.jpg", "JPEG"), ("digits-video", "s.gif", "GIF")):
        assert main(["eval", "--model", model, *quick, "--grid", str(tmp_path / name)]) == 0
        assert Image.open(tmp_path / name).format == fmt
    for model, name in (("digits-image", "g.gif"), ("digits-video", "s.png"), ("digits-image", "g.txt")):
        capsys.readouterr()
        assert main(["eval", "--model", model, *quick, "--grid", str(tmp_path / name)]) != 0
        err = capsys.readouterr().err
        assert "--grid" in err.splitlines()[-1] and "Traceback" not in err and not (tmp_path / name).exists(), err


def test_cli_errors_are_one_line_naming_the_problem_never_a_traceback(tmp_path, capsys):
    from lesa_core.cli import main

    comments = tmp_path / "prompts.txt"
    comments.write_text("# only a comment\n\n")
    out = tmp_path / "gen"
    rc = main(["generate", "--prompts", str(comments), "--steps", "4", "--output", str(out)])
    assert rc == 2 and "no prompts" in capsys.readouterr().err and not out.exists()  # comments are not prompts
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    prompts = tmp_path / "ok.txt"
    prompts.write_text("digit 3\n")
    rc = main(["record", "--model", "digits-image", "--prompts", str(prompts), "--seeds", "0", "--steps", "4",
               "--out", str(a_file)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and f"--out {a_file}: {a_file} is a file, not a folder" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    fresh = tmp_path / "fresh" / "rec"  # refused before its first shard: no empty folders left behind
    rc = main(["record", "--model", "digits-image", "--prompts", str(prompts), "--seeds", "0", "--steps", "1",
               "--out", str(fresh)])  # fmt: skip
    assert rc != 0 and "Traceback" not in capsys.readouterr().err and not fresh.parent.exists()
    # outputs that cannot be written are found before the work, not after it (the samples were lost)
    for cmd in (["generate", "--prompt", "x", "--steps", "4", "--output", str(a_file / "x.png")],
                ["generate", "--prompts", str(prompts), "--steps", "4", "--output", str(a_file / "gen")],
                ["train-model", "digits-image", "--steps", "1", "--work-dir", str(tmp_path / "w"),
                 "--output", str(a_file / "model")]):  # fmt: skip
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert f"--output {a_file}" in err and "is a file, not a folder" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()
    # a bundle that would be ignored (no LESA level) is refused, not silently dropped
    for extra in (["--acceleration", "none"], ["--acceleration", "5x", "--method", "taylorseer"]):
        rc = main(["generate", "--prompt", "x", "--output", str(tmp_path / "p.png"), "--predictor", "b", *extra])
        assert rc == 2 and "--predictor is used by --method lesa" in capsys.readouterr().err
    assert main(["serve", "--port", "70000"]) == 1
    assert "invalid setting: port" in capsys.readouterr().err
    # Counts and sizes below 1 are refused by the parser, naming the flag.
    with pytest.raises(SystemExit) as exit_info:
        main(["record", "--model", "digits-image", "--prompts", str(prompts), "--seeds", "0", "--out", "x",
              "--shard-size", "0"])  # fmt: skip
    assert exit_info.value.code == 2 and "--shard-size: must be at least 1" in capsys.readouterr().err
    for flag in ("--lr", "--phase3-lr"):  # a learning rate of 0, below or NaN would train nothing, silently
        for bad in ("0", "-1e-4", "nan"):
            with pytest.raises(SystemExit) as exit_info:
                main(["train-predictor", "--model", "digits-image", "--data", "x", "--level", "5x", "--out", "y",
                      f"{flag}={bad}"])  # fmt: skip
            assert exit_info.value.code == 2 and f"{flag}: must be a number above 0" in capsys.readouterr().err
    # a damaged pipeline directory is named, whatever is wrong in it
    broken = tmp_path / "broken"
    shutil.copytree(Path(lesa_models.__file__).parent / "weights" / "digits-image", broken,
                    ignore=shutil.ignore_patterns("predictors"))  # fmt: skip
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    for damage in ("{", "[]", '{"transformer": ["diffusers", "Foo"]}', None):
        if damage is None:  # a truncated transformer
            weights.write_bytes(weights.read_bytes()[:1000])
        else:
            (broken / "model_index.json").write_text(damage)
        rc = main(["generate", "--model", str(broken), "--prompt", "x", "--output", str(tmp_path / "x.png")])
        err = capsys.readouterr().err
        assert rc == 2 and f"{broken}: not a usable DigitsPipeline directory" in err and "Traceback" not in err
    # ... and so are seeds no sampler takes, and an enlargement that would take the machine's memory
    for flag, value, says in (("--seed", "99999999999999999999", "--seed: must be 0 .."),
                              ("--scale", "100000", "--scale: must be at most 64")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", "--prompt", "x", "--output", str(tmp_path / "x.png"), flag, value])
        assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_cli_acceleration_levels(tmp_path, capsys):
    from lesa_core.cli import main

    out = tmp_path / "four.png"
    rc = main(
        [
            "generate",
            "--prompt",
            "a four",
            "--steps",
            "20",
            "--acceleration",
            "5x",
            "--method",
            "taylorseer",
            "--output",
            str(out),
        ]
    )
    assert rc == 0 and out.read_bytes().startswith(b"\x89PNG")
    rc = main(["generate", "--prompt", "a four", "--acceleration", "9x", "--output", str(out)])
    assert rc == 2 and "known levels" in capsys.readouterr().err


def test_cli_generate_video_gif_and_prompt_file(tmp_path):
    from lesa_core.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("digit 1 moving left\n\na two moving up\n")
    rc = main(
        [
            "generate",
            "--model",
            "digits-video",
            "--prompts",
            str(prompts),
            "--steps",
            "4",
            "--output",
            str(tmp_path / "clips" / "c.gif"),
        ]
    )
    assert rc == 0
    written = sorted((tmp_path / "clips").iterdir())
    assert [p.name for p in written] == ["c-000.gif", "c-001.gif"]
    assert all(p.read_bytes().startswith(b"GIF8") for p in written)


def test_train_model_resumes_only_under_the_same_recipe(tmp_path):
    from lesa_models.train import train

    work, out = tmp_path / "work", tmp_path / "out"
    train("digits-image", work_dir=work, output=out, steps=1, progress=False)
    assert (out / "model_index.json").is_file()
    with pytest.raises(ValueError, match="another recipe"):  # another --steps into the same work dir
        train("digits-image", work_dir=work, output=out, steps=2, progress=False)
    with pytest.raises(ValueError, match="holds a digits-image run with another recipe than this digits-video one"):
        train("digits-video", work_dir=work, output=out, steps=1, progress=False)
    # a damaged checkpoint is named, with what to do about it
    (ckpt,) = [p for p in work.iterdir() if p.is_dir()]
    (ckpt / "state.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"not a readable checkpoint .* remove it to resume from the one before"):
        train("digits-image", work_dir=work, output=out, steps=1, progress=False)
