"""GPU study: nnUNetTrainerSegMamba vs nnU-Net's default nnUNetTrainer (and the no-Mamba ablation) on the 200
hippocampus cases.

All train fold 0 for the same short budget on the same 70 % of the cases (nnU-Net's splits_final.json is
written from the SegMamba 70/10/20 split, so the default trainer never sees the 20 % test cases either), then
predict the test split with mirroring and are evaluated with the same code. Reported per trainer: Dice and HD95
per label, time per epoch (mean, and the median of epochs 2+, which leaves out the first epoch's compile and
warm-up), total training time, peak GPU memory of the training process. `--compile default` (the default) leaves
nnUNet_compile unset, so every trainer compiles as it does for a user (nnU-Net's rule: on CUDA); `--compile off`
sets nnUNet_compile=f for all of them.

    python -m benchmarks.hippocampus_study --data ../shared/data/hippocampus --work /tmp/hippo --epochs 5 \
        --out hippocampus_study.json

Multi-GPU: `--num-gpus 2` trains with `nnUNetv2_train ... -num_gpus 2` (nnU-Net's DDP), and
`--device-check N` then predicts the first N test cases with the trained checkpoint on one GPU (fp16 autocast,
the CUDA scan) and on the CPU (float32, the PyTorch scan) and reports how far the two results are apart.

Prints a markdown table and writes JSON, with each trainer's training log copied beside it. Not a test: it needs
a GPU and minutes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATASET_ID = 4
CONFIG = "3d_fullres"
ENTRY = {"plan": "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:plan_and_preprocess_entry",
         "train": "nnunetv2.run.run_training:run_training_entry"}


def _nnunet(entry: str, args: list[str], env: dict, report_peak_memory: bool = False) -> str:
    """Run one of nnU-Net's entry points in a fresh interpreter; returns its output (also streamed)."""
    module, func = ENTRY[entry].split(":")
    code = (f"import sys, torch; sys.argv = {['nnUNetv2_' + entry] + args!r}; "
            f"from {module} import {func}; {func}()")
    if report_peak_memory:
        code += "; print('PEAK_MEMORY_BYTES', torch.cuda.max_memory_allocated(), flush=True)"
    print("$ nnUNetv2_" + entry + " " + " ".join(args), flush=True)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    if proc.wait() != 0:
        raise RuntimeError(f"nnUNetv2_{entry} {' '.join(args)} failed with exit code {proc.returncode}")
    return "".join(lines)


def _epoch_seconds(checkpoint: Path) -> list[float]:
    import torch

    log = torch.load(checkpoint, map_location="cpu", weights_only=False)["logging"]
    return [e - s for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])]


def compare_devices(model_folder: Path, fold: int, trainer: str, cases: dict[str, dict],
                    devices=("cuda", "cpu")) -> dict:
    """Predict `cases` (identifier -> nnU-Net's {"images", "label"}) with the same checkpoint on each device.

    nnU-Net's predictor as `nnUNetv2_predict` runs it (sliding window, Gaussian weighting, mirror TTA; autocast
    on CUDA). Returns per case the largest and mean absolute difference of the class probabilities between the
    first device and each other one, the fraction of voxels labelled differently, the per-label Dice between
    the two segmentations, and each device's Dice against the ground truth.
    """
    import SimpleITK as sitk
    import numpy as np

    from nnunet_segmamba.evaluation.metrics import dice
    from nnunet_segmamba.training.prediction import trained_predictor

    ids = list(cases)
    results, seconds = {}, {}
    for device in devices:
        predictor = trained_predictor(model_folder, fold, trainer, device)
        t0 = time.time()
        results[device] = predictor.predict_from_files([cases[i]["images"] for i in ids], None,
                                                       save_probabilities=True, num_processes_preprocessing=2,
                                                       num_processes_segmentation_export=2)
        seconds[device] = round(time.time() - t0, 1)
        print(f"predicted {len(ids)} cases on {device} in {seconds[device]} s", flush=True)

    labels = range(1, results[devices[0]][0][1].shape[0])
    reference, per_case = devices[0], {}
    for k, case in enumerate(ids):
        gt = sitk.GetArrayFromImage(sitk.ReadImage(cases[case]["label"]))
        seg_ref, prob_ref = results[reference][k]
        row = {f"dice_gt_{reference}": {c: dice(seg_ref == c, gt == c) for c in labels}}
        for other in devices[1:]:
            seg, prob = results[other][k]
            diff = np.abs(prob.astype(np.float64) - prob_ref.astype(np.float64))
            row[f"dice_gt_{other}"] = {c: dice(seg == c, gt == c) for c in labels}
            row[f"{reference}_vs_{other}"] = {
                "max_abs_prob_diff": float(diff.max()), "mean_abs_prob_diff": float(diff.mean()),
                "voxels_differing": float((seg != seg_ref).mean()),
                "dice_between": {c: dice(seg == c, seg_ref == c) for c in labels}}
        per_case[case] = row
    return {"devices": list(devices), "seconds": seconds, "cases": per_case}


def prepare_dataset(data: Path, work: Path, num_processes: int, compile_mode: str = "default") -> dict:
    """nnU-Net's three folders under `work`, the hippocampus cases converted, planned and preprocessed there (once
    per `work`), and fold 0 of the 70/10/20 split written as nnU-Net's splits_final.json too, so that nnU-Net's
    own trainers train on the same cases. Points this process's nnUNet_* variables there and returns the
    environment for nnU-Net's commands, the raw and preprocessed dataset folders, the split and the seconds the
    preprocessing took."""
    from batchgenerators.utilities.file_and_folder_operations import save_json

    from nnunet_segmamba.data.hippocampus import convert_hippocampus
    from nnunet_segmamba.training.ext_trainers import ext_trainer_folder
    from nnunet_segmamba.training.splits import load_or_create_split

    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(work / name)
        (work / name).mkdir(parents=True, exist_ok=True)
    env.update(nnUNet_extTrainer=ext_trainer_folder(), PYTHONUNBUFFERED="1")
    if compile_mode == "off":
        env["nnUNet_compile"] = "f"
    else:  # as a user runs it: nnU-Net's rule (and our trainers') decides
        env.pop("nnUNet_compile", None)
    env.setdefault("nnUNet_n_proc_DA", str(max(1, num_processes - 4)))
    # NVLink multicast (NVLS) off: some virtualised multi-GPU hosts do not support it
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})

    raw = Path(env["nnUNet_raw"]) / f"Dataset{DATASET_ID:03d}_Hippocampus"
    preprocessed = Path(env["nnUNet_preprocessed"]) / raw.name
    t0 = time.time()
    if not (preprocessed / "nnUNetPlans.json").is_file():  # a second run in the same --work reuses it
        convert_hippocampus(data, env["nnUNet_raw"], DATASET_ID)
        _nnunet("plan", ["-d", str(DATASET_ID), "-c", CONFIG, "-np", str(num_processes),
                         "--verify_dataset_integrity"], env)
    preprocess_s = time.time() - t0
    identifiers = sorted(p.name[: -len("_0000.nii.gz")] for p in (raw / "imagesTr").glob("*_0000.nii.gz"))
    split = load_or_create_split(str(preprocessed), identifiers, 0)
    save_json([{"train": split["train"], "val": split["val"]}], str(preprocessed / "splits_final.json"))
    return {"env": env, "raw": raw, "preprocessed": preprocessed, "split": split, "preprocess_seconds": preprocess_s}


def copy_training_log(fold: Path, out_json: Path | None, trainer: str) -> str | None:
    """The fold's latest nnU-Net training log, copied next to the JSON as <json stem>_log_<trainer>.txt (the epoch
    times can be checked against it, also for a trainer whose entry a time limit cut short); its file name, or
    None without a JSON or a log."""
    logs = list(fold.glob("training_log_*.txt"))
    if out_json is None or not logs:
        return None
    destination = out_json.with_name(f"{out_json.stem}_log_{trainer}.txt")
    shutil.copyfile(max(logs, key=lambda log: log.stat().st_mtime), destination)
    return destination.name


def run_study(data: Path, work: Path, epochs: int, trainers: list[str], num_processes: int, num_gpus: int = 1,
              device_check_cases: int = 0, compile_mode: str = "default", out_json: Path | None = None) -> dict:
    """Preprocess (once per `work`), train and evaluate each trainer in turn; the results so far are
    written to `out_json` after each trainer's training and again after its test evaluation, so a run stopped by
    a time limit keeps what it finished (a trainer stopped during its prediction has `"test": None`)."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_segmamba.training.prediction import predict_test_split

    prepared = prepare_dataset(data, work, num_processes, compile_mode)
    env, raw, split = prepared["env"], prepared["raw"], prepared["split"]
    results = {"dataset": raw.name, "cases": sum(len(v) for v in split.values()),
               "split": {k: len(v) for k, v in split.items()}, "epochs": epochs,
               "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "num_gpus": num_gpus, "gpus_visible": torch.cuda.device_count(), "compile": compile_mode,
               "preprocess_seconds": round(prepared["preprocess_seconds"], 1), "trainers": {}}

    def save() -> None:
        if out_json is not None:
            out_json.write_text(json.dumps(results, indent=2))

    for base in trainers:
        trainer = f"{base}_{epochs}epochs"
        fold = Path(env["nnUNet_results"]) / raw.name / f"{trainer}__nnUNetPlans__{CONFIG}" / "fold_0"
        t0 = time.time()
        if (fold / "checkpoint_final.pth").is_file():  # trained by an earlier run in this --work: only predict
            print(f"reusing {fold / 'checkpoint_final.pth'} (training time and peak memory are in that run's log)")
            out, train_s = "", float("nan")
        else:
            gpus = ["-num_gpus", str(num_gpus)] if num_gpus > 1 else []
            # with DDP the ranks are spawned processes: the parent's peak memory says nothing, so none is reported
            out = _nnunet("train", [str(DATASET_ID), CONFIG, "0", "-tr", trainer] + gpus, env,
                          report_peak_memory=num_gpus == 1)
            train_s = time.time() - t0
        peak = [int(line.split()[1]) for line in out.splitlines() if line.startswith("PEAK_MEMORY_BYTES")]
        backend = [line.split("SegMamba scan backend: ", 1)[1] for line in out.splitlines()
                   if "SegMamba scan backend: " in line]  # the trainer's log line (not nnU-Net's trainers)
        epoch_s = _epoch_seconds(fold / "checkpoint_final.pth")
        entry = results["trainers"][trainer] = {
            "train_seconds": round(train_s, 1),
            "epoch_seconds_mean": round(sum(epoch_s) / len(epoch_s), 2),
            "epoch_seconds_median_after_first": round(statistics.median(epoch_s[1:]), 2) if len(epoch_s) > 1 else None,
            "epoch_seconds": [round(e, 2) for e in epoch_s],
            "peak_memory_gib": round(peak[-1] / 2**30, 2) if peak else None,
            "scan_backend": backend[-1] if backend else None,
            "test": None, "test_cases": None, "convention": None,
            "training_log": copy_training_log(fold, out_json, trainer),
        }
        save()  # a run stopped during the prediction keeps the training figures
        summary = predict_test_split(DATASET_ID, CONFIG, 0, trainer, device="cuda", num_processes=num_processes)
        entry.update(test={region: {m: summary["metrics"][region][m]["mean"] for m in ("dice", "hd95_mm")}
                           for region in summary["metrics"]},
                     test_cases=summary["num_cases"], convention=summary["convention"])
        if device_check_cases:
            from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

            files = get_filenames_of_train_images_and_targets(str(raw), load_json(str(raw / "dataset.json")))
            cases = {i: files[i] for i in split["test"][:device_check_cases]}
            entry["device_check"] = compare_devices(fold.parent, 0, trainer, cases)
        print(json.dumps(entry, indent=2), flush=True)
        save()
    return results


def markdown(results: dict) -> str:
    """The study's table; "-" for the test figures of a trainer whose test evaluation did not finish."""
    regions = next((list(r["test"]) for r in results["trainers"].values() if r.get("test")), [])
    head = (["trainer"] + [f"Dice {r}" for r in regions] + [f"HD95 {r} (mm)" for r in regions]
            + ["s/epoch (mean)", "s/epoch (median of 2+)", "peak GiB"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def metric(r: dict, region: str, name: str, digits: int) -> str:
        return f"{r['test'][region][name]:.{digits}f}" if r.get("test") else "-"

    for name, r in results["trainers"].items():
        cells = ([metric(r, g, "dice", 4) for g in regions] + [metric(r, g, "hd95_mm", 2) for g in regions]
                 + [f"{r['epoch_seconds_mean']:.1f}", str(r.get("epoch_seconds_median_after_first")),
                    str(r["peak_memory_gib"])])
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, r in results["trainers"].items():
        if "device_check" not in r:
            continue
        check = r["device_check"]
        ref, others = check["devices"][0], check["devices"][1:]
        rows += ["", f"{name}: the same checkpoint predicted on {' and '.join(check['devices'])} "
                     f"({', '.join(f'{d} {s} s' for d, s in check['seconds'].items())})", "",
                 "| case | pair | max abs prob diff | voxels differing | Dice between | Dice vs GT |",
                 "|---|---|---|---|---|---|"]
        for case, c in check["cases"].items():
            for other in others:
                pair = c[f"{ref}_vs_{other}"]
                rows.append(f"| {case} | {ref} vs {other} | {pair['max_abs_prob_diff']:.2e} | "
                            f"{pair['voxels_differing']:.2e} | "
                            + ", ".join(f"{v:.4f}" for v in pair["dice_between"].values()) + " | "
                            + " / ".join(", ".join(f"{v:.4f}" for v in c[f"dice_gt_{d}"].values())
                                         for d in (ref, other)) + " |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with images/ and labels/ (MSD Task04)")
    parser.add_argument("--work", type=Path, required=True, help="working folder for nnU-Net's three folders")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per trainer (the same for all)")
    parser.add_argument("--trainers", default="nnUNetTrainer,nnUNetTrainerSegMamba,nnUNetTrainerSegMambaNoMamba",
                        help="comma-separated trainer base names; '_<epochs>epochs' is appended")
    parser.add_argument("--num-processes", type=int, default=os.cpu_count() or 4, help="worker processes")
    parser.add_argument("--num-gpus", type=int, default=1, help="nnUNetv2_train -num_gpus (DDP when > 1)")
    parser.add_argument("--device-check", type=int, default=0, metavar="N",
                        help="predict the first N test cases on one GPU and on the CPU and compare the results")
    parser.add_argument("--compile", choices=("default", "off"), default="default",
                        help="default: nnUNet_compile unset (compiled on CUDA, as for a user); off: nnUNet_compile=f")
    parser.add_argument("--out", type=Path, default=Path("hippocampus_study.json"), help="JSON output")
    args = parser.parse_args()
    # checked first: the test evaluation (MONAI's distances) runs only after minutes of training
    missing = [m for m in ("nnunetv2", "SimpleITK", "monai") if importlib.util.find_spec(m) is None]
    if missing:
        parser.error(f"{', '.join(missing)} not importable: install the package's dependencies "
                     f"(pip install -e .) in this environment first")
    results = run_study(args.data.resolve(), args.work.resolve(), args.epochs, args.trainers.split(","),
                        args.num_processes, args.num_gpus, args.device_check, args.compile, args.out)
    results["command"] = " ".join(sys.argv)
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
