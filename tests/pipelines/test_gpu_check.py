"""The prepared GPU check: its DPO path dry-run on CPU with the tiny base (the same code the
SD 1.5-size run takes), its refusals, and the SD 1.5 architecture it builds."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ml.diffusion import SD15_CONFIG, TINY_CONFIG, build_random_pipeline
from pipelines.gpu_check import main
from tests.ml.test_diffusion import shared_tiny_pipeline


def test_the_dpo_check_dry_runs_on_cpu_and_writes_its_figures(tmp_path, tmp_path_factory, capsys):
    shutil.copytree(shared_tiny_pipeline(tmp_path_factory), tmp_path / "tiny-sd15")
    out = tmp_path / "figures.jsonl"
    argv = ["--device", "cpu", "--checks", "dpo", "--dpo-base", "tiny", "--dpo-steps", "2"]
    assert main([*argv, "--work", str(tmp_path), "--out", str(out)]) == 0
    [line] = out.read_text().splitlines()
    figures = json.loads(line)
    assert figures["check"] == "dpo" and figures["steps"] == 2 and figures["tiny_model"]
    assert figures["s_per_step"] > 0 and figures["precision"] == "fp32"
    assert figures["resolution"] == TINY_CONFIG["resolution"]
    assert json.loads(capsys.readouterr().out.strip()) == figures


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the check")
def test_without_cuda_the_check_says_so_and_exits_2(tmp_path, capsys):
    assert main(["--checks", "dpo", "--work", str(tmp_path)]) == 2
    assert "needs a machine with a GPU" in capsys.readouterr().err


def test_unknown_checks_are_refused(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu", "--checks", "embed,render", "--work", str(tmp_path)])
    assert exit_info.value.code == 2


def test_the_sd15_architecture_is_sd15s():
    unet = SD15_CONFIG["unet"]
    assert unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert unet["cross_attention_dim"] == SD15_CONFIG["text_encoder"]["hidden_size"] == 768
    assert unet["sample_size"] * 8 == SD15_CONFIG["resolution"] == 512  # 8x VAE: 4 levels


def test_a_random_pipeline_is_marked_and_refuses_a_foreign_folder(tmp_path):
    small = {**TINY_CONFIG, "vae": {**TINY_CONFIG["vae"], "scaling_factor": 0.5}}
    folder = build_random_pipeline(tmp_path / "random", small, seed=1)
    marker = json.loads((folder / "imagegem.json").read_text())
    assert marker["random_init"] is True and "tiny_model" not in marker
    assert build_random_pipeline(folder, small, seed=1) == folder  # complete: kept as it is
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        build_random_pipeline(tmp_path / "other", small)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
