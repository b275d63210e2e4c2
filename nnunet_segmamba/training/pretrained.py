"""Weights to fine-tune from, in the form nnU-Net's `-pretrained_weights` reads: `pretrained_weights_file`
(`nnunet-segmamba pretrained-weights`).

nnU-Net's loader (`nnunetv2.run.load_pretrained_weights`) copies an nnU-Net checkpoint's `network_weights` into the
new network and requires every tensor but its own U-Net's `.seg_layers.` to be there with the same shape. SegMamba's
output heads keep the authors' names (`out`, `ds_heads`, which their weights need), so weights trained on another
number of classes fail that check, and so do weights without deep-supervision heads (the authors' own, or a
`nnUNetTrainerSegMambaCE` model), whatever their class count. This module writes the file the loader accepts:
the network the trainer builds for the target dataset, holding every tensor of the source whose name and shape
match, and the output heads (the `OutBlock`s) the source cannot fill left at their initialisation, as nnU-Net
leaves its seg_layers. Everything else must match: another input channel count, depth or width is an error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from nnunet_segmamba.errors import UserError
from nnunet_segmamba.training.ext_trainers import dataset_name, require_env

# where checkpoints keep their state_dict: nnU-Net's, then common trainers' ("module": the authors' loader accepts
# their checkpoints wrapped so); a bare state_dict, as the authors' trainer saves it, is used as it is
STATE_DICT_KEYS = ("network_weights", "state_dict", "model", "module")
# what DistributedDataParallel and torch.compile put in front of the names when their modules are saved
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class PretrainedWeights:
    """What `pretrained_weights_file` wrote."""
    path: Path
    copied: int                  # tensors taken from the source
    initialised: tuple[str, ...]  # output-head tensors left at their initialisation
    unused: tuple[str, ...]      # source tensors the network has no place for


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict in a checkpoint file: an nnU-Net checkpoint, a bare state_dict (as the authors' code saves),
    or one under another of `STATE_DICT_KEYS`; names without DDP's and torch.compile's prefixes.

    The file is unpickled in full (nnU-Net checkpoints hold more than tensors), as nnU-Net's own loader does: read
    only files you trust."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"source weights {path} do not exist; pass a checkpoint (.pth / .pt) file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle, zip and torch errors alike: the file is not a torch checkpoint
        raise UserError(f"source weights {path} cannot be read by torch.load ({type(exc).__name__}: {exc}); pass a "
                        "checkpoint saved with torch.save") from None
    for key in STATE_DICT_KEYS:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not checkpoint or not all(
            isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise UserError(f"source weights {path} hold no state_dict (a dict of tensors, bare or under one of "
                        f"{', '.join(STATE_DICT_KEYS)})")
    state = {}
    for name, tensor in checkpoint.items():
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        state[name] = tensor
    return state


def output_head_prefixes(network: torch.nn.Module) -> tuple[str, ...]:
    """The state_dict prefixes of the network's output heads (every `OutBlock`: the final 1x1 conv and the
    deep-supervision heads), whose shapes follow the class count."""
    from nnunet_segmamba.networks.blocks import OutBlock

    return tuple(f"{name}." for name, module in network.named_modules() if isinstance(module, OutBlock))


def fill_from(network: torch.nn.Module, source: dict[str, torch.Tensor],
              what: str = "the network") -> tuple[dict[str, torch.Tensor], tuple[str, ...], tuple[str, ...]]:
    """`network`'s state_dict with every tensor of `source` that has its name and shape; output-head tensors that
    `source` lacks or shapes otherwise keep the network's. Returns (state_dict, the heads' tensors kept, the
    source's names the network lacks). Any other tensor missing or of another shape is a UserError naming it."""
    heads = output_head_prefixes(network)
    state = network.state_dict()
    initialised, mismatched = [], []
    for name, tensor in state.items():
        theirs = source.get(name)
        if theirs is not None and theirs.shape == tensor.shape:
            state[name] = theirs.to(tensor.dtype)
        elif name.startswith(heads):
            initialised.append(name)
        else:
            mismatched.append((name, None if theirs is None else tuple(theirs.shape), tuple(tensor.shape)))
    if mismatched:
        name, theirs, ours = mismatched[0]
        found = "missing from the source" if theirs is None else f"of shape {theirs} in the source"
        raise UserError(f"{len(mismatched)} of {what}'s {len(state)} tensors are missing from the source weights or "
                        f"differ in shape, e.g. {name}: {found}, {ours} in {what}. Only the output heads may differ "
                        "(the class count); the rest needs the same network (network_kwargs) and input channel count")
    return state, tuple(initialised), tuple(name for name in source if name not in state)


def pretrained_weights_file(source: str | os.PathLike, output: str | os.PathLike, dataset: str | int,
                            configuration: str, trainer: str = "nnUNetTrainerSegMamba", plans: str = "nnUNetPlans",
                            seed: int = 0) -> PretrainedWeights:
    """Write `output` for `nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER -pretrained_weights OUTPUT`.

    Args:
        source: the weights to start from: an nnU-Net checkpoint of a SegMamba trainer (any dataset with the same
            input channels), or the authors' state_dict (`read_state_dict`).
        output: the file to write (an nnU-Net checkpoint holding `network_weights` only); it must not exist.
        dataset: the dataset to fine-tune on, id or name; planned and preprocessed (its plans and dataset.json
            under $nnUNet_preprocessed say the network's channels and classes).
        configuration: the nnU-Net configuration to train, e.g. 3d_fullres.
        trainer: the SegMamba trainer to train with (its network_kwargs and deep supervision).
        plans: plans identifier.
        seed: seeds the initialisation of the output heads the source cannot fill.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_segmamba.training.base import nnUNetTrainerSegMambaBase
    from nnunet_segmamba.training.reliability import atomic_write_path, trainer_lookup

    output = Path(output)
    if output.exists():
        raise FileExistsError(f"{output} (-o) exists; pass a new file name or delete it")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"the folder of {output} (-o) does not exist; create it first")
    source_state = read_state_dict(source)

    folder = Path(require_env("nnUNet_preprocessed")) / dataset_name(dataset)
    plans_file = folder / f"{plans}.json"
    if not plans_file.is_file():
        raise FileNotFoundError(f"no {plans_file.name} in {folder}; run nnUNetv2_plan_and_preprocess -d {dataset} "
                                "first (or pass -p)")
    plans_manager = PlansManager(str(plans_file))
    if configuration not in plans_manager.available_configurations:
        raise UserError(f"configuration {configuration!r} (-c) is not in {plans_file}; it has "
                        f"{', '.join(plans_manager.available_configurations)}")
    with trainer_lookup(trainer):
        trainer_class = recursive_find_trainer_class_by_name(trainer)
    if not issubclass(trainer_class, nnUNetTrainerSegMambaBase):
        raise UserError(f"{trainer} (-tr) is not a SegMamba trainer; nnU-Net's own trainers take "
                        "-pretrained_weights as they are")
    dataset_json = load_json(str(folder / "dataset.json"))
    configuration_manager = plans_manager.get_configuration(configuration)
    with torch.random.fork_rng(devices=[]):  # the seed is for the heads only, not the caller's random state
        torch.manual_seed(seed)
        network = trainer_class.build_network_architecture(
            plans_manager, configuration_manager,
            determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
            plans_manager.get_label_manager(dataset_json).num_segmentation_heads, True)
    state, initialised, unused = fill_from(network, source_state, f"{trainer}'s network for {folder.name}")
    with atomic_write_path(output) as tmp:
        torch.save({"network_weights": state, "trainer_name": trainer, "pretrained_from": str(Path(source))}, tmp)
    return PretrainedWeights(output, len(state) - len(initialised), initialised, unused)
