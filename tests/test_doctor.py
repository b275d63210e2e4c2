"""`nnunet-segmamba doctor` on this (CPU-only, no mamba-ssm) machine: the report's keys, the CPU backend, exit codes."""
from __future__ import annotations

import json

import pytest

from nnunet_segmamba import cli
from nnunet_segmamba.doctor import collect_report

REPORT_KEYS = {"python", "platform", "packages", "imports", "torch_cuda_build", "cuda_available", "gpus", "kernels",
               "scan_backend", "env", "usable", "problems"}


@pytest.fixture(autouse=True)
def plain_env(monkeypatch):
    monkeypatch.delenv("NNUNET_SEGMAMBA_SCAN_BACKEND", raising=False)


def test_collect_report_keys_and_cpu_backend(monkeypatch):
    monkeypatch.setenv("nnUNet_raw", "/data/raw")
    report = collect_report()
    assert set(report) == REPORT_KEYS
    assert set(report["packages"]) == {"torch", "nnunetv2", "mamba-ssm", "causal-conv1d", "triton"}
    assert report["packages"]["torch"] and report["packages"]["nnunetv2"]
    assert set(report["kernels"]) == {"selective_scan_cuda", "causal_conv1d"}
    for status in report["kernels"].values():
        assert status["importable"] == (status["error"] == "")
    from nnunet_segmamba.ssm import cpu_scan

    assert report["scan_backend"]["cpu"]["backend"] == ("cpu" if cpu_scan.cpu_scan_status()[0] else "torch")
    assert report["env"]["nnUNet_raw"] == "/data/raw"
    assert report["env"]["NNUNET_SEGMAMBA_SCAN_BACKEND"] is None
    assert set(report["env"]) == {"NNUNET_SEGMAMBA_SCAN_BACKEND", "nnUNet_extTrainer", "nnUNet_raw",
                                  "nnUNet_preprocessed", "nnUNet_results"}
    assert report["usable"] is True and report["problems"] == []
    json.dumps(report)  # serialisable


def test_cli_doctor_prints_and_exits_zero(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    for needle in ("torch", "nnunetv2", "mamba-ssm", "causal-conv1d", "triton", "selective_scan_cuda",
                   "cpu tensors: ", "NNUNET_SEGMAMBA_SCAN_BACKEND", "nnUNet_results", "status: usable"):
        assert needle in out, needle


def test_cli_doctor_json(capsys):
    assert cli.main(["doctor", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == REPORT_KEYS


def test_invalid_backend_env_var_is_not_usable(monkeypatch, capsys):
    monkeypatch.setenv("NNUNET_SEGMAMBA_SCAN_BACKEND", "bogus")
    report = collect_report()
    assert report["usable"] is False and report["scan_backend"]["cpu"]["backend"] is None
    assert "NNUNET_SEGMAMBA_SCAN_BACKEND" in report["problems"][0]
    assert cli.main(["doctor"]) == 1
    assert "NOT usable" in capsys.readouterr().out
