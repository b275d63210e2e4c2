"""Where nnU-Net finds the SegMamba trainers (`nnUNet_extTrainer`), the environment `nnunet-segmamba env` prints,
and the nnU-Net folders and dataset names the commands read. Standard library at import (nnU-Net is imported inside
`dataset_name`), so every module that needs the folder can import it at the top."""
from __future__ import annotations

import os
import shlex

from nnunet_segmamba.errors import SetupError, UserError

NNUNET_PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def ext_trainer_folder() -> str:
    """The folder nnUNet_extTrainer must point at: the installed `nnunet_segmamba.ext_trainers` package."""
    try:
        import nnunet_segmamba.ext_trainers as ext
    except ImportError:  # a source checkout on sys.path without installing: the repo's trainers/ folder
        import nnunet_segmamba

        folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(nnunet_segmamba.__file__))), "trainers")
        if not os.path.isfile(os.path.join(folder, "segmamba_trainers.py")):
            raise RuntimeError("nnunet_segmamba.ext_trainers is missing: install the package (pip install .)")
        return folder
    return os.path.dirname(os.path.abspath(ext.__file__))


def add_ext_trainer_folder() -> None:
    """Append our trainer folder to this process's nnUNet_extTrainer unless it is there: nnU-Net looks trainers up
    by name, and our commands should find our own trainers without the user's export."""
    folders = [f for f in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if f]
    if ext_trainer_folder() not in folders:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(folders + [ext_trainer_folder()])


def require_env(name: str) -> str:
    """The value of nnU-Net's environment variable `name`, or a SetupError saying to export it."""
    value = os.environ.get(name)
    if not value:
        raise SetupError(f"the environment variable {name} is not set; export it (see `nnunet-segmamba env`)")
    return value


def dataset_name(dataset: str | int) -> str:
    """nnU-Net's dataset name (Dataset004_Hippocampus) of an id or name, or a UserError naming the input."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(dataset)
    except RuntimeError:  # nnU-Net's "Could not find a dataset with the ID ..."
        raise UserError(f"dataset {dataset!r} (-d) is not found under $nnUNet_results, $nnUNet_raw or "
                        "$nnUNet_preprocessed; pass an existing dataset id or name") from None


def environment_lines() -> list[str]:
    """The `export nnUNet_extTrainer=...` line, then the current nnU-Net paths as comments (eval-safe)."""
    lines = [f"export nnUNet_extTrainer={shlex.quote(ext_trainer_folder())}"]
    for name in NNUNET_PATH_VARIABLES:
        value = os.environ.get(name)
        lines.append(f"# {name}={value}" if value else f"# {name} is not set (export {name}=/path/to/folder)")
    return lines
