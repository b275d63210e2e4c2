"""The demo at its default data size, with half its epochs: phantom -> convert-brats -> nnU-Net plan/preprocess ->
train -> predict the test split with mirroring -> evaluate -> report. About 4 minutes on 2 CPU cores; needs no data
and no GPU. The demo trainer is seeded (with the demo's --seed), so the run repeats exactly on the same machine and
software. Five epochs instead of the demo's ten keep CI's test time in budget; the pipeline is the same.

The trained model must work: every region's test Dice above a floor (docs/performance.md, "The demo on CPU": seed
1 scored 0.81 or more per region after these 5 epochs), and far above an untrained one (same architecture, fresh
initialisation, same predictor and evaluation, without the mirrored passes, which are 7 of its 8 forward passes and
which a comparison with a network that has learnt nothing does not need). The fast tests check the demo's terminal
output and failure message.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

NUM_CASES = 30  # the demo's default: 21 train, 3 validation, 6 test
EPOCHS = 5  # of the default 10
DICE_FLOOR = 0.75  # per region; seed 1 measured >= 0.81 at 5 epochs, an untrained model <= 0.14


def _untrained_checkpoint(fold_dir: Path) -> str:
    """checkpoint_final.pth with the network weights of a freshly initialised network of the same class."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_segmamba.training import trainers

    checkpoint = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    trainer_class = getattr(trainers, checkpoint["trainer_name"])
    plans = PlansManager(json.loads((fold_dir.parent / "plans.json").read_text()))
    dataset_json = json.loads((fold_dir.parent / "dataset.json").read_text())
    label_manager = plans.get_label_manager(dataset_json)
    torch.manual_seed(0)
    fresh = trainer_class.build_network_architecture(
        plans, plans.get_configuration(checkpoint["init_args"]["configuration"]),
        len(dataset_json["channel_names"]), label_manager.num_segmentation_heads, enable_deep_supervision=False)
    checkpoint["network_weights"] = fresh.state_dict()
    torch.save(checkpoint, fold_dir / "checkpoint_untrained.pth")
    return "checkpoint_untrained.pth"


def _mean_dice(summary: dict) -> dict[str, float]:
    return {region: m["dice"]["mean"] for region, m in summary["metrics"].items()}


@pytest.mark.slow
def test_short_demo_trains_predicts_evaluates_and_beats_an_untrained_model(tmp_path):
    from nnunet_segmamba.demo import DEMO_DATASET_ID, DEMO_TRAINER, run_demo
    from nnunet_segmamba.training.prediction import predict_test_split

    result = run_demo(tmp_path / "demo", num_cases=NUM_CASES, shape=(48, 48, 48), epochs=EPOCHS, device="cpu",
                      threads=2, seed=1)
    summary = result["summary"]
    assert summary["num_cases"] == 6
    assert set(summary["metrics"]) == {"whole tumor", "tumor core", "enhancing tumor"}
    report = Path(result["report_png"])
    assert report.is_file() and report.stat().st_size > 20_000  # a real figure, not an empty canvas
    assert json.loads((tmp_path / "demo" / "demo_result.json").read_text())["trainer"] == DEMO_TRAINER
    prediction_folder = Path(summary["prediction_folder"])
    assert len(list(prediction_folder.glob("*.nii.gz"))) == 6
    assert (prediction_folder / "evaluation" / "metrics_per_case.csv").is_file()

    trained = _mean_dice(summary)
    untrained_checkpoint = _untrained_checkpoint(prediction_folder.parent)
    untrained = _mean_dice(predict_test_split(DEMO_DATASET_ID, "3d_fullres", 0, DEMO_TRAINER, device="cpu",
                                              use_mirroring=False, checkpoint_name=untrained_checkpoint,
                                              num_processes=1))
    print(f"test Dice trained {trained}\n          untrained {untrained}")
    for region, value in trained.items():
        assert value > DICE_FLOOR, f"{region}: test Dice {value:.3f} <= {DICE_FLOOR} (all regions: {trained})"
    margin = sum(trained.values()) / 3 - sum(untrained.values()) / 3
    assert margin > 0.3, f"trained {trained} vs untrained {untrained}: mean Dice margin {margin:.3f}"


def test_failed_step_prints_the_log_tail_and_names_the_log(tmp_path, capsys):
    from nnunet_segmamba.demo import DemoStepFailed, _run

    log = tmp_path / "nnunet.log"
    with pytest.raises(DemoStepFailed, match=str(log)) as info:
        _run(["sh", "-c", "for i in $(seq 40); do echo line $i; done; exit 3"], {"PATH": "/usr/bin:/bin"}, log)
    assert isinstance(info.value, ValueError)  # the command line reports it as one line, no traceback
    assert "exit code 3" in str(info.value)
    out = capsys.readouterr()
    assert "line 40" in out.err and "line 10\n" not in out.err  # the last 30 lines, on stderr
    assert "line 1\n" not in out.out  # the command's own output went to the log only
    assert "line 1\n" in log.read_text()


def test_training_progress_prints_one_line_per_epoch(capsys):
    from nnunet_segmamba.demo import _TrainingProgress

    progress = _TrainingProgress(epochs=11)
    for line in ["2026-12-01 15:25:39.064524: Epoch 2", "2026-12-01 15:25:39.1: Current learning rate: 0.08",
                 "2026-12-01 15:25:59.1: train_loss -0.5262", "2026-12-01 15:25:59.2: val_loss -0.3",
                 "2026-12-01 15:25:59.3: Pseudo dice [np.float32(0.8912), np.float32(0.0), np.float32(0.5)]",
                 "2026-12-01 15:25:59.5: Epoch time: 20.33 s", "2026-12-01 15:29:00.1: predicting case_1"]:
        progress(line)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "  epoch 3/11  train_loss -0.526  val_loss -0.300  pseudo Dice 0.89 0.00 0.50  (20 s)"
    assert "validation" in lines[1] and len(lines) == 2


def test_fingerprint_extractor_draws_fewer_samples_and_leaves_nnunets_alone(tmp_path, monkeypatch):
    import numpy as np
    import SimpleITK as sitk
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    from nnunet_segmamba.demo import extract_fingerprint

    raw = tmp_path / "raw" / "Dataset998_Fingerprint"
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 4, 4), np.float32)), str(raw / "imagesTr" / "c_0000.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 4, 4), np.uint8)), str(raw / "labelsTr" / "c.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1},
                                                  "numTraining": 1, "file_ending": ".nii.gz"}))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    draws = []

    def run(self, overwrite_existing=False):  # records what the extractor would draw, without the worker pool
        draws.append(self.num_foreground_voxels_for_intensitystats)
        return {}

    monkeypatch.setattr(DatasetFingerprintExtractor, "run", run)
    extract_fingerprint(998, num_processes=1, intensity_samples=1234)
    assert draws == [1234]
    assert DatasetFingerprintExtractor(998, 1).num_foreground_voxels_for_intensitystats > 1234


def test_cpu_scan_build_starts_early_only_where_training_uses_it_and_training_waits_for_it(monkeypatch, capsys):
    import threading

    from nnunet_segmamba import demo
    from nnunet_segmamba.ssm import cpu_scan, dispatch

    built = threading.Event()
    monkeypatch.setattr(cpu_scan, "cpu_scan_status", lambda: built.set() or (True, ""))
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert demo._build_cpu_scan_in_background("cuda") is None
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")  # the trainer's CPU scans will be torch's: nothing to build
    demo._build_cpu_scan_in_background("cpu").join(timeout=10)
    assert not built.is_set()
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")  # the trainer reports it; the early build stays quiet
    demo._build_cpu_scan_in_background("cpu").join(timeout=10)
    assert not built.is_set()
    for setting in ("auto", "triton"):  # "triton" names the GPU's kernels; CPU tensors still get the fused scan
        built.clear()
        monkeypatch.setenv(dispatch.ENV_VAR, setting)
        demo._build_cpu_scan_in_background("cpu").join(timeout=10)
        assert built.is_set(), setting

    release = threading.Event()  # a build still running when training starts: the demo waits for it, and says so
    build = threading.Thread(target=release.wait, args=(10,))
    build.start()
    threading.Timer(0.2, release.set).start()
    demo._wait_for(build)
    assert not build.is_alive()
    assert "waiting for the fused CPU scan's first build" in capsys.readouterr().out
    demo._wait_for(build)  # finished: nothing to say
    assert capsys.readouterr().out == ""
