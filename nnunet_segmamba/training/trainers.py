"""The SegMamba trainers users pass to nnU-Net with `-tr`. Each changes one thing of its parent.

    nnUNetTrainerSegMamba            SegMamba with nnU-Net's recipe (Dice+CE, deep supervision), see base.py
    nnUNetTrainerSegMambaCE          the paper's recipe: cross-entropy only, no deep supervision
    nnUNetTrainerSegMambaNoMamba     ablation: SegMamba without its Mamba mixers (mixer="none")
    nnUNetTrainerSegMamba_tiny       a narrow network and a few short epochs, for CPU tests
    nnUNetTrainerSegMamba_demo       the tiny network, the demo's budget, a faster-starting SGD (minutes on CPU)
    nnUNetTrainerMedMamba            2D only: a U-Net with a MedMamba (SS-Conv-SSM) encoder instead of SegMamba
    <any of the first three, or MedMamba>_{1,5,50,100,250,500}epoch(s)   shorter schedules (generated below)

All of them use the 70/10/20 split, elastic deformation and nnU-Net's torch.compile rule (base.py).
"""
from __future__ import annotations

import os

import torch
from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss

from nnunet_segmamba.training.base import nnUNetTrainerSegMambaBase


class nnUNetTrainerSegMamba(nnUNetTrainerSegMambaBase):
    """SegMamba in nnU-Net with nnU-Net's own recipe: Dice + CE (Dice + BCE for regions), deep supervision,
    SGD + poly schedule, 1000 epochs x 250 iterations. Nothing changed relative to the base."""


class nnUNetTrainerSegMambaCE(nnUNetTrainerSegMambaBase):
    """The paper's recipe: cross-entropy only, no deep supervision (the reference trains a plain softmax with
    a single output). Optimiser (SGD lr 1e-2, Nesterov momentum 0.99, weight decay 3e-5), poly schedule and
    gradient clipping at 12 are nnU-Net's and already equal the paper's (nnU-Net steps the poly schedule per
    epoch, the reference per iteration).

    Label datasets only: for BraTS, train on the labels 1/2/3 and derive the regions from the argmax, as the
    paper does.
    """

    use_deep_supervision = False

    def _build_loss(self):
        if self.label_manager.has_regions:
            raise ValueError(
                f"{type(self).__name__} trains a softmax with cross-entropy, but this dataset.json defines "
                f"overlapping regions ({self.label_manager.foreground_regions}). Use a dataset.json with plain "
                f"labels (as the paper does for BraTS), or nnUNetTrainerSegMamba (Dice + BCE on regions)."
            )
        ignore_index = self.label_manager.ignore_label if self.label_manager.has_ignore_label else -100
        return RobustCrossEntropyLoss(weight=None, ignore_index=ignore_index)


class nnUNetTrainerSegMambaNoMamba(nnUNetTrainerSegMamba):
    """Ablation: the same network and recipe with the Mamba mixers removed (`mixer="none"`): what the state-space
    layers add over the convolutional GSC blocks."""

    network_kwargs = {**nnUNetTrainerSegMamba.network_kwargs, "mixer": "none"}


class nnUNetTrainerSegMamba_tiny(nnUNetTrainerSegMamba):
    """A budget for demos and CPU tests (minutes, not days); results are not meaningful. Changes:

    * network: feat_size (8, 16, 32, 64), hidden_size 64, depths (1, 1, 1, 1) instead of
      (48, 96, 192, 384) / 768 / (2, 2, 2, 2);
    * 2 epochs of 4 training and 2 validation iterations instead of 1000 x (250 + 50);
    * batch size at most 2.
    """

    network_kwargs = {**nnUNetTrainerSegMamba.network_kwargs,
                      "feat_size": (8, 16, 32, 64), "hidden_size": 64, "depths": (1, 1, 1, 1)}
    epochs = 2
    iterations_per_epoch = 4
    val_iterations_per_epoch = 2
    max_batch_size = 2


#: the demo trainer's default epochs (NNUNET_SEGMAMBA_DEMO_EPOCHS overrides it)
DEMO_EPOCHS = 10


class nnUNetTrainerSegMamba_demo(nnUNetTrainerSegMamba_tiny):
    """The demo's budget (`nnunet-segmamba demo`): the tiny network trained long enough to learn the phantom on a
    2-core CPU in a few minutes. Changes from `_tiny`: NNUNET_SEGMAMBA_DEMO_EPOCHS epochs (default DEMO_EPOCHS) of
    25 training iterations; SGD with momentum 0.9 from lr 0.1 (nnU-Net: 0.99 from 0.01, too slow to start for a
    few hundred steps); seeded with NNUNET_SEGMAMBA_DEMO_SEED (default 0; the demo passes its --seed) so that a
    CPU run with nnUNet_n_proc_DA=0 is repeatable."""

    epochs = int(os.environ.get("NNUNET_SEGMAMBA_DEMO_EPOCHS", str(DEMO_EPOCHS)))
    iterations_per_epoch = 25
    seed = int(os.environ.get("NNUNET_SEGMAMBA_DEMO_SEED", "0"))
    #: SGD momentum and initial learning rate. nnU-Net's 0.99 / 1e-2 take ~100 steps to fill the momentum buffer,
    #: a large part of the demo's few hundred; 0.9 / 1e-1 keep the effective step lr / (1 - momentum) = 1 and
    #: respond within ~10 steps.
    momentum = 0.9
    demo_initial_lr = 1e-1

    def configure_optimizers(self):
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

        self.initial_lr = self.demo_initial_lr
        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=self.momentum, nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)


class nnUNetTrainerMedMamba(nnUNetTrainerSegMambaBase):
    """2D configurations only (`-c 2d`): `MedMambaUNet`, a U-Net whose encoder stages are MedMamba's SS-Conv-SSM
    blocks (Yue & Li, arXiv:2403.03849; the U-Net form is ours, see networks/medmamba_unet.py), instead of
    SegMamba. `network_kwargs` go to MedMambaUNet. Everything else is the base's: nnU-Net's recipe, patch rounded
    to multiples of 16 (MedMambaUNet's total stride too), deep supervision at strides (1, 2, 4, 8)."""

    @classmethod
    def _network(cls, in_chans: int, out_chans: int, spatial_dims: int, deep_supervision: bool):
        from nnunet_segmamba.networks.medmamba_unet import MedMambaUNet

        if spatial_dims != 2:
            raise ValueError(f"{cls.__name__} is 2D only: use -c 2d (this configuration has a {spatial_dims}D patch)")
        return MedMambaUNet(in_chans, out_chans, deep_supervision=deep_supervision, scan_backend=cls.scan_backend,
                            **dict(cls.network_kwargs))


EPOCH_VARIANT_PARENTS = (nnUNetTrainerSegMamba, nnUNetTrainerSegMambaCE, nnUNetTrainerSegMambaNoMamba,
                         nnUNetTrainerMedMamba)
EPOCH_VARIANT_COUNTS = (1, 5, 50, 100, 250, 500)

__all__ = ["nnUNetTrainerSegMambaBase", "nnUNetTrainerSegMamba", "nnUNetTrainerSegMambaCE",
           "nnUNetTrainerSegMambaNoMamba", "nnUNetTrainerSegMamba_tiny", "nnUNetTrainerSegMamba_demo",
           "nnUNetTrainerMedMamba"]


def _make_epoch_variant(parent: type, epochs: int) -> type:
    """`<parent>_<n>epochs`: the parent with `epochs` epochs. Module-level names with a matching `__module__`
    and `__qualname__`, so the classes pickle and nnU-Net finds them by name like hand-written ones."""
    name = f"{parent.__name__}_{epochs}epoch{'' if epochs == 1 else 's'}"
    doc = (f"{parent.__name__} trained for {epochs} epoch{'' if epochs == 1 else 's'} instead of 1000; nothing else "
           f"changed.")
    return type(name, (parent,), {"epochs": epochs, "__module__": __name__, "__qualname__": name, "__doc__": doc})


for _parent in EPOCH_VARIANT_PARENTS:
    for _epochs in EPOCH_VARIANT_COUNTS:
        _cls = _make_epoch_variant(_parent, _epochs)
        globals()[_cls.__name__] = _cls
        __all__.append(_cls.__name__)
del _parent, _epochs, _cls
