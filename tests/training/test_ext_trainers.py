"""The environment `nnunet-segmamba env` prints: where nnU-Net finds our trainers, and the nnU-Net paths."""
from pathlib import Path

from nnunet_segmamba.training.ext_trainers import environment_lines


def test_env_prints_the_ext_trainer_folder_and_the_paths(monkeypatch):
    monkeypatch.setenv("nnUNet_raw", "/data/raw")
    monkeypatch.delenv("nnUNet_results", raising=False)
    lines = environment_lines()
    folder = Path(lines[0].removeprefix("export nnUNet_extTrainer="))
    assert (folder / "segmamba_trainers.py").is_file()
    assert "# nnUNet_raw=/data/raw" in lines
    assert any(line.startswith("# nnUNet_results is not set") for line in lines)
