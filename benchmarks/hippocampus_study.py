"""GPU study: nnUNetTrainerSegMamba vs nnU-Net's default nnUNetTrainer on the 200 hippocampus cases.

Both train fold 0 for the same short budget on the same 70 % of the cases (nnU-Net's splits_final.json is
written from the SegMamba 70/10/20 split, so the default trainer never sees the 20 % test cases either), then
predict the test split with mirroring and are evaluated with the same code. Reported per trainer: Dice and HD95
per label, mean time per epoch, total training time, peak GPU memory of the training process.

    python benchmarks/hippocampus_study.py --data ../shared/data/hippocampus --work /tmp/hippo --epochs 5 \
        --out hippocampus_study.json

Prints a markdown table and writes JSON. Not a test: it needs a GPU and minutes.
"""
from __future__ import annotations

import argparse
import json
import os
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


def run_study(data: Path, work: Path, epochs: int, trainers: list[str], num_processes: int) -> dict:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import save_json

    from nnunet_segmamba.datasets import convert_hippocampus
    from nnunet_segmamba.training.commands import ext_trainer_folder
    from nnunet_segmamba.training.predict_test import predict_test_split
    from nnunet_segmamba.training.splits import load_or_create_split

    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(work / name)
        (work / name).mkdir(parents=True, exist_ok=True)
    env.update(nnUNet_extTrainer=ext_trainer_folder(), nnUNet_compile="f", PYTHONUNBUFFERED="1")
    env.setdefault("nnUNet_n_proc_DA", str(max(1, num_processes - 4)))
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
    # nnU-Net's default trainer reads fold 0 from splits_final.json: give it the same train/val cases
    save_json([{"train": split["train"], "val": split["val"]}], str(preprocessed / "splits_final.json"))

    results = {"dataset": raw.name, "cases": len(identifiers), "split": {k: len(v) for k, v in split.items()},
               "epochs": epochs, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "preprocess_seconds": round(preprocess_s, 1), "trainers": {}}
    for base in trainers:
        trainer = f"{base}_{epochs}epochs"
        fold = Path(env["nnUNet_results"]) / raw.name / f"{trainer}__nnUNetPlans__{CONFIG}" / "fold_0"
        t0 = time.time()
        if (fold / "checkpoint_final.pth").is_file():  # trained by an earlier run in this --work: only predict
            print(f"reusing {fold / 'checkpoint_final.pth'} (training time and peak memory are in that run's log)")
            out, train_s = "", float("nan")
        else:
            out = _nnunet("train", [str(DATASET_ID), CONFIG, "0", "-tr", trainer], env, report_peak_memory=True)
            train_s = time.time() - t0
        peak = [int(line.split()[1]) for line in out.splitlines() if line.startswith("PEAK_MEMORY_BYTES")]
        epoch_s = _epoch_seconds(fold / "checkpoint_final.pth")
        summary = predict_test_split(DATASET_ID, CONFIG, 0, trainer, device="cuda", num_processes=num_processes)
        results["trainers"][trainer] = {
            "train_seconds": round(train_s, 1),
            "epoch_seconds_mean": round(sum(epoch_s) / len(epoch_s), 2),
            "epoch_seconds": [round(e, 2) for e in epoch_s],
            "peak_memory_gib": round(peak[-1] / 2**30, 2) if peak else None,
            "test": {region: {m: summary["metrics"][region][m]["mean"] for m in ("dice", "hd95_mm")}
                     for region in summary["metrics"]},
            "test_cases": summary["num_cases"], "convention": summary["convention"],
        }
        print(json.dumps(results["trainers"][trainer], indent=2), flush=True)
    return results


def markdown(results: dict) -> str:
    regions = list(next(iter(results["trainers"].values()))["test"])
    head = "| trainer | " + " | ".join(f"Dice {r}" for r in regions) + " | " + \
           " | ".join(f"HD95 {r} (mm)" for r in regions) + " | s/epoch | peak GiB |"
    rows = [head, "|" + "---|" * (3 + 2 * len(regions))]
    for name, r in results["trainers"].items():
        rows.append(f"| {name} | " + " | ".join(f"{r['test'][g]['dice']:.4f}" for g in regions) + " | " +
                    " | ".join(f"{r['test'][g]['hd95_mm']:.2f}" for g in regions) +
                    f" | {r['epoch_seconds_mean']:.1f} | {r['peak_memory_gib']} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with images/ and labels/ (MSD Task04)")
    parser.add_argument("--work", type=Path, required=True, help="working folder for nnU-Net's three folders")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per trainer (the same for both)")
    parser.add_argument("--trainers", default="nnUNetTrainer,nnUNetTrainerSegMamba",
                        help="comma-separated trainer base names; '_<epochs>epochs' is appended")
    parser.add_argument("--num-processes", type=int, default=os.cpu_count() or 4, help="worker processes")
    parser.add_argument("--out", type=Path, default=Path("hippocampus_study.json"), help="JSON output")
    args = parser.parse_args()
    results = run_study(args.data.resolve(), args.work.resolve(), args.epochs, args.trainers.split(","),
                        args.num_processes)
    results["command"] = " ".join(sys.argv)
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
