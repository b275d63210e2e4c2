"""`nnunet-segmamba demo`: the whole job end to end on a machine with no data and no GPU.

Steps, each through the same entry points a user runs:
    1. a synthetic BraTS-like phantom folder (4 channels, nested WT/TC/ET, noise and bias; `data.phantom`)
       -- or `--dataset PATH` to use a real nnU-Net raw dataset instead;
    2. `convert-brats` into an nnU-Net raw dataset with WT/TC/ET regions;
    3. `nnUNetv2_plan_and_preprocess` (3d_fullres);
    4. `nnUNetv2_train ... -tr nnUNetTrainerSegMamba_demo` (a small budget, see trainers.py);
    5. prediction of the held-out 20 % test split with mirror test-time augmentation, and evaluation;
    6. a report: the metrics table and `report.png` with image / ground truth / prediction overlays.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEMO_DATASET_ID = 990
DEMO_TRAINER = "nnUNetTrainerSegMamba_demo"


def _step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def nnunet_command(name: str) -> str:
    """Path of one of nnU-Net's console scripts: beside the running interpreter (a virtualenv that is not
    activated), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} or on PATH; install nnunetv2 (>= 2.8) "
                                f"into this environment")
    return found


def _run(cmd: list[str], env: dict) -> None:
    """Run an nnU-Net command, streaming its output; a failure stops the demo with the command in the message."""
    cmd = [nnunet_command(cmd[0])] + cmd[1:]
    print("$ " + " ".join(cmd), flush=True)
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {result.returncode} (its output is above)")


def nnunet_environment(work_dir: Path, threads: int) -> dict:
    """Environment for nnU-Net's commands: its three folders under work_dir, our trainers, CPU-friendly settings."""
    from nnunet_segmamba.training.ext_trainers import ext_trainer_folder

    env = dict(os.environ)
    for name, sub in (("nnUNet_raw", "nnUNet_raw"), ("nnUNet_preprocessed", "nnUNet_preprocessed"),
                      ("nnUNet_results", "nnUNet_results")):
        env[name] = str(work_dir / sub)
        (work_dir / sub).mkdir(parents=True, exist_ok=True)
    env["nnUNet_extTrainer"] = ext_trainer_folder()
    env["nnUNet_compile"] = "f"  # never compile on CPU: compiling the validation step alone costs minutes
    env.setdefault("nnUNet_def_n_proc", str(threads))
    # Augmentation runs in the training process: with background workers on a 2-core machine the scan's many
    # small operations wait on descheduled threads and a step gets 5-50x slower.
    env.setdefault("nnUNet_n_proc_DA", "0")
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_demo(output_dir: str | os.PathLike = "demo_output", dataset: str | os.PathLike | None = None,
             num_cases: int = 30, shape: tuple[int, int, int] = (48, 48, 48), epochs: int | None = None,
             device: str = "auto", threads: int | None = None, seed: int = 0, keep: bool = False) -> dict:
    """Run the demo; returns {"summary": evaluation summary, "report_png": path, "seconds": wall time}.

    Args:
        output_dir: everything goes here (nnU-Net's raw / preprocessed / results folders included).
        dataset: an existing nnU-Net raw dataset folder (DatasetNNN_Name with imagesTr, labelsTr, dataset.json);
            None generates the phantom.
        num_cases: phantom cases (70 % train, 10 % validation, 20 % test).
        shape: phantom volume size in voxels (1 mm spacing).
        epochs: training epochs of the demo trainer (None: its default); passed as NNUNET_SEGMAMBA_DEMO_EPOCHS.
        device: "cpu", "cuda" or "auto".
        threads: CPU threads for torch and nnU-Net's workers (default: all cores).
        seed: phantom seed.
        keep: keep an existing output_dir's contents instead of starting from scratch.
    """
    import torch

    from nnunet_segmamba.data.brats import convert_brats
    from nnunet_segmamba.data.phantom import make_brats_phantom_folder
    from nnunet_segmamba.training.prediction import predict_test_split

    start = time.time()
    if num_cases < 10:
        raise ValueError(f"num_cases={num_cases} is too few for a 70/10/20 split with a test set; use 10 or more")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = threads or os.cpu_count() or 1
    work_dir = Path(output_dir).resolve()
    if work_dir.exists() and not keep:
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    env = nnunet_environment(work_dir, threads)
    if epochs is not None:
        env["NNUNET_SEGMAMBA_DEMO_EPOCHS"] = str(int(epochs))
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})

    if dataset is None:
        _step(f"1/6 phantom: {num_cases} synthetic brain-tumour cases of {'x'.join(map(str, shape))} voxels")
        source = make_brats_phantom_folder(work_dir / "brats_phantom", num_cases=num_cases, shape=shape, seed=seed)
        _step("2/6 convert-brats -> nnU-Net raw dataset (regions WT, TC, ET)")
        raw = convert_brats(source, DEMO_DATASET_ID, dataset_name="SegMambaDemo", out_root=env["nnUNet_raw"],
                            num_processes=threads, overwrite=True)
    else:
        _step(f"1-2/6 using the nnU-Net raw dataset {dataset}")
        raw = Path(env["nnUNet_raw"]) / Path(dataset).name
        if not raw.exists():
            shutil.copytree(dataset, raw)
    dataset_name = raw.name
    dataset_id = int(dataset_name[len("Dataset"):len("Dataset") + 3])

    _step("3/6 nnU-Net planning and preprocessing (3d_fullres)")
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0
    _run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "3d_fullres", "-np", str(threads),
          "-npfp", str(threads), "--verify_dataset_integrity"], {**env, "nnUNet_n_proc_DA": "1"})

    _step(f"4/6 training {DEMO_TRAINER} on the 70 % training split ({device})")
    _run(["nnUNetv2_train", str(dataset_id), "3d_fullres", "0", "-tr", DEMO_TRAINER, "-device", device], env)

    _step("5/6 predicting the 20 % test split with mirror TTA, and evaluating")
    torch.set_num_threads(threads)
    summary = predict_test_split(dataset_id, "3d_fullres", 0, DEMO_TRAINER, device=device,
                                 num_processes=min(threads, 2))

    _step("6/6 report")
    report_png = work_dir / "report.png"
    write_overlay_figure(raw, Path(summary["prediction_folder"]), report_png)
    seconds = time.time() - start
    result = {"summary": summary, "report_png": str(report_png), "seconds": round(seconds, 1),
              "dataset": dataset_name, "trainer": DEMO_TRAINER, "device": device}
    with open(work_dir / "demo_result.json", "w") as f:
        json.dump(result, f, indent=2)
    print(_metrics_table(summary))
    print(f"\nfigure: {report_png}\nall results: {work_dir}\ntook {seconds / 60:.1f} min")
    return result


def _metrics_table(summary: dict) -> str:
    lines = [f"\nTest split, {summary['num_cases']} cases, convention '{summary['convention']}':",
             f"{'region':<18}{'Dice':>10}{'HD95 (mm)':>12}{'NSD':>10}"]
    for region, m in summary["metrics"].items():
        lines.append(f"{region:<18}{m['dice']['mean']:>10.3f}{m['hd95_mm']['mean']:>12.2f}{m['nsd']['mean']:>10.3f}")
    return "\n".join(lines)


def write_overlay_figure(raw_dataset: Path, prediction_folder: Path, out_png: Path, max_cases: int = 4) -> None:
    """One row per test case: the first channel, then ground truth and prediction as coloured overlays, on the
    axial slice with the most foreground in the ground truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import SimpleITK as sitk
    from matplotlib.colors import ListedColormap

    dataset_json = json.loads((raw_dataset / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    cases = sorted(p.name[: -len(ending)] for p in prediction_folder.glob(f"*{ending}"))[:max_cases]
    if not cases:
        raise FileNotFoundError(f"no predictions ({ending}) in {prediction_folder}")
    foreground = {k: v for k, v in dataset_json["labels"].items() if k != "background"}
    if "regions_class_order" in dataset_json:
        # region datasets: nnU-Net paints region i with regions_class_order[i], later regions on top
        label_names = {int(v): f"in {name}" for name, v in zip(foreground, dataset_json["regions_class_order"])}
    else:
        label_names = {int(v): name for name, v in foreground.items()}
    colours = ListedColormap(["none", "#2ca02c", "#ffdd00", "#d62728", "#1f77b4", "#9467bd", "#8c564b"])

    fig, axes = plt.subplots(len(cases), 3, figsize=(9, 3 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases):
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(raw_dataset / "imagesTr" / f"{case}_0000{ending}")))
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(raw_dataset / "labelsTr" / f"{case}{ending}")))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction_folder / f"{case}{ending}")))
        z = int(np.argmax((gt > 0).reshape(gt.shape[0], -1).sum(1)))
        for ax, overlay, title in zip(row, (None, gt, pred), ("image (channel 0)", "ground truth", "prediction")):
            ax.imshow(image[z], cmap="gray")
            if overlay is not None:
                ax.imshow(np.ma.masked_equal(overlay[z], 0), cmap=colours, vmin=0, vmax=colours.N - 1,
                          alpha=0.6, interpolation="nearest")
            ax.set_title(f"{case} z={z}: {title}", fontsize=8)
            ax.axis("off")
    legend = ", ".join(f"{i} {n}" for i, n in sorted(label_names.items()))
    fig.suptitle(f"Test-split predictions. Labels: {legend} (innermost region wins). "
                 f"Colours: 1 green, 2 yellow, 3 red", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the whole job end to end on a synthetic BraTS-like dataset (CPU, minutes)",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="demo_output", help="working and output folder (default: demo_output)")
    parser.add_argument("--dataset", default=None,
                        help="an nnU-Net raw dataset folder to use instead of the generated phantom")
    parser.add_argument("--num-cases", type=int, default=30, help="phantom cases (default: 30)")
    parser.add_argument("--size", type=int, default=48, help="phantom volume edge in voxels (default: 48)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo trainer's)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="training device")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default: 0)")
    parser.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    run_demo(args.output, dataset=args.dataset, num_cases=args.num_cases, shape=(args.size,) * 3,
             epochs=args.epochs, device=args.device, threads=args.threads, seed=args.seed)
    return 0

