"""`nnunet-segmamba doctor`: what is installed, which kernels load, and which scan backend each device gets.

Versions are read with `importlib.metadata`, so a broken package (mamba-ssm's `__init__` fails with
transformers 5.x) is reported rather than imported. The compiled kernels are probed through
`nnunet_segmamba.ssm.mamba_ssm_kernels`, which keeps the exact import error.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import sys
from typing import Any

DISTRIBUTIONS = ("torch", "nnunetv2", "mamba-ssm", "causal-conv1d", "triton")
NNUNET_ENV_VARS = ("nnUNet_extTrainer", "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _try_import(module: str) -> str:
    """'' when `module` imports, else the error as 'Type: message'."""
    try:
        importlib.import_module(module)
        return ""
    except Exception as exc:  # a broken install can raise anything, not only ImportError
        return f"{type(exc).__name__}: {exc}"


def _backend_for(device_type: str) -> dict[str, str | None]:
    """The backend `selective_scan(..., backend="auto")` picks for tensors on `device_type`, and why."""
    import torch

    from .ssm import dispatch

    env = dispatch.backend_from_env()
    try:
        name = dispatch.resolve("auto", torch.device(device_type))
    except (ValueError, RuntimeError) as exc:
        return {"backend": None, "reason": str(exc)}
    if device_type == "cpu":
        from .ssm import cpu_scan

        reason = (cpu_scan.cpu_scan_status()[1] if name == "cpu" else
                  f"forced by {dispatch.ENV_VAR}={env}" if env == "torch" else
                  f"the chunked PyTorch scan: {cpu_scan.cpu_scan_status()[1]}")
    elif env in ("torch", "cuda", "triton"):
        reason = f"forced by {dispatch.ENV_VAR}={env}"
    elif name == "cuda":
        reason = dispatch.cuda_scan_status()[1]
    elif name == "triton":
        reason = f"{dispatch.triton_scan_status()[1]}; mamba-ssm's kernel is not used: {dispatch.cuda_scan_status()[1]}"
    else:
        reason = (f"fallback to the chunked PyTorch scan: {dispatch.cuda_scan_status()[1]}; "
                  f"{dispatch.triton_scan_status()[1]}")
    return {"backend": name, "reason": reason}


def collect_report() -> dict[str, Any]:
    """Everything `doctor` prints, as a JSON-serialisable dict.

    Keys: python, platform, packages (distribution -> version or None), imports (module -> '' or error),
    torch_cuda_build, cuda_available, gpus, kernels (selective_scan_cuda / causal_conv1d -> {importable, error}),
    scan_backend (cpu / cuda -> {backend, reason}), env (variable -> value or None), usable, problems.
    """
    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in DISTRIBUTIONS},
        "imports": {name: _try_import(name) for name in ("torch", "nnunetv2")},
    }
    problems = [f"{name} does not import ({error})" for name, error in report["imports"].items() if error]
    env_names = ("NNUNET_SEGMAMBA_SCAN_BACKEND",) + NNUNET_ENV_VARS
    report["env"] = {name: os.environ.get(name) for name in env_names}
    if report["imports"]["torch"]:
        report.update(torch_cuda_build=None, cuda_available=False, gpus=[], kernels={}, scan_backend={},
                      usable=False, problems=problems)
        return report

    import torch

    from .ssm import mamba_ssm_kernels

    report["torch_cuda_build"] = torch.version.cuda
    report["cuda_available"] = torch.cuda.is_available()
    report["gpus"] = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                      if report["cuda_available"] else [])
    scan_module, scan_error = mamba_ssm_kernels.load_extension("selective_scan_cuda")
    conv_fn, conv_error = mamba_ssm_kernels.causal_conv1d_function()
    report["kernels"] = {
        "selective_scan_cuda": {"importable": scan_module is not None, "error": scan_error},
        "causal_conv1d": {"importable": conv_fn is not None, "error": conv_error},
    }
    report["scan_backend"] = {"cpu": _backend_for("cpu"), "cuda": _backend_for("cuda")}
    if report["scan_backend"]["cpu"]["backend"] is None:
        problems.append(f"no scan backend for CPU tensors: {report['scan_backend']['cpu']['reason']}")
    report["usable"] = not problems
    report["problems"] = problems
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as aligned 'name: value' lines, grouped."""
    lines = [f"python: {report['python']} ({report['platform']})", "packages:"]
    lines += [f"  {name}: {version or 'not installed'}" for name, version in report["packages"].items()]
    lines.append(f"torch CUDA build: {report.get('torch_cuda_build') or 'none (CPU-only torch)'}")
    lines.append(f"CUDA available: {report.get('cuda_available')}")
    lines.append(f"GPUs: {', '.join(report.get('gpus') or []) or 'none'}")
    lines.append("kernels:")
    for name, status in report.get("kernels", {}).items():
        lines.append(f"  {name}: {'imports' if status['importable'] else 'unavailable (' + status['error'] + ')'}")
    lines.append("scan backend:")
    for device, choice in report.get("scan_backend", {}).items():
        lines.append(f"  {device} tensors: {choice['backend'] or 'none'} ({choice['reason']})")
    lines.append("environment:")
    lines += [f"  {name}={value if value is not None else '(unset)'}" for name, value in report["env"].items()]
    lines.append("status: " + ("usable" if report["usable"] else "NOT usable"))
    lines += [f"  problem: {p}" for p in report["problems"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = collect_report()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["usable"] else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="report versions, compiled kernels, GPUs, the scan backend per device and the nnU-Net paths",
        description="Check the installation: exit code 0 when torch and nnunetv2 import and CPU tensors have a "
                    "scan backend, 1 otherwise.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    parser.set_defaults(func=run)
