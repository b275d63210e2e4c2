"""The one base trainer that puts SegMamba (Xing et al. 2024, arXiv:2401.13560) into nnU-Net v2.

Everything the plugin changes in nnU-Net's `nnUNetTrainer` lives here; the variants in `trainers.py` only set
the class attributes of the "tunables" block below or override one hook. Compared with nnU-Net's trainer:

* network: `SegMamba` instead of nnU-Net's U-Net (`build_network_architecture`, a classmethod so that
  variants change the network through `network_kwargs` and `nnUNetv2_predict` rebuilds the same one);
  2D when the configuration's patch is 2D. The network keeps its own initialisation (nnU-Net's He init is
  only applied to its own architectures).
* patch: rounded up per axis to a multiple of SegMamba's total stride (16). The network pads to that multiple
  internally anyway, so the bigger patch costs nothing extra and adds context; it also makes the deep
  supervision targets (downsampled by nnU-Net with `round`) exactly as large as the network's heads. The
  adapted patch is written into the plans the trainer saves, so inference uses it too.
* deep supervision: through the network's heads at strides `net.deep_supervision_strides` == (1, 2, 4, 8),
  switched with the `net.deep_supervision` attribute; nnU-Net's loss weights (1, 1/2, 1/4, 0, normalised).
* split: 70/10/20 train/val/test (`splits.py`) instead of nnU-Net's 5-fold cross-validation.
* augmentation: nnU-Net's, plus elastic deformation (`augmentation.py`).
* torch.compile: nnU-Net's rule (`nnUNetTrainer._do_i_compile`): compiled on CUDA unless nnUNet_compile=f,
  never on CPU. The scan and causal conv are custom ops (`nnunet_segmamba.ssm.ops`), so the whole network is
  one graph. On one GPU the training and validation steps also run as CUDA graphs (`compile_mode`), since at
  small patches the step is bound by the host's kernel launches; the training forward and nnU-Net's loss are
  then one compiled module (`NetworkAndLoss`); the final validation uses nnU-Net's plain compile. AMP:
  nnU-Net's autocast + GradScaler on CUDA; the selective scan runs in float32 inside the network.
* layout: on one GPU a 3D network's weights are in channels_last_3d (`channels_last`), the layout in which cuDNN
  runs half-precision convolutions (SegMamba views a one-channel input the same way); checkpoints load into either
  layout.
* cuDNN: the search that nnU-Net's training turns on times every algorithm for each convolution
  (`cudnn_benchmark_limit`), not only torch's first 10: a faster step for a longer first one. The first training
  and validation steps on a GPU (the compile and that search: minutes) are logged with their time.
* memory: on a GPU the Mamba branches, and the conv blocks' norms and shortcuts, are recomputed in the backward
  pass for large batches only (`recompute_mamba_branches`, `recompute_conv_blocks`), where their activations are
  gigabytes; at small ones it would only cost time.
* the training step on CUDA does not wait for the GPU's work (`train_step`): non-finite steps are skipped on the
  device and checked on the host one step later, and SGD runs as its fused kernel (the same update), which reads
  GradScaler's found-inf flag on the device and applies the unscale and the gradient-norm clip in its own pass
  (`amp_step`). Nor does the validation step wait: its loss and counts stay on the device until the epoch's end
  (`validation_step`).

Unchanged from nnU-Net: the loss (Dice + CE, or Dice + BCE for region datasets such as BraTS), SGD (lr 1e-2,
Nesterov momentum 0.99, weight decay 3e-5), poly learning-rate schedule, gradient-norm clipping at 12,
checkpointing, `--c` / `--val` / `--npz`, validation and export.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast, nn
from torch import distributed as dist
from torch._dynamo import OptimizedModule

from nnunet_segmamba.devices import check_cudnn_benchmark_limit
from nnunet_segmamba.networks.blocks import TOTAL_STRIDE
from nnunet_segmamba.nn import mamba_mixers
from nnunet_segmamba.training import amp_step
from nnunet_segmamba.training.augmentation import enable_elastic_deformation
from nnunet_segmamba.training.reliability import atomic_write_path, non_finite_steps_error
from nnunet_segmamba.training.splits import load_or_create_split, split_file_path

# voxels per batch (batch size x patch) from which the trainers recompute the Mamba branches on a GPU
# (`recompute_mamba_branches`): between the two settings measured, the hippocampus's 7 x 48 x 64 x 48 (1.0 M) and
# BraTS's 2 x 128^3 (4.2 M)
RECOMPUTE_FROM_VOXELS = 2 ** 21


def _to_numpy(value) -> np.ndarray:
    return value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def match_state_layouts_to_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Give each per-parameter state tensor of the parameter's shape (SGD's momentum) the parameter's strides.

    A checkpoint written by a network in another memory format (channels-first vs channels_last_3d) brings
    momentum buffers laid out differently from the parameters, and the fused SGD kernel pairs elements by memory
    position, not index: it would silently apply each momentum to the wrong weight."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if (isinstance(value, torch.Tensor) and value.shape == param.shape
                        and value.stride() != param.stride()):
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def hard_tp_fp_fn(output: torch.Tensor, target: torch.Tensor, label_manager) -> tuple[torch.Tensor, ...]:
    """nnU-Net's online evaluation of one validation batch (what its `nnUNetTrainer.validation_step` computes): the
    true positives, false positives and false negatives per class, summed over the batch and the voxels, of the
    argmax prediction (of sigmoid > 0.5 for region datasets), voxels of the ignore label left out, the background
    class left out (not for regions)."""
    axes = [0] + list(range(2, output.ndim))
    if label_manager.has_regions:
        prediction = (torch.sigmoid(output) > 0.5).long()
    else:
        prediction = torch.zeros(output.shape, device=output.device, dtype=torch.float16)
        prediction.scatter_(1, output.argmax(1)[:, None], 1)
    mask = None
    if label_manager.has_ignore_label:
        if label_manager.has_regions:
            mask = ~target[:, -1:] if target.dtype == torch.bool else 1 - target[:, -1:]
            target = target[:, :-1]
        else:
            ignored = target == label_manager.ignore_label
            mask = (~ignored).float()
            target = torch.where(ignored, torch.zeros_like(target), target)
    tp, fp, fn, _ = get_tp_fp_fn_tn(prediction, target, axes=axes, mask=mask)
    if not label_manager.has_regions:
        tp, fp, fn = tp[1:], fp[1:], fn[1:]
    return tp.detach(), fp.detach(), fn.detach()


class NetworkAndLoss(nn.Module):
    """The training forward: the network and the loss on its outputs, as one module, so that one compile (and one
    CUDA graph) holds both and the loss's kernels are fused and replayed with the network's instead of launched
    one by one by the host."""

    def __init__(self, network: nn.Module, loss: nn.Module):
        super().__init__()
        self.network, self.loss = network, loss

    def forward(self, data: torch.Tensor, target) -> torch.Tensor:
        return self.loss(self.network(data), target)


class nnUNetTrainerSegMambaBase(nnUNetTrainer):
    """nnU-Net's trainer with SegMamba as the network, the 70/10/20 split and elastic deformation.

    Not meant to be trained directly: use `nnUNetTrainerSegMamba` or a variant (`trainers.py`).
    """

    # ---- tunables: variants override these class attributes (applied after nnU-Net's own defaults) ----
    #: SegMamba arguments besides in_chans / out_chans / spatial_dims / deep_supervision (defaults: the paper's)
    network_kwargs: ClassVar[Mapping[str, Any]] = {}
    #: the selective-scan implementation of the Mamba layers ("auto": the fastest on the device; "cuda",
    #: "triton", "cpu", "torch": see nnunet_segmamba.ssm.dispatch). Also used by nnUNetv2_predict with this trainer.
    scan_backend: ClassVar[str] = "auto"
    #: None keeps nnU-Net's value (1000 epochs of 250 training and 50 validation iterations)
    epochs: ClassVar[int | None] = None
    iterations_per_epoch: ClassVar[int | None] = None
    val_iterations_per_epoch: ClassVar[int | None] = None
    #: upper bound on the plans' batch size (None: the plans' batch size)
    max_batch_size: ClassVar[int | None] = None
    #: deep supervision through the network's heads
    use_deep_supervision: ClassVar[bool] = True
    #: seed Python's, numpy's and torch's generators before the network is built (None: nnU-Net's behaviour,
    #: unseeded). With nnUNet_n_proc_DA=0 on CPU this makes a run repeatable: augmentation and sampling then
    #: happen in the training process.
    seed: ClassVar[int | None] = None
    #: training stops (RuntimeError) after this many consecutive steps with a non-finite loss or gradient norm
    max_consecutive_non_finite_steps: ClassVar[int] = 10
    #: torch.compile's mode for the training and validation steps where nnU-Net's rule compiles. "reduce-overhead"
    #: replays each step's kernels as CUDA graphs (docs/performance.md: 2.5x faster steps at the hippocampus
    #: patch, where launching SegMamba's many small kernels bounds the step); "default" is nnU-Net's own compile.
    #: Multi-GPU (DDP) training always uses "default".
    compile_mode: ClassVar[str] = "reduce-overhead"
    #: on one GPU, a 3D network's weights in torch.channels_last_3d, so that cuDNN's convolutions (channels-last
    #: in half precision) and the layout-keeping norms need no layout copies between them (docs/performance.md,
    #: "Channels-last"). Not under DDP (its gradient buckets are laid out when it wraps the network) nor on the CPU.
    channels_last: ClassVar[bool] = True
    #: recompute each Mamba branch but its scan in the backward pass instead of keeping its activations
    #: (`SegMamba(recompute_mamba_branches=...)`). None: on a GPU from RECOMPUTE_FROM_VOXELS voxels per batch
    #: (batch size x patch), where the branches' activations are gigabytes (2.2 GiB at 2 x 128^3) and recomputing
    #: them costs no measurable time; below that they are small (0.56 GiB at the hippocampus's 7 x 48 x 64 x 48)
    #: and recomputing them costs a few percent of the step (docs/performance.md). A `recompute_mamba_branches`
    #: or `gradient_checkpointing` in `network_kwargs` wins.
    recompute_mamba_branches: ClassVar[bool | None] = None
    #: recompute the norm + LeakyReLU outputs and the 1x1 shortcut convolutions of the residual conv blocks in the
    #: backward pass, keeping the 3x3 convolutions' outputs (`SegMamba(recompute_conv_blocks=...)`). None: the
    #: same rule as `recompute_mamba_branches` (docs/performance.md). A `recompute_conv_blocks` in
    #: `network_kwargs` wins.
    recompute_conv_blocks: ClassVar[bool | None] = None
    #: on CUDA, how many of cuDNN's algorithms for each convolution its search times (nnU-Net's training turns the
    #: search on): torch.backends.cudnn.benchmark_limit, 0 for every one; None keeps torch's (its first 10). Every
    #: one took SegMamba's 128^3 step from 131.7 to 129.5 ms on an H100, for about two minutes more in the first
    #: step (docs/performance.md, "cuDNN's full search at the 128^3 step").
    cudnn_benchmark_limit: ClassVar[int | None] = 0

    # counters of skipped non-finite steps (train_step); class-level zeros until a step sets them on the instance
    _non_finite_consecutive = _non_finite_in_epoch = num_non_finite_steps = _iteration_in_epoch = 0
    # (loss on the host, CUDA event of its arrival, epoch, iteration) of a step not yet checked for finiteness
    _unchecked_loss: tuple | None = None
    # the network and the loss compiled as one module, where the steps run as CUDA graphs (`initialize`)
    _compiled_network_and_loss: nn.Module | None = None
    # the kinds of step ("training", "validation") whose first run on the GPU has been logged (`_first_step_logged`)
    _first_steps_logged: frozenset = frozenset()

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # same signature as nnU-Net's: it records these arguments in checkpoints ('init_args') by name
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_cascaded:
            # nnU-Net's cascade trains on the previous stage's predictions of every training case, which its
            # five-fold cross-validation makes; each 70/10/20 fold predicts only its 10 % validation cases, so the
            # data loader would stop at the first missing one, and the training cases' own predictions would leak
            raise ValueError(f"{type(self).__name__} does not train nnU-Net's cascade ({configuration!r}, after "
                             f"{self.configuration_manager.previous_stage_name!r}): its 70/10/20 split leaves the "
                             f"previous stage's predictions of the training cases unmade; train 3d_fullres or "
                             f"3d_lowres instead")
        if self.seed is not None:
            random.seed(self.seed)
            np.random.seed(self.seed)
            torch.manual_seed(self.seed)
        for attribute, value in (("num_epochs", self.epochs),
                                 ("num_iterations_per_epoch", self.iterations_per_epoch),
                                 ("num_val_iterations_per_epoch", self.val_iterations_per_epoch)):
            if value is not None:
                if int(value) < 1:
                    raise ValueError(f"{type(self).__name__}: {attribute} must be >= 1, got {value}")
                setattr(self, attribute, int(value))
        self.enable_deep_supervision = bool(self.use_deep_supervision)
        check_cudnn_benchmark_limit(self.cudnn_benchmark_limit, f"{type(self).__name__}.cudnn_benchmark_limit")
        if self.compile_mode not in ("default", "reduce-overhead"):
            raise ValueError(f"{type(self).__name__}.compile_mode must be 'default' or 'reduce-overhead', "
                             f"got {self.compile_mode!r}")
        self._round_patch_size_up_to_network_stride()

    # ---- network -------------------------------------------------------------------------------------------
    def _round_patch_size_up_to_network_stride(self) -> None:
        """Round the configuration's patch up to a multiple of SegMamba's total stride, in the plans too."""
        old = [int(p) for p in self.configuration_manager.patch_size]
        new = [int(math.ceil(p / TOTAL_STRIDE) * TOTAL_STRIDE) for p in old]
        if new == old:
            return
        self.configuration_manager.configuration["patch_size"] = new
        # the plans this trainer saves (plans.json, checkpoint init_args) are what nnUNetv2_predict reads
        self.plans_manager.plans["configurations"][self.configuration_name]["patch_size"] = new
        self.print_to_log_file(f"SegMamba: patch size {old} rounded up to {new} (multiples of the network's "
                               f"total stride {TOTAL_STRIDE}; it pads to these sizes internally anyway)")

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """SegMamba for this configuration (also called by nnUNetv2_predict, with deep supervision off).

        2D configurations (2D patch) get `spatial_dims=2`. A classmethod (nnU-Net's is a staticmethod; both are
        called on the class) so that `network_kwargs` of the variant apply at inference as well.

        The deep-supervision heads are built whenever the trainer class trains with them
        (`use_deep_supervision`), also when nnUNetv2_predict asks for a network without deep supervision: the
        heads are then only switched off, so the checkpoint's state_dict (which has them) loads strictly.
        """
        spatial_dims = len(configuration_manager.patch_size)
        if spatial_dims not in (2, 3):
            raise ValueError(f"SegMamba needs a 2D or 3D patch, the configuration has "
                             f"{configuration_manager.patch_size}")
        net = cls._network(num_input_channels, num_output_channels, spatial_dims, bool(cls.use_deep_supervision))
        net.deep_supervision = bool(enable_deep_supervision) and bool(cls.use_deep_supervision)
        return net

    @classmethod
    def _network(cls, in_chans: int, out_chans: int, spatial_dims: int, deep_supervision: bool) -> nn.Module:
        """The network itself: SegMamba with `network_kwargs`. Trainers for another architecture override this
        one hook; it must return a module with the `deep_supervision` attribute and `deep_supervision_strides`,
        and a total stride of TOTAL_STRIDE."""
        from nnunet_segmamba.networks import SegMamba

        return SegMamba(in_chans=in_chans, out_chans=out_chans, spatial_dims=spatial_dims,
                        deep_supervision=deep_supervision, scan_backend=cls.scan_backend,
                        **dict(cls.network_kwargs))

    def initialize(self):
        super().initialize()
        # the tri-orientated mixers (MedMamba's SS2D has no such option) and the residual conv blocks; each reads its
        # flag when it runs, and the network is not traced yet (nnU-Net's compile is lazy)
        for recompute, flag, what in ((self.recomputes_mamba_branches(), "recompute_branches", "Mamba branches"),
                                      (self.recomputes_conv_blocks(), "recompute_activations",
                                       "conv blocks' norms and shortcuts")):
            modules = [m for m in self._segmamba().modules() if hasattr(m, flag)]
            if recompute is not None and modules:
                for module in modules:
                    setattr(module, flag, recompute)
                self.print_to_log_file(f"{what} recomputed in the backward pass: {recompute}")
        if self.uses_channels_last():
            # the parameters' data is replaced in place (same Parameter objects), so the optimizer keeps them; the
            # network is not traced yet, nnU-Net's compile is lazy
            self._segmamba().to(memory_format=torch.channels_last_3d)
            self.print_to_log_file("network weights in channels_last_3d")
        if self.uses_cuda_graphs():
            # nnU-Net compiled inline with the default mode (lazily: nothing is traced until the first call);
            # wrap the same module, whose parameters the optimizer already holds, in the chosen mode instead
            self.network = torch.compile(self._segmamba(), mode=self.compile_mode)
            self._compiled_network_and_loss = torch.compile(NetworkAndLoss(self._segmamba(), self.loss),
                                                            mode=self.compile_mode)
            self.print_to_log_file(f"torch.compile mode: {self.compile_mode} (CUDA graphs for the training and "
                                   f"validation steps; the training forward and the loss compiled together)")
        self.print_to_log_file(f"SegMamba scan backend: {self.scan_backend_in_use()}")
        self._limit_cudnn_search()

    def _limit_cudnn_search(self) -> None:
        """`cudnn_benchmark_limit` for this process's convolutions, on CUDA (as nnU-Net sets cudnn.benchmark)."""
        if self.device.type == "cuda" and self.cudnn_benchmark_limit is not None:
            torch.backends.cudnn.benchmark_limit = self.cudnn_benchmark_limit
            self.print_to_log_file(f"cuDNN's search times {self._cudnn_search_in_words()} per convolution")

    def _cudnn_search_in_words(self) -> str:
        """What cuDNN's search times per convolution: this trainer's limit, or torch's where it sets none."""
        limit = self.cudnn_benchmark_limit
        if limit is None:
            limit = torch.backends.cudnn.benchmark_limit
        return "every algorithm" if limit == 0 else f"up to {limit} algorithm{'s' if limit != 1 else ''}"

    def uses_cuda_graphs(self) -> bool:
        """True where the steps run as CUDA graphs: nnU-Net's rule compiled the network, on one GPU."""
        return (self.compile_mode == "reduce-overhead" and not self.is_ddp
                and isinstance(self.network, OptimizedModule))

    def recomputes_mamba_branches(self) -> bool | None:
        """Whether the Mamba branches are recomputed in the backward pass (`recompute_mamba_branches`); None where
        `network_kwargs` decides."""
        if {"recompute_mamba_branches", "gradient_checkpointing"} & set(self.network_kwargs):
            return None
        return self._recomputes(self.recompute_mamba_branches)

    def recomputes_conv_blocks(self) -> bool | None:
        """Whether the residual conv blocks recompute their norms and shortcuts in the backward pass
        (`recompute_conv_blocks`); None where `network_kwargs` decides."""
        if "recompute_conv_blocks" in self.network_kwargs:
            return None
        return self._recomputes(self.recompute_conv_blocks)

    def _recomputes(self, setting: bool | None) -> bool:
        # a trainer's True / False, else on a GPU from RECOMPUTE_FROM_VOXELS voxels per batch
        if setting is not None:
            return bool(setting)
        voxels = int(self.batch_size) * math.prod(int(p) for p in self.configuration_manager.patch_size)
        return self.device.type == "cuda" and voxels >= RECOMPUTE_FROM_VOXELS

    def uses_channels_last(self) -> bool:
        """True where the network's weights are put in channels_last_3d (`channels_last`): a 3D network on one
        CUDA device."""
        return (self.channels_last and self.device.type == "cuda" and not self.is_ddp
                and len(self.configuration_manager.patch_size) == 3)

    def scan_backend_in_use(self) -> str:
        """Which selective-scan implementation the network's Mamba layers start with on this trainer's device,
        and what was asked for (a kernel chosen by "auto" that fails at run time is replaced by the next one,
        with a warning: nnunet_segmamba.ssm.dispatch)."""
        from nnunet_segmamba.ssm import dispatch

        asked = {mixer.scan_backend for mixer in mamba_mixers(self._segmamba())}
        if not asked:
            return "none (no Mamba layers)"
        env = dispatch.backend_from_env()
        how = ", ".join(f"{name!r}" for name in sorted(asked)) + (f"; ${dispatch.ENV_VAR}={env}" if env else "")
        return ", ".join(sorted({dispatch.resolve(a, self.device) for a in asked})) + f" (asked for {how})"

    def _segmamba(self) -> nn.Module:
        """The SegMamba module itself, unwrapped from DDP / torch.compile."""
        if self.network is None:
            raise RuntimeError("The network is not built yet: call initialize() first.")
        net = self.network.module if self.is_ddp else self.network
        return net._orig_mod if isinstance(net, OptimizedModule) else net

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """Toggle the network's deep-supervision heads (nnU-Net's version reaches into its own U-Net decoder).

        A trainer without deep supervision keeps them off: nnU-Net switches them back on unconditionally at the
        end of `perform_actual_validation`.
        """
        self._segmamba().deep_supervision = bool(enabled) and self.enable_deep_supervision

    def _get_deep_supervision_scales(self):
        """Target scales of the heads, 1 / net.deep_supervision_strides per axis (nnU-Net derives them from
        its U-Net's pooling kernels, which SegMamba does not have)."""
        if not self.enable_deep_supervision:
            return None
        dim = len(self.configuration_manager.patch_size)
        return [[1.0 / s] * dim for s in self._segmamba().deep_supervision_strides]

    def _build_loss(self):
        """nnU-Net's loss, with the deep supervision weights as Python floats: nnU-Net's are numpy scalars, which
        dynamo traces as tensors, and the wrapper's `weight != 0` test on them would break the compiled training
        forward's graph (`NetworkAndLoss`) in two. Same values."""
        loss = super()._build_loss()
        if isinstance(loss, DeepSupervisionWrapper):
            loss.weight_factors = tuple(float(w) for w in loss.weight_factors)
        return loss

    def _set_batch_size_and_oversample(self) -> None:
        super()._set_batch_size_and_oversample()
        if self.max_batch_size is not None:
            self.batch_size = min(self.batch_size, int(self.max_batch_size))

    def configure_optimizers(self):
        """nnU-Net's SGD and poly schedule; with a GradScaler, SGD's fused kernel (the same update), with which
        GradScaler skips a step with non-finite gradients on the device instead of waiting for the GPU to say so
        (`_step_without_host_syncs`)."""
        optimizer, lr_scheduler = super().configure_optimizers()
        if self.grad_scaler is not None and type(optimizer) is torch.optim.SGD and not optimizer.defaults["fused"]:
            optimizer = torch.optim.SGD(self.network.parameters(), **{**optimizer.defaults, "fused": True})
            lr_scheduler = PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)
        return optimizer, lr_scheduler

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's. The loaded optimizer state brings its param groups' settings: a checkpoint written with or
        without the fused kernel keeps this trainer's choice."""
        super().load_checkpoint(filename_or_checkpoint)
        for group in self.optimizer.param_groups:
            group["fused"] = self.optimizer.defaults.get("fused")
        match_state_layouts_to_parameters(self.optimizer)

    # ---- data ----------------------------------------------------------------------------------------------
    @staticmethod
    def get_training_transforms(*args, **kwargs):
        """nnU-Net's training pipeline (same arguments) with elastic deformation switched on."""
        return enable_elastic_deformation(nnUNetTrainer.get_training_transforms(*args, **kwargs))

    def do_split(self):
        """Train on 70 % and validate on 10 % of the cases; the other 20 % (test) are never loaded.

        The split is seeded by the fold and stored in `splits_segmamba_70_10_20.json` next to nnU-Net's
        splits_final.json, which stays untouched.
        """
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        identifiers = self.dataset_class.get_identifiers(self.preprocessed_dataset_folder)
        split = load_or_create_split(self.preprocessed_dataset_folder_base, identifiers, self.fold)
        self.print_to_log_file(
            f"SegMamba 70/10/20 split, fold {self.fold}: {len(split['train'])} training, {len(split['val'])} "
            f"validation, {len(split['test'])} held-out test cases "
            f"({split_file_path(self.preprocessed_dataset_folder_base)})")
        return split["train"], split["val"]

    # ---- reliability (docs/reliability.md) -----------------------------------------------------------------
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._non_finite_in_epoch = self._iteration_in_epoch = 0

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's train_step, except that a step whose loss (or, without a GradScaler, gradient norm) is not
        finite does not change the weights; such steps are logged and counted, and after
        `max_consecutive_non_finite_steps` of them in a row training stops with a RuntimeError naming likely
        causes (docs/reliability.md).

        With a GradScaler (CUDA AMP) the step does not wait for the GPU (`_step_without_host_syncs`); without one
        (CPU), where waiting costs nothing, the loss is checked before the backward (`_step_checked_on_the_host`).
        """
        data, target = self._batch_on_device(batch)
        self._iteration_in_epoch += 1
        # a new iteration for the CUDA graphs: the previous step's outputs may now be overwritten (no-op without)
        torch.compiler.cudagraph_mark_step_begin()

        self.optimizer.zero_grad(set_to_none=True)
        with self._first_step_logged("training"):
            with self._autocast():
                loss = self._forward_and_loss(data, target)
            if self.grad_scaler is None:
                return self._step_checked_on_the_host(loss)
            return self._step_without_host_syncs(loss)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """nnU-Net's mixed precision around a step's forward and loss: fp16 autocast on CUDA, nothing elsewhere."""
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _first_step_logged(self, kind: str) -> contextlib.AbstractContextManager:
        """Around a training or validation step. The first of its kind on a GPU compiles it and has cuDNN time its
        convolutions' algorithms: minutes, in which nnU-Net logs nothing (SegMamba's first hippocampus epoch took
        244 s on one H100, the next ones 10 s; docs/performance.md). That step is logged, with what it does, and
        how long it took (waiting for the GPU, that once). Nothing on the CPU, where neither happens."""
        if self.device.type != "cuda" or kind in self._first_steps_logged:
            return contextlib.nullcontext()
        self._first_steps_logged = self._first_steps_logged | {kind}
        work = [what for what, happens in (("compiling it (torch.compile)", self._do_i_compile()),
                                           (f"cuDNN timing {self._cudnn_search_in_words()} for each convolution",
                                            torch.backends.cudnn.benchmark)) if happens]
        return self._timed_first_step(kind, work) if work else contextlib.nullcontext()

    @contextlib.contextmanager
    def _timed_first_step(self, kind: str, work: list[str]):
        self.print_to_log_file(f"first {kind} step: {' and '.join(work)}; minutes, once")
        start = time.perf_counter()
        yield
        torch.cuda.synchronize(self.device)
        self.print_to_log_file(f"first {kind} step done in {time.perf_counter() - start:.1f} s")

    def _forward_and_loss(self, data: torch.Tensor, target) -> torch.Tensor:
        """nnU-Net's loss of the network's outputs; where the steps run as CUDA graphs, both in one graph."""
        if self._compiled_network_and_loss is None:
            return self.loss(self.network(data), target)
        # a copy: the next replay overwrites the graph's output, and nnU-Net keeps each step's loss until the
        # epoch's end
        return self._compiled_network_and_loss(data, target).clone()

    def _step_without_host_syncs(self, loss: torch.Tensor) -> dict:
        """The step with a GradScaler, queued without waiting for the GPU: each wait would leave the GPU idle
        while the host launches what follows (about 15 ms per hippocampus step, docs/performance.md).

        A non-finite loss turns every gradient into NaN, so GradScaler skips the optimizer step on the device (the
        fused SGD of `configure_optimizers` reads its found-inf flag there) and lowers its scale, as it does for a
        finite loss with overflowing gradients. Under DDP the NaN gradients reach every rank, so all skip. The
        loss goes to the host in the background and is checked for the log and the count at the next step or at
        the end of the epoch (`_check_previous_loss`), by which time it has long arrived. The step returns the
        loss on the device (reading it waits for it, unlike reading the copy in flight).
        """
        self._check_previous_loss()
        finite = torch.isfinite(loss.detach())
        host_loss = loss.detach().float().to("cpu", non_blocking=True)
        arrived = None
        if loss.is_cuda:
            arrived = torch.cuda.Event()
            arrived.record()
        self._unchecked_loss = (host_loss, arrived, self.current_epoch, self._iteration_in_epoch)
        self.grad_scaler.scale(loss * torch.where(finite, 1.0, math.nan)).backward()
        # nnU-Net's unscale_, clip_grad_norm_(12), step and update, the unscale and clip inside the SGD pass
        amp_step.scaled_sgd_step(self.optimizer, self.grad_scaler, 12)
        return {"loss": loss.detach()}

    def _check_previous_loss(self) -> None:
        """Log and count the last queued step if its loss was not finite (see `_step_without_host_syncs`)."""
        if self._unchecked_loss is None:
            return
        host_loss, arrived, epoch, iteration = self._unchecked_loss
        self._unchecked_loss = None
        if arrived is not None:
            arrived.synchronize()
        if bool(torch.isfinite(host_loss)):
            self._non_finite_consecutive = 0
        else:
            self._count_non_finite_step(float(host_loss), "loss", epoch, iteration)

    def _step_checked_on_the_host(self, loss: torch.Tensor) -> dict:
        """The step without a GradScaler (CPU): a non-finite loss skips the backward, a non-finite gradient norm
        the optimizer step; gradients are cleared and the step returns a NaN loss."""
        if not self._finite_on_all_ranks(loss):
            return self._skip_non_finite_step(loss, "loss")
        loss.backward()
        # gradients are identical on all DDP ranks after backward: every rank takes the same decision
        grad_norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        if not torch.isfinite(grad_norm):
            return self._skip_non_finite_step(grad_norm, "gradient norm")
        self.optimizer.step()
        self._non_finite_consecutive = 0
        return {"loss": loss.detach().cpu().numpy()}

    def _batch_on_device(self, batch: dict) -> tuple[torch.Tensor, Any]:
        """The batch's data and target (a tensor, or a list of them with deep supervision) on the trainer's device,
        copied without waiting (nnU-Net's loaders hand over pinned memory on CUDA)."""
        target = batch["target"]
        if isinstance(target, list):
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)
        return batch["data"].to(self.device, non_blocking=True), target

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step: the loss, and the hard TP / FP / FN of the full-resolution output for the
        epoch's pseudo Dice (`hard_tp_fp_fn`), except that they stay on the device. nnU-Net's copies them to the
        host at every step, and each such wait leaves the GPU idle while the host then queues the next step (its
        copies, the graph replay, the eager loss and counts). `on_validation_epoch_end` brings all the steps'
        results over at once."""
        torch.compiler.cudagraph_mark_step_begin()  # as in train_step
        data, target = self._batch_on_device(batch)
        with self._first_step_logged("validation"), self._autocast():
            output = self.network(data)
            del data
            loss = self.loss(output, target)
        if self.enable_deep_supervision:
            output, target = output[0], target[0]
        tp, fp, fn = hard_tp_fp_fn(output, target, self.label_manager)
        return {"loss": loss.detach(), "tp_hard": tp, "fp_hard": fp, "fn_hard": fn}

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        """nnU-Net's, with the results `validation_step` left on the device brought to the host in one copy per
        kind, as the numpy arrays nnU-Net's steps return."""
        on_host = {key: torch.stack([torch.as_tensor(o[key]) for o in val_outputs]).cpu().numpy()
                   for key in (val_outputs[0] if val_outputs else ())}
        super().on_validation_epoch_end([{key: values[i] for key, values in on_host.items()}
                                         for i in range(len(val_outputs))])

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation (sliding window, mirroring), with nnU-Net's plain compile in place of the
        CUDA-graph one: its predictor calls the network several times per tile and keeps the outputs, which a
        graph replay could overwrite."""
        if not self.uses_cuda_graphs():
            return super().perform_actual_validation(save_probabilities)
        trained = self.network
        self.network = torch.compile(self._segmamba())
        try:
            return super().perform_actual_validation(save_probabilities)
        finally:
            self.network = trained

    def _finite_on_all_ranks(self, value: torch.Tensor) -> bool:
        # under DDP a rank that skipped backward would leave the others waiting in the gradient all-reduce
        finite = torch.isfinite(value.detach()).all()
        if self.is_ddp:
            flag = finite.to(self.device, torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag.bool()
        return bool(finite)

    def _skip_non_finite_step(self, value: torch.Tensor, what: str) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        self._count_non_finite_step(value.detach().float().cpu().item(), what, self.current_epoch,
                                    self._iteration_in_epoch)
        return {"loss": np.array(np.nan, dtype=np.float32)}

    def _count_non_finite_step(self, value: float, what: str, epoch: int, iteration: int) -> None:
        self._non_finite_consecutive += 1
        self._non_finite_in_epoch += 1
        self.num_non_finite_steps += 1
        self.print_to_log_file(
            f"WARNING: non-finite {what} ({value}) at epoch {epoch}, iteration {iteration}: step skipped, weights "
            f"unchanged ({self._non_finite_consecutive} in a row, at most {self.max_consecutive_non_finite_steps})")
        if self._non_finite_consecutive >= self.max_consecutive_non_finite_steps:
            raise non_finite_steps_error(self._non_finite_consecutive, epoch, iteration, what, type(self).__name__)

    def on_train_epoch_end(self, train_outputs: list[dict]):
        """nnU-Net's, with skipped (non-finite) steps left out of the mean loss and counted in the log."""
        self._check_previous_loss()  # the epoch's last step; every earlier loss has reached the host before it
        train_outputs = [{**o, "loss": _to_numpy(o["loss"])} for o in train_outputs]
        finite = [o for o in train_outputs if np.all(np.isfinite(o["loss"]))]
        if len(finite) < len(train_outputs):
            self.print_to_log_file(
                f"non-finite steps skipped in epoch {self.current_epoch}: {len(train_outputs) - len(finite)} of "
                f"{len(train_outputs)} (in this run: {self.num_non_finite_steps})")
        super().on_train_epoch_end(finite or train_outputs)

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint (same content, same rank-0 rule), written to a temporary file in the same folder
        and renamed over `filename` when complete: a kill mid-write leaves the previous checkpoint intact."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        with atomic_write_path(filename) as tmp:
            super().save_checkpoint(tmp)
