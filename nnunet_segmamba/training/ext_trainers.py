"""Where nnU-Net finds the SegMamba trainers (`nnUNet_extTrainer`), and the environment `nnunet-segmamba env`
prints. Standard library only, so every module that needs the folder can import it at the top."""
from __future__ import annotations

import os
import shlex

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


def environment_lines() -> list[str]:
    """The `export nnUNet_extTrainer=...` line, then the current nnU-Net paths as comments (eval-safe)."""
    lines = [f"export nnUNet_extTrainer={shlex.quote(ext_trainer_folder())}"]
    for name in NNUNET_PATH_VARIABLES:
        value = os.environ.get(name)
        lines.append(f"# {name}={value}" if value else f"# {name} is not set (export {name}=/path/to/folder)")
    return lines
