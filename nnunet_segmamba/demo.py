"""`nnunet-segmamba demo`: the whole job end to end on a machine with no data and no GPU.

Steps, each through the same entry points a user runs:
    1. a synthetic BraTS-like phantom folder (4 channels, nested WT/TC/ET, noise and bias; `data.phantom`)
       -- or `--dataset PATH` to use a real nnU-Net raw dataset instead;
    2. `convert-brats` into an nnU-Net raw dataset with WT/TC/ET regions;
    3. `nnUNetv2_plan_and_preprocess` (3d_fullres; for the phantom, the fingerprint is extracted first with
       fewer intensity draws, `extract_fingerprint`);
    4. `nnUNetv2_train ... -tr nnUNetTrainerSegMamba_demo` (a small budget, see trainers.py);
    5. prediction of the held-out 20 % test split with mirror test-time augmentation, and evaluation;
    6. a report: the metrics table and `report.png` with image / ground truth / prediction overlays.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from nnunet_segmamba.devices import resolve_device
from nnunet_segmamba.errors import UserError

DEMO_DATASET_ID = 990
DEMO_TRAINER = "nnUNetTrainerSegMamba_demo"


def _step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def _build_cpu_scan_in_background(device: str) -> threading.Thread | None:
    """Resolve the CPU scan backend in a thread, as the trainer will: where that is the fused CPU scan, this compiles
    its extension (or loads the cached build), so that its first build, 35-50 s of one core, runs beside the
    phantom and nnU-Net's planning instead of at the start of training. The trainer's process then loads the build
    from torch's extension cache (torch's build lock makes it wait for a build in progress). None for a GPU run."""
    if device != "cpu":
        return None
    import torch

    from nnunet_segmamba.ssm import dispatch

    def resolve() -> None:
        try:
            dispatch.resolve("auto", torch.device("cpu"))
        except Exception:  # e.g. a bad $NNUNET_SEGMAMBA_SCAN_BACKEND: the trainer resolves again and reports it
            pass

    build = threading.Thread(target=resolve, name="cpu-scan-build", daemon=True)
    build.start()
    return build


def _wait_for(build: threading.Thread | None) -> None:
    if build is None or not build.is_alive():
        return
    print("  waiting for the fused CPU scan's first build (once per machine and torch version) ...", flush=True)
    start = time.time()
    build.join()
    print(f"  built in another {time.time() - start:.0f} s", flush=True)


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


class DemoStepFailed(UserError, RuntimeError):
    """An nnU-Net command of the demo failed; the message names its log file (also a RuntimeError, which it was
    before)."""


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    return "\n".join(text[-lines:])


def _run(cmd: list[str], env: dict, log_path: Path, on_line=None) -> None:
    """Run an nnU-Net command with its output (plans, notices, per-epoch logs) going to `log_path`; `on_line` sees
    every line (to print progress on the terminal). A failure prints the log's last 30 lines and stops the demo
    with a message that names the log."""
    name = cmd[0]
    cmd = [nnunet_command(cmd[0])] + cmd[1:]
    print(f"$ {' '.join(cmd)}\n  (its output: {log_path})", flush=True)
    start = time.time()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if on_line is not None:
                on_line(line.rstrip("\n"))
        returncode = proc.wait()
    if returncode != 0:
        print(f"--- last lines of {log_path} ---\n{_tail(log_path)}\n---", file=sys.stderr, flush=True)
        raise DemoStepFailed(f"{name} failed with exit code {returncode}; its output is in {log_path} "
                             f"(last lines above)")
    print(f"  done in {time.time() - start:.0f} s", flush=True)


class _TrainingProgress:
    """Turns nnU-Net's training log into one terminal line per epoch (loss, pseudo Dice, epoch time), and a
    line when nnU-Net's own validation of the validation cases starts."""

    def __init__(self, epochs: int | None):
        self.epochs = epochs
        self.epoch = None
        self.values: dict[str, str] = {}
        self.validating = False

    def __call__(self, line: str) -> None:
        text = line.split(": ", 1)[1] if re.match(r"^\d{4}-\d\d-\d\d ", line) and ": " in line else line
        if m := re.fullmatch(r"Epoch (\d+)", text.strip()):
            self.epoch, self.values = int(m.group(1)), {}
        elif m := re.match(r"(train_loss|val_loss) (\S+)", text):
            self.values[m.group(1)] = f"{float(m.group(2)):.3f}"
        elif text.startswith("Pseudo dice"):
            self.values["pseudo Dice"] = " ".join(f"{float(v):.2f}" for v in
                                                  re.findall(r"(?<![\w.])(\d+\.\d+|\d+)(?=\)|,|\])", text))
        elif (m := re.match(r"Epoch time: (\S+) s", text)) and self.epoch is not None:
            total = f"/{self.epochs}" if self.epochs else ""
            details = "  ".join(f"{k} {v}" for k, v in self.values.items())
            print(f"  epoch {self.epoch + 1}{total}  {details}  ({float(m.group(1)):.0f} s)", flush=True)
        elif not self.validating and ("predicting" in text or "Validation complete" in text):
            self.validating = True
            print("  nnU-Net's validation of the validation cases ...", flush=True)


@contextlib.contextmanager
def _output_to(log_path: Path):
    """Send this process's stdout and stderr (file descriptors 1 and 2, so worker processes too) to `log_path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log_path, "a", encoding="utf-8") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def extract_fingerprint(dataset_id: int, num_processes: int, check_dataset_integrity: bool = False,
                        intensity_samples: int = 1_000_000) -> dict:
    """nnU-Net's dataset fingerprint (`extract_fingerprint_dataset`, written to nnUNet_preprocessed), with its
    extractor drawing `intensity_samples` foreground voxels per channel for the intensity statistics instead of
    10^8 (its fixed number, whatever the dataset's size: for the demo's 30 small phantoms, 3.3 million draws from
    each case's few thousand voxels, about a minute and 1.6 GB). The statistics only set CT normalisation; MRI
    channels, such as the phantom's, are z-scored per image, so the plans' settings and the preprocessed data are
    the same with fewer draws."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset

    class FewerIntensitySamples(DatasetFingerprintExtractor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.num_foreground_voxels_for_intensitystats = intensity_samples

    return extract_fingerprint_dataset(dataset_id, FewerIntensitySamples, num_processes, check_dataset_integrity)


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
        seed: seeds the phantom and the demo trainer (NNUNET_SEGMAMBA_DEMO_SEED).
        keep: keep an existing output_dir's contents instead of starting from scratch.
    """
    import torch

    from nnunet_segmamba.data.brats import convert_brats
    from nnunet_segmamba.data.phantom import make_brats_phantom_folder
    from nnunet_segmamba.training.prediction import predict_test_split

    start = time.time()
    if num_cases < 10:
        raise ValueError(f"num_cases={num_cases} is too few for a 70/10/20 split with a test set; use 10 or more")
    device = resolve_device(device).type  # nnUNetv2_train's -device takes cuda or cpu
    threads = threads or os.cpu_count() or 1
    work_dir = Path(output_dir).resolve()
    if work_dir.exists() and not keep:
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    env = nnunet_environment(work_dir, threads)
    if epochs is not None:
        env["NNUNET_SEGMAMBA_DEMO_EPOCHS"] = str(int(epochs))
    env["NNUNET_SEGMAMBA_DEMO_SEED"] = str(int(seed))  # the trainer's seed follows the phantom's
    log_path = work_dir / "nnunet.log"
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    cpu_scan_build = _build_cpu_scan_in_background(device)

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
    if dataset is None:
        # the phantom's fingerprint first, with fewer intensity draws (`extract_fingerprint`); the command below
        # verifies the dataset and reuses it. A user's dataset gets nnU-Net's own.
        with _output_to(log_path):
            extract_fingerprint(dataset_id, num_processes=threads)
        print("  fingerprint: nnU-Net's extractor with 10^6 intensity draws per channel (phantom: MRI-like "
              "channels, z-scored per image)", flush=True)
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0
    _run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "3d_fullres", "-np", str(threads),
          "-npfp", str(threads), "--verify_dataset_integrity"], {**env, "nnUNet_n_proc_DA": "1"}, log_path)

    _step(f"4/6 training {DEMO_TRAINER} on the 70 % training split ({device})")
    _wait_for(cpu_scan_build)
    _run(["nnUNetv2_train", str(dataset_id), "3d_fullres", "0", "-tr", DEMO_TRAINER, "-device", device], env,
         log_path, on_line=_TrainingProgress(demo_epochs(env)))

    _step("5/6 predicting the 20 % test split with mirror TTA, and evaluating")
    torch.set_num_threads(threads)
    step_start = time.time()
    try:
        with _output_to(log_path):
            summary = predict_test_split(dataset_id, "3d_fullres", 0, DEMO_TRAINER, device=device,
                                         num_processes=min(threads, 2))
    except Exception:
        print(f"--- last lines of {log_path} ---\n{_tail(log_path)}\n---", file=sys.stderr, flush=True)
        raise
    print(f"  {summary['num_cases']} test cases in {time.time() - step_start:.0f} s "
          f"(nnU-Net's output: {log_path})", flush=True)

    _step("6/6 report")
    report_png = work_dir / "report.png"
    write_overlay_figure(raw, Path(summary["prediction_folder"]), report_png)
    seconds = time.time() - start
    result = {"summary": summary, "report_png": str(report_png), "seconds": round(seconds, 1),
              "dataset": dataset_name, "trainer": DEMO_TRAINER, "device": device}
    with open(work_dir / "demo_result.json", "w") as f:
        json.dump(result, f, indent=2)
    print(_metrics_table(summary))
    print(f"\nfigure: {report_png}\nnnU-Net's output: {log_path}\nall results: {work_dir}\n"
          f"took {seconds / 60:.1f} min")
    return result


def demo_epochs(env: dict) -> int:
    """The demo trainer's epochs under `env` (NNUNET_SEGMAMBA_DEMO_EPOCHS, else its default)."""
    from nnunet_segmamba.training.trainers import DEMO_EPOCHS

    return int(env.get("NNUNET_SEGMAMBA_DEMO_EPOCHS", DEMO_EPOCHS))


def _metrics_table(summary: dict) -> str:
    lines = [f"\nTest split, {summary['num_cases']} cases, convention '{summary['convention']}':",
             f"{'region':<18}{'Dice':>10}{'HD95 (mm)':>12}{'NSD':>10}"]
    for region, m in summary["metrics"].items():
        lines.append(f"{region:<18}{m['dice']['mean']:>10.3f}{m['hd95_mm']['mean']:>12.2f}{m['nsd']['mean']:>10.3f}")
    return "\n".join(lines)


REGION_COLOURS = ("#2ca02c", "#ffdd00", "#d62728")  # whole tumour, tumour core, enhancing tumour


def _region_masks(labels, regions: list[list[int]]):
    import numpy as np

    return [np.isin(labels, values) for values in regions]


def _dice(a, b) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total  # both empty: 1 (the brats convention)


def write_overlay_figure(raw_dataset: Path, prediction_folder: Path, out_png: Path,
                         max_cases: int | None = None) -> None:
    """One row per test case (all of them unless `max_cases`): FLAIR and T1c, then ground truth and prediction
    drawn over T1c (regions in their order, each over the one before, so the innermost shows), on the axial slice
    with the most tumour core in the ground truth; each row's title gives the case's Dice per region."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import SimpleITK as sitk
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    dataset_json = json.loads((raw_dataset / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    cases = sorted(p.name[: -len(ending)] for p in prediction_folder.glob(f"*{ending}"))[:max_cases]
    if not cases:
        raise FileNotFoundError(f"no predictions ({ending}) in {prediction_folder}")
    foreground = {k: v for k, v in dataset_json["labels"].items() if k != "background"}
    names = list(foreground)
    regions = [list(v) if isinstance(v, (list, tuple)) else [int(v)] for v in foreground.values()]
    short = {"whole tumor": "WT", "tumor core": "TC", "enhancing tumor": "ET"}
    abbrev = [short.get(n, n) for n in names]
    colours = ListedColormap(["none", *REGION_COLOURS[: len(names)]] if len(names) <= 3 else
                             ["none", *plt.get_cmap("tab10").colors[: len(names)]])
    channels = dataset_json["channel_names"]
    shown = [int(c) for c, n in channels.items() if n.lower() in ("flair", "t2f", "t1c", "t1ce")] or [0]
    underlay = shown[-1]

    def paint(masks):
        out = np.zeros(masks[0].shape, np.uint8)
        for i, m in enumerate(masks):
            out[m] = i + 1
        return out

    fig = plt.figure(figsize=(3.2 * (len(shown) + 2), 3.6 * len(cases) + 0.9), layout="constrained")
    rows = fig.subfigures(len(cases), 1, squeeze=False)[:, 0]
    for sub, case in zip(rows, cases):
        images = [sitk.GetArrayFromImage(sitk.ReadImage(str(raw_dataset / "imagesTr" / f"{case}_{c:04d}{ending}")))
                  for c in shown]
        gt = _region_masks(sitk.GetArrayFromImage(sitk.ReadImage(str(raw_dataset / "labelsTr" / f"{case}{ending}"))),
                           regions)
        pred = _region_masks(sitk.GetArrayFromImage(sitk.ReadImage(str(prediction_folder / f"{case}{ending}"))),
                             regions)
        inner = gt[min(1, len(gt) - 1)]
        z = int(np.argmax(inner.reshape(inner.shape[0], -1).sum(1)))
        dice = "  ".join(f"{a} {_dice(g, p):.2f}" for a, g, p in zip(abbrev, gt, pred))
        sub.suptitle(f"{case} (axial slice {z})    Dice {dice}", fontsize=13)
        axes = sub.subplots(1, len(shown) + 2)
        columns = [(images[i], None, channels[str(c)]) for i, c in enumerate(shown)]
        columns += [(images[-1], paint(gt), "ground truth"), (images[-1], paint(pred), "prediction")]
        for ax, (image, overlay, title) in zip(axes, columns):
            ax.imshow(image[z], cmap="gray", interpolation="nearest")
            if overlay is not None:
                ax.imshow(np.ma.masked_equal(overlay[z], 0), cmap=colours, vmin=0, vmax=colours.N - 1,
                          alpha=0.55, interpolation="nearest")
            ax.set_title(title, fontsize=12)
            ax.axis("off")
    handles = [Patch(color=colours(i + 1), label=f"{a} = {n}") for i, (a, n) in enumerate(zip(abbrev, names))]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=12,
               title=f"overlays on {channels[str(underlay)]}; each region drawn over the one before", title_fontsize=11)
    fig.savefig(out_png, dpi=90)
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
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantom and of training (default: 0)")
    parser.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    run_demo(args.output, dataset=args.dataset, num_cases=args.num_cases, shape=(args.size,) * 3,
             epochs=args.epochs, device=args.device, threads=args.threads, seed=args.seed)
    return 0

