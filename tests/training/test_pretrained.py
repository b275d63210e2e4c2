"""Fine-tuning through nnU-Net's `-pretrained_weights`: the file `pretrained_weights_file` writes loads with nnU-Net's
own code path of nnUNetv2_train, for a source with another class count and no deep-supervision heads (the authors'
weights), which nnU-Net's loader refuses as it is."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nnunet_segmamba import cli
from nnunet_segmamba.errors import UserError
from nnunet_segmamba.training import trainers
from nnunet_segmamba.training.pretrained import pretrained_weights_file, read_state_dict

DATASET_ID = 982
DATASET_NAME = f"Dataset{DATASET_ID:03d}_SegMambaPretrained"
CONFIGURATIONS = ("3d_fullres",)  # for the nnunet_dirs fixture (conftest.py)
TINY = trainers.nnUNetTrainerSegMamba_tiny
CLASSES = 3  # background and the tiny dataset's two labels


def _source(tmp_path: Path, in_chans: int = 1, out_chans: int = 5, deep_supervision: bool = False,
            wrapper: str | None = None) -> Path:
    """The tiny trainer's network trained elsewhere: another class count and, like the authors' weights, no
    deep-supervision heads; saved as the state_dict of a DDP-wrapped module, bare or under `wrapper`."""
    torch.manual_seed(1)
    network = TINY._network(in_chans, out_chans, 3, deep_supervision)
    path = tmp_path / f"source_{in_chans}_{out_chans}_{wrapper}.pt"
    state = {f"module.{k}": v for k, v in network.state_dict().items()}
    torch.save({wrapper: state} if wrapper else state, path)
    return path


def test_weights_of_another_class_count_load_through_nnunet_train(make_trainer, tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.run.run_training import maybe_load_checkpoint

    source = _source(tmp_path)
    source_state = read_state_dict(source)
    assert not any(k.startswith("module.") for k in source_state)
    refused = tmp_path / "as_is.pth"
    torch.save({"network_weights": source_state}, refused)
    trainer = make_trainer(TINY)
    trainer.initialize()
    with pytest.raises(AssertionError):  # nnU-Net's loader: the heads are missing or shaped for 5 classes
        load_pretrained_weights(trainer.network, str(refused))

    written = pretrained_weights_file(source, tmp_path / "finetune.pth", DATASET_ID, "3d_fullres", TINY.__name__)
    heads = {k for k in trainer.network.state_dict() if k.startswith(("out.", "ds_heads."))}
    assert set(written.initialised) == heads and len(heads) == 2 * 4  # out and 3 deep-supervision heads
    assert written.copied == len(trainer.network.state_dict()) - len(heads) and not written.unused

    trainer = make_trainer(TINY)
    maybe_load_checkpoint(trainer, False, False, str(written.path))  # what nnUNetv2_train -pretrained_weights does
    loaded = trainer.network.state_dict()
    saved = torch.load(written.path, weights_only=False)["network_weights"]
    for name, tensor in loaded.items():
        if name in heads:
            assert tensor.shape[0] == CLASSES and torch.equal(tensor, saved[name])
        else:
            assert torch.equal(tensor, source_state[name]), name
    with torch.no_grad():
        trainer.network.deep_supervision = False
        assert trainer.network(torch.randn(1, 1, 16, 32, 16)).shape == (1, CLASSES, 16, 32, 16)


def test_another_input_channel_count_is_refused_with_the_tensor_named(nnunet_dirs, tmp_path):
    source = _source(tmp_path, in_chans=4)
    with pytest.raises(UserError, match=r"missing from the source weights or differ in shape, e\.g\. (\S+): "
                                        r"of shape \(\d+, 4, .*input channel count"):
        pretrained_weights_file(source, tmp_path / "out.pth", DATASET_ID, "3d_fullres", TINY.__name__)
    assert not (tmp_path / "out.pth").exists()
    with pytest.raises(UserError, match="nnUNetTrainer .* is not a SegMamba trainer"):
        pretrained_weights_file(_source(tmp_path), tmp_path / "out.pth", DATASET_ID, "3d_fullres", "nnUNetTrainer")


def test_command_writes_the_file_and_reports_errors_on_one_line(nnunet_dirs, tmp_path, capsys):
    # same classes: every tensor fits; wrapped as the authors' loader also accepts
    source = _source(tmp_path, out_chans=CLASSES, deep_supervision=True, wrapper="module")
    output = tmp_path / "same.pth"
    args = ["pretrained-weights", str(source), "-o", str(output), "-d", str(DATASET_ID), "-c", "3d_fullres",
            "-tr", TINY.__name__]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "left at their initialisation" not in printed
    assert f"-pretrained_weights {output}" in printed
    assert read_state_dict(output).keys() == read_state_dict(source).keys()

    assert cli.main(args) == 2  # the output exists now
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "exists; pass a new file name" in error
