"""SegMamba trainers: lookup through nnUNet_extTrainer, pickling, network built from real plans (3D and 2D),
deep supervision, elastic deformation, compile policy. Uses a tiny synthetic dataset planned and preprocessed
by nnU-Net itself (in-process, a few seconds)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_segmamba.training import trainers
from nnunet_segmamba.training.augmentation import ELASTIC_P, find_spatial_transforms

REPO = Path(__file__).resolve().parents[2]
DATASET_ID = 986
DATASET_NAME = f"Dataset{DATASET_ID:03d}_SegMambaUnit"
CONFIGURATIONS = ("2d", "3d_fullres")  # for the nnunet_dirs fixture (conftest.py)
TINY = trainers.nnUNetTrainerSegMamba_tiny


def _tiny_batches(patch, count: int) -> list[dict]:
    """`count` batches of 2 as nnU-Net's 3D loader hands them to the tiny trainer: one-channel data and the deep
    supervision targets (labels 0-2) at strides 1, 2, 4, 8; the same ones on every call."""
    g = torch.Generator().manual_seed(0)
    return [{"data": torch.randn(2, 1, *patch, generator=g),
             "target": [torch.randint(0, 3, (2, 1, *[p // s for p in patch]), generator=g).float()
                        for s in (1, 2, 4, 8)]} for _ in range(count)]


# ---- lookup and pickling ------------------------------------------------------------------------------------
def test_every_trainer_is_found_through_nnunet_ext_trainer(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.setenv("nnUNet_extTrainer", str(REPO / "trainers"))
    names = [n for n in trainers.__all__ if n != "nnUNetTrainerSegMambaBase"]
    assert len(names) == 6 + 4 * len(trainers.EPOCH_VARIANT_COUNTS)
    for name in names:
        found = recursive_find_trainer_class_by_name(name)
        assert found is getattr(trainers, name)


@pytest.mark.parametrize("name", trainers.__all__)
def test_trainer_classes_pickle_by_reference(name):
    cls = getattr(trainers, name)
    assert cls.__module__.startswith("nnunet_segmamba.training.") and cls.__qualname__ == name
    assert pickle.loads(pickle.dumps(cls)) is cls


def test_epoch_variants_change_only_the_epochs():
    for parent in trainers.EPOCH_VARIANT_PARENTS:
        for n in trainers.EPOCH_VARIANT_COUNTS:
            cls = getattr(trainers, f"{parent.__name__}_{n}epoch{'' if n == 1 else 's'}")
            assert cls.__bases__ == (parent,) and cls.epochs == n
            assert set(vars(cls)) - {"__module__", "__qualname__", "__doc__"} == {"epochs"}


# ---- with a real plans file ---------------------------------------------------------------------------------
def test_init_applies_tunables_and_rounds_the_patch(make_trainer):
    t = make_trainer(TINY, "3d_fullres")
    assert (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch) == (2, 4, 2)
    assert all(p % 16 == 0 for p in t.configuration_manager.patch_size)
    assert t.plans_manager.plans["configurations"]["3d_fullres"]["patch_size"] == t.configuration_manager.patch_size
    assert t.my_init_kwargs["configuration"] == "3d_fullres" and t.my_init_kwargs["fold"] == 0


def test_cudnn_search_limit_is_set_for_cuda_only(make_trainer, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark_limit", 10)  # restored after the test
    t = make_trainer(TINY, "3d_fullres")
    t._limit_cudnn_search()
    assert torch.backends.cudnn.benchmark_limit == 10  # a CPU trainer leaves torch's setting alone
    t.device = torch.device("cuda")
    t._limit_cudnn_search()
    assert torch.backends.cudnn.benchmark_limit == type(t).cudnn_benchmark_limit == 0
    assert "cuDNN's search times every algorithm per convolution" in Path(t.log_file).read_text()
    for wrong in (-1, True, 2.0):  # True would pass as the int 1
        monkeypatch.setattr(type(t), "cudnn_benchmark_limit", wrong)
        with pytest.raises(ValueError, match="cudnn_benchmark_limit must be None or an int >= 0"):
            make_trainer(TINY, "3d_fullres")


def test_cascade_is_refused_and_its_first_stage_is_accepted(make_trainer):
    """nnU-Net's cascade as its planner writes it for large images: 3d_lowres, then 3d_cascade_fullres on its
    predictions. The first stage is a plain configuration; the second needs cross-validation predictions of every
    training case, which the 70/10/20 split does not make, so the trainer stops with the fix in its message."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed

    fullres = load_json(str(Path(str(nnUNet_preprocessed)) / DATASET_NAME / "nnUNetPlans.json"))[
        "configurations"]["3d_fullres"]
    cascade = {"3d_lowres": {**fullres, "next_stage": "3d_cascade_fullres"},
               "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}}
    assert not make_trainer(TINY, "3d_lowres", extra_configurations=cascade).is_cascaded
    with pytest.raises(ValueError, match=r"does not train nnU-Net's cascade \('3d_cascade_fullres', after "
                                         r"'3d_lowres'\).*train 3d_fullres or 3d_lowres instead"):
        make_trainer(TINY, "3d_cascade_fullres", extra_configurations=cascade)


@pytest.mark.parametrize("configuration, dims", [("3d_fullres", 3), ("2d", 2)])
def test_network_from_plans_trains_with_deep_supervision(make_trainer, configuration, dims):
    from nnunet_segmamba.networks import SegMamba

    torch.manual_seed(0)
    t = make_trainer(TINY, configuration)
    t.initialize()
    assert isinstance(t.network, SegMamba) and t.network.spatial_dims == dims
    assert t._get_deep_supervision_scales() == [[1 / s] * dims for s in (1, 2, 4, 8)]
    t.set_deep_supervision_enabled(True)
    patch = t.configuration_manager.patch_size
    target = [torch.randint(0, 3, (2, 1, *[p // s for p in patch])).float() for s in (1, 2, 4, 8)]
    out = t.train_step({"data": torch.randn(2, 1, *patch), "target": target})
    assert np.isfinite(out["loss"])
    t.set_deep_supervision_enabled(False)
    with torch.no_grad():
        assert t.network(torch.randn(1, 1, *patch)).shape == (1, 3, *patch)


def test_log_names_the_scan_backend_in_use(make_trainer, monkeypatch):
    from nnunet_segmamba.ssm import dispatch

    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    t = make_trainer(TINY, "3d_fullres")
    t.initialize()
    expected = dispatch.resolve("auto", torch.device("cpu"))  # the fused CPU scan, or torch without a compiler
    assert t.scan_backend_in_use() == f"{expected} (asked for 'auto')"
    assert f"SegMamba scan backend: {expected} (asked for 'auto')" in Path(t.log_file).read_text()
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert t.scan_backend_in_use() == f"torch (asked for 'auto'; ${dispatch.ENV_VAR}=torch)"

    ablation = make_trainer(trainers.nnUNetTrainerSegMambaNoMamba_1epoch, "3d_fullres")
    ablation.network = type(ablation).build_network_architecture(
        ablation.plans_manager, ablation.configuration_manager, 1, 3, False)
    assert ablation.scan_backend_in_use() == "none (no Mamba layers)"


def test_checkpoint_loads_into_the_inference_network(make_trainer):
    # nnUNetv2_predict builds the network with enable_deep_supervision=False and loads the weights strictly
    t = make_trainer(TINY, "3d_fullres")
    t.initialize()
    net = TINY.build_network_architecture(t.plans_manager, t.configuration_manager, 1, 3,
                                          enable_deep_supervision=False)
    net.load_state_dict(t.network.state_dict())  # strict
    assert net.deep_supervision is False


def test_no_deep_supervision_variant_keeps_heads_off(make_trainer):
    t = make_trainer(trainers.nnUNetTrainerSegMambaCE_1epoch, "3d_fullres")
    t.initialize()
    assert t.enable_deep_supervision is False and t._get_deep_supervision_scales() is None
    t.set_deep_supervision_enabled(True)  # what nnU-Net does after its final validation
    assert t.network.deep_supervision is False
    assert type(t.loss).__name__ == "RobustCrossEntropyLoss"


def test_no_mamba_variant_builds_the_ablation(make_trainer):
    t = make_trainer(trainers.nnUNetTrainerSegMambaNoMamba_1epoch, "3d_fullres")
    net = type(t).build_network_architecture(t.plans_manager, t.configuration_manager, 1, 3, False)
    assert all(isinstance(stage, torch.nn.Identity) for stage in net.vit.stages)


@pytest.mark.parametrize("device,setting,compiles", [
    ("cpu", None, False), ("cpu", "t", False),  # never on CPU: the demo and CI keep their times
    ("cuda", None, True), ("cuda", "t", True), ("cuda", "f", False),
])
def test_compiles_by_nnunets_rule(make_trainer, monkeypatch, device, setting, compiles):
    """nnU-Net's rule: compiled on CUDA unless nnUNet_compile=f, never on CPU (the device is set after
    construction, so that no GPU is needed)."""
    if setting is None:
        monkeypatch.delenv("nnUNet_compile", raising=False)
    else:
        monkeypatch.setenv("nnUNet_compile", setting)
    t = make_trainer(TINY, "3d_fullres")
    t.device = torch.device(device)
    assert t._do_i_compile() is compiles


def test_first_steps_on_a_gpu_are_logged_with_their_time(make_trainer, monkeypatch):
    """The first training and the first validation step on a GPU compile and run cuDNN's search (minutes with
    nothing else logged): each is logged before and after, once; on the CPU, or on a GPU where neither happens,
    nothing is. The steps run on the CPU here: the GPU's part is the context they run in, entered with the
    device set after construction and the wait for the GPU stubbed."""
    t = make_trainer(TINY, "3d_fullres")
    t.initialize()
    log = Path(t.log_file)
    batch, = _tiny_batches(t.configuration_manager.patch_size, 1)
    kinds = []
    logged = type(t)._first_step_logged
    monkeypatch.setattr(type(t), "_first_step_logged", lambda self, kind: kinds.append(kind) or logged(self, kind))
    t.train_step(batch)
    with torch.no_grad():
        t.validation_step(batch)
    assert kinds == ["training", "validation"] and "first training step" not in log.read_text()  # the CPU

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # as nnU-Net's training sets it
    monkeypatch.setattr(type(t), "_do_i_compile", lambda self: True)  # as on CUDA
    t.device = torch.device("cuda")
    for kind in ("training", "training", "validation"):
        with t._first_step_logged(kind):
            pass
    text = log.read_text()
    for kind in ("training", "validation"):
        assert text.count(f"first {kind} step: compiling it (torch.compile) and cuDNN timing every algorithm for "
                          f"each convolution; minutes, once") == 1
        assert text.count(f"first {kind} step done in ") == 1

    quiet = make_trainer(TINY, "3d_fullres")
    quiet.device = torch.device("cuda")
    monkeypatch.setattr(type(t), "_do_i_compile", lambda self: False)  # nnUNet_compile=f
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    quiet_log = Path(quiet.log_file)  # nnU-Net names logs by the second: possibly the first trainer's file
    before = quiet_log.read_text() if quiet_log.exists() else ""
    with quiet._first_step_logged("training"):
        pass
    assert "first training step" not in quiet_log.read_text()[len(before):]


def test_compiled_network_is_reached_through_the_wrapper(make_trainer, tmp_path):
    """What nnU-Net does with a compiled network: deep supervision toggled on, and weights saved from, the
    module inside the OptimizedModule."""
    t = make_trainer(TINY, "3d_fullres")
    t.initialize()
    net = t.network
    t.network = torch.compile(net)  # as nnUNetTrainer.initialize does on CUDA (not run: nothing is compiled here)
    assert t._segmamba() is net
    t.set_deep_supervision_enabled(False)
    assert net.deep_supervision is False
    t.set_deep_supervision_enabled(True)
    assert net.deep_supervision is True
    assert t._get_deep_supervision_scales()[0] == [1.0, 1.0, 1.0]
    t.save_checkpoint(str(tmp_path / "checkpoint.pth"))
    saved = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert saved.keys() == net.state_dict().keys()  # no "_orig_mod." prefix: nnUNetv2_predict loads it as is


def test_cuda_graph_compile_mode_on_one_gpu(make_trainer, monkeypatch):
    """Where nnU-Net's rule compiles, the network nnU-Net compiled (default mode, lazily) is compiled again in
    compile_mode, on the module the optimizer updates; the final validation gets nnU-Net's plain compile and the
    training network back afterwards; DDP and compile_mode="default" keep nnU-Net's compile."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    modes = []
    real_compile = torch.compile

    def recording_compile(model, **kwargs):
        modes.append(kwargs.get("mode"))
        return real_compile(model, **kwargs)  # lazy: nothing is traced here

    monkeypatch.setattr(torch, "compile", recording_compile)
    monkeypatch.setattr(TINY, "_do_i_compile", lambda self: True)  # as on CUDA
    t = make_trainer(TINY, "3d_fullres")
    t.initialize()
    # nnU-Net's own compiles (the network, its Dice loss) in the default mode, then the network's and the training
    # forward's (network and loss) in compile_mode
    assert modes[-2:] == ["reduce-overhead"] * 2 and set(modes[:-2]) == {None} and t.uses_cuda_graphs()
    optimized = {id(p) for group in t.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in t.network.parameters()} == optimized
    training_forward = t._compiled_network_and_loss._orig_mod
    assert training_forward.network is t._segmamba() and training_forward.loss is t.loss
    assert "torch.compile mode: reduce-overhead" in Path(t.log_file).read_text()

    seen = []
    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation", lambda self, save: seen.append(self.network))
    trained = t.network
    t.perform_actual_validation()
    assert modes[-1] is None and seen[0] is not trained and seen[0]._orig_mod is trained._orig_mod
    assert t.network is trained
    t.is_ddp = True  # nnU-Net wraps the compiled network in DDP after compiling it
    assert not t.uses_cuda_graphs()

    class DefaultCompile(TINY):
        compile_mode = "default"

    modes.clear()
    t = make_trainer(DefaultCompile, "3d_fullres")
    t.initialize()
    assert set(modes) == {None} and not t.uses_cuda_graphs() and t._compiled_network_and_loss is None

    class Unknown(TINY):
        compile_mode = "max-autotune"

    with pytest.raises(ValueError, match="compile_mode must be 'default' or 'reduce-overhead'"):
        make_trainer(Unknown, "3d_fullres")


def test_fused_sgd_state_follows_the_parameters_layout():
    """Momentum buffers from a checkpoint of another memory format: the fused SGD kernel pairs elements by memory
    position, so without matching the layouts it applies each momentum to the wrong weight (on the CPU as on CUDA);
    matched, the step is the unfused one."""
    from nnunet_segmamba.training.base import match_state_layouts_to_parameters

    g = torch.Generator().manual_seed(0)
    weight, grad, momentum = (torch.randn(4, 3, 2, 3, 3, generator=g) for _ in range(3))

    def step(fused: bool, match: bool) -> torch.Tensor:
        p = torch.nn.Parameter(weight.clone().contiguous(memory_format=torch.channels_last_3d))
        opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, fused=fused)
        opt.state[p]["momentum_buffer"] = momentum.clone()  # channels-first, as a channels-first run saved it
        if match:
            match_state_layouts_to_parameters(opt)
            assert opt.state[p]["momentum_buffer"].stride() == p.stride()
        p.grad = grad.clone().contiguous(memory_format=torch.channels_last_3d)
        opt.step()
        return p.detach()

    reference = step(fused=False, match=False)
    torch.testing.assert_close(step(fused=True, match=True), reference)
    assert not torch.allclose(step(fused=True, match=False), reference)  # what the matching prevents


def test_channels_last_trainer_resumes_a_channels_first_checkpoint(make_trainer, tmp_path, monkeypatch):
    """Where the trainer puts the weights in channels_last_3d (one GPU; forced here on the CPU), the optimizer
    updates those same parameters and a checkpoint of a channels-first run loads with its momentum laid out as the
    weights. On the CPU the trainer keeps channels-first."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    first = make_trainer(TINY, "3d_fullres")
    assert not first.uses_channels_last()
    first.on_train_start()
    try:
        first.on_train_epoch_start()
        first.train_step(next(first.dataloader_train))
        first.save_checkpoint(str(tmp_path / "checkpoint.pth"))
    finally:
        first.on_train_end()

    monkeypatch.setattr(TINY, "uses_channels_last", lambda self: True)
    monkeypatch.setattr(nnUNetTrainer, "_do_i_compile", lambda self: False)
    t = make_trainer(TINY, "3d_fullres")
    t.initialize()
    convs = [m.weight for m in t.network.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last_3d) and not w.is_contiguous()
                         for w in convs if w.shape[1] > 1 and w.shape[2:].numel() > 1)
    assert {id(p) for p in t.network.parameters()} == {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    t.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    buffers = [(p, t.optimizer.state[p]["momentum_buffer"]) for p in t.network.parameters() if p in t.optimizer.state]
    assert buffers and all(b.stride() == p.stride() for p, b in buffers)
    assert any(not p.is_contiguous() for p, _ in buffers)


def test_activations_are_recomputed_from_a_batch_size(make_trainer, monkeypatch):
    """On a GPU the trainers recompute the Mamba branches and the conv blocks' norms and shortcuts from
    RECOMPUTE_FROM_VOXELS voxels per batch (batch size x patch), not below; never on the CPU; the tunables and
    network_kwargs override the rule, and every mixer and block of the network follows it after initialize()."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_segmamba.nn import TriOrientedMamba
    from nnunet_segmamba.training import base

    monkeypatch.setattr(nnUNetTrainer, "_do_i_compile", lambda self: False)
    monkeypatch.setattr(TINY, "recompute_mamba_branches", True)
    t = make_trainer(TINY, "3d_fullres")
    t.initialize()
    mixers = [m for m in t.network.modules() if isinstance(m, TriOrientedMamba)]
    assert mixers and all(m.recompute_branches is True for m in mixers)

    monkeypatch.setattr(TINY, "recompute_mamba_branches", None)
    assert t.recomputes_mamba_branches() is False  # the CPU
    t.device = torch.device("cuda")  # the rule only; nothing runs on it
    voxels = t.batch_size * int(np.prod(t.configuration_manager.patch_size))
    monkeypatch.setattr(base, "RECOMPUTE_FROM_VOXELS", voxels + 1)
    assert t.recomputes_mamba_branches() is False
    monkeypatch.setattr(base, "RECOMPUTE_FROM_VOXELS", voxels)
    assert t.recomputes_mamba_branches() is True
    monkeypatch.setattr(TINY, "recompute_mamba_branches", False)
    assert t.recomputes_mamba_branches() is False
    monkeypatch.setattr(TINY, "network_kwargs", {**TINY.network_kwargs, "recompute_mamba_branches": True})
    assert t.recomputes_mamba_branches() is None

    # the conv blocks follow the same rule, with their own switch
    from nnunet_segmamba.networks.blocks import _ResBlockLayer

    blocks = [m for m in t.network.modules() if isinstance(m, _ResBlockLayer)]
    assert blocks and all(b.recompute_activations is False for b in blocks)  # initialized on the CPU
    assert t.recomputes_conv_blocks() is True  # the voxel rule on "cuda", as above
    monkeypatch.setattr(TINY, "recompute_conv_blocks", False)
    assert t.recomputes_conv_blocks() is False
    monkeypatch.setattr(TINY, "network_kwargs", {**TINY.network_kwargs, "recompute_conv_blocks": True})
    assert t.recomputes_conv_blocks() is None


def test_training_forward_and_loss_trace_as_one_graph(make_trainer):
    """The module the CUDA-graph trainer compiles for its training forward (the network and nnU-Net's deep
    supervision loss, whose Dice part nnU-Net compiled itself) traces without a graph break, which would split
    the CUDA graph, and gives the loss of the two called one after the other. Traced with the eager backend on
    the CPU: dynamo's trace is what is checked here; the kernels are checked on a GPU (test below)."""
    from nnunet_segmamba.training.base import NetworkAndLoss

    t = make_trainer(TINY, "3d_fullres")
    t.initialize()
    t.loss.loss.dc = torch.compile(t.loss.loss.dc)  # as nnU-Net's _build_loss does where it compiles
    patch = t.configuration_manager.patch_size
    g = torch.Generator().manual_seed(0)
    data = torch.randn(2, 1, *patch, generator=g)
    target = [torch.randint(0, 3, (2, 1, *[p // s for p in patch]), generator=g).float() for s in (1, 2, 4, 8)]
    traced = torch.compile(NetworkAndLoss(t.network, t.loss), backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(traced(data, target), t.loss(t.network(data), target))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_steps_give_the_plain_compiles_losses_on_a_gpu(make_trainer, monkeypatch):
    """The tiny trainer on a GPU, three training and two validation steps from the same weights on the same
    batches: with CUDA graphs the losses of nnU-Net's plain compile (within fp16 autocast rounding), and no step
    fell back from the graphs."""
    from torch._dynamo.utils import counters

    monkeypatch.delenv("nnUNet_compile", raising=False)
    patch = make_trainer(TINY, "3d_fullres").configuration_manager.patch_size
    batches = _tiny_batches(patch, 3)
    losses = {}
    for mode in ("default", "reduce-overhead"):
        torch.manual_seed(0)
        t = make_trainer(type(f"Tiny_{mode}", (TINY,), {"compile_mode": mode}), "3d_fullres", "cuda")
        t.initialize()
        assert t.uses_cuda_graphs() is (mode == "reduce-overhead")
        counters.clear()
        t.network.train()
        train = [float(t.train_step(b)["loss"]) for b in batches]
        t.network.eval()
        with torch.no_grad():
            val = [float(t.validation_step(b)["loss"]) for b in batches[:2]]
        losses[mode] = train + val
        assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    np.testing.assert_allclose(losses["reduce-overhead"], losses["default"], rtol=1e-2)
    assert np.isfinite(losses["default"]).all()


def test_validation_step_gives_nnunets_results_and_leaves_them_on_the_device(make_trainer):
    """The tiny trainer's validation steps against nnU-Net's own on the same weights and batches: the same loss and
    hard counts, left as tensors (no copy to the host per step), and the same pseudo Dice and loss logged at the
    epoch's end."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    torch.manual_seed(0)
    t = make_trainer(TINY, "3d_fullres")
    t.initialize()
    batches = _tiny_batches(t.configuration_manager.patch_size, 2)
    t.on_validation_epoch_start()
    with torch.no_grad():
        ours = [t.validation_step(b) for b in batches]
        theirs = [nnUNetTrainer.validation_step(t, b) for b in batches]
    for o, n in zip(ours, theirs):
        assert set(o) == set(n) and all(isinstance(v, torch.Tensor) for v in o.values())
        for key in n:
            np.testing.assert_allclose(o[key].numpy(), n[key], rtol=1e-6, err_msg=key)
    assert sum(float(o["tp_hard"].sum()) for o in ours) > 0  # the counts compared are not all zero
    logged = {}
    for name, outputs, on_epoch_end in (("ours", ours, t.on_validation_epoch_end),
                                        ("nnU-Net", theirs, lambda o: nnUNetTrainer.on_validation_epoch_end(t, o))):
        on_epoch_end(outputs)
        logged[name] = [t.logger.get_value(key, step=-1) for key in ("mean_fg_dice", "dice_per_class_or_region",
                                                                      "val_losses")]
    np.testing.assert_allclose(np.hstack(logged["ours"]), np.hstack(logged["nnU-Net"]), rtol=1e-6)


@pytest.mark.parametrize("labels, regions, channels", [
    ({"background": 0, "a": 1, "b": 2}, None, 3),
    ({"background": 0, "a": 1, "b": 2, "ignore": 3}, None, 3),
    ({"background": 0, "whole": [1, 2], "core": 2}, [1, 2], 2),
    ({"background": 0, "whole": [1, 2], "core": 2, "ignore": 3}, [1, 2], 2),
], ids=["labels", "labels+ignore", "regions", "regions+ignore"])
def test_hard_counts_are_nnunets_for_every_kind_of_label(labels, regions, channels):
    """`hard_tp_fp_fn` against nnU-Net's validation_step (through a stand-in trainer whose network passes the
    logits through): plain labels, regions, each with and without an ignore label."""
    from types import SimpleNamespace

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_segmamba.training.base import hard_tp_fp_fn

    manager = LabelManager(labels, regions)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, channels, 6, 5, 4, generator=g)
    label_map = torch.randint(0, 4 if manager.has_ignore_label else 3, (2, 1, 6, 5, 4), generator=g)
    if regions is None:
        target = label_map.float()
    else:  # nnU-Net's region targets: one channel per region, then the ignore label's
        target = torch.cat([(label_map == 1) | (label_map == 2), label_map == 2]
                           + ([label_map == 3] if manager.has_ignore_label else []), 1).float()
    stand_in = SimpleNamespace(device=torch.device("cpu"), network=torch.nn.Identity(), enable_deep_supervision=False,
                               loss=lambda output, target: torch.zeros(()), label_manager=manager)
    theirs = nnUNetTrainer.validation_step(stand_in, {"data": logits, "target": target.clone()})
    ours = hard_tp_fp_fn(logits, target, manager)
    for key, value in zip(("tp_hard", "fp_hard", "fn_hard"), ours):
        np.testing.assert_array_equal(value.numpy(), theirs[key], err_msg=key)
    assert ours[0].shape == (2,) and ours[0].sum() > 0


def test_trainer_iterations_are_taken_apart(make_trainer, monkeypatch):
    """benchmarks/trainer_iteration.py on the CPU: nnU-Net's loop pieces run and each iteration is the wait for a
    batch plus the step (no GPU figure on the CPU). Data loading in this process: spawning nnU-Net's loader
    workers under pytest costs half a minute."""
    from benchmarks.trainer_iteration import measure_iterations

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    t = make_trainer(TINY, "3d_fullres")
    r = measure_iterations(t, warmup=1, iterations=3, profiled=2, validation_iterations=2)
    assert r["step_ms_median"] > 0 and r["wait_ms_median"] >= 0
    assert r["iteration_ms_median"] >= r["step_ms_median"]
    assert r["gpu_busy_ms_per_iteration"] is None and r["profiled_iterations"] == 0
    assert r["gpu_idle_ms_per_iteration_by_part"] is None and r["host_waiting_for_gpu_ms_per_iteration"] is None
    assert r["host_ms_per_iteration_by_part"] is None and r["host_waiting_for_gpu_ms_per_iteration_by_part"] is None
    assert r["train_iterations_seconds_per_epoch"] == pytest.approx(r["iteration_ms_mean"] * 4 / 1e3)
    assert r["validation_iterations"] == 2 and r["validation_iteration_ms_mean"] > 0
    assert r["validation_iterations_seconds_per_epoch"] == pytest.approx(
        r["validation_iteration_ms_mean"] * t.num_val_iterations_per_epoch / 1e3)
    assert r["batch_size"] == 2 and len(r["patch_size"]) == 3


def test_trainer_iteration_sets_a_trainers_attribute_from_its_name():
    from benchmarks.trainer_iteration import parse_trainer

    assert parse_trainer("nnUNetTrainer") == ("nnUNetTrainer", {})
    assert parse_trainer("nnUNetTrainerSegMamba:channels_last=False") == ("nnUNetTrainerSegMamba",
                                                                          {"channels_last": False})
    assert parse_trainer("X:compile_mode='default'") == ("X", {"compile_mode": "default"})
    for bad in ("X:channels_last", "X:channels_last=nope", "X:1a=2"):
        with pytest.raises(SystemExit, match="NAME:ATTRIBUTE=VALUE"):
            parse_trainer(bad)


def test_iteration_parts_are_labelled_for_the_profiler(make_trainer, monkeypatch):
    """Each part of train_step shows under its label in a profile, and the patches are gone afterwards."""
    from benchmarks.trainer_iteration import labelled_parts

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    t = make_trainer(TINY, "3d_fullres")
    t.on_train_start()
    try:
        t.on_train_epoch_start()
        network, backward, clip = t.network, torch.Tensor.backward, torch.nn.utils.clip_grad_norm_
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with labelled_parts(t) as labels:
                t.train_step(next(t.dataloader_train))
        names = {e.name for e in prof.events()}
        assert labels == {"network forward", "loss forward", "backward", "clip_grad_norm_", "finiteness check",
                          "network and loss forward"}
        assert labels <= names
        assert any(name.startswith("Optimizer.step") for name in names)
        assert t.network is network and torch.Tensor.backward is backward
        assert torch.nn.utils.clip_grad_norm_ is clip
        assert not {"_finite_on_all_ranks", "_forward_and_loss"} & set(vars(t))
    finally:
        for loader in (t.dataloader_train, t.dataloader_val):
            if hasattr(loader, "_finish"):
                loader._finish()


def test_gpu_idle_and_host_time_go_to_the_innermost_open_part():
    from benchmarks.trainer_iteration import BETWEEN, gpu_idle_by_part, merged_within, time_by_part

    assert merged_within([(5, 8), (0, 3), (2, 4), (9, 20)], window=(1, 10)) == [[1, 4], [5, 8], [9, 10]]

    busy = [(0, 10), (5, 12), (20, 30), (34, 40)]  # overlapping kernels are counted once
    parts = [(0, 25, "step"), (11, 18, "loss"), (26, 36, "optimizer"), (31, 33, "sync")]
    busy_time, idle = gpu_idle_by_part(busy, parts, window=(0, 45))
    assert busy_time == 12 + 10 + 6
    # idle: 12-20 (loss 12-18, step 18-20), 30-34 (optimizer 30-31 and 33-34, sync 31-33), 40-45 (nothing open)
    assert idle == {"loss": 6, "step": 2, "optimizer": 2, "sync": 2, BETWEEN: 5}
    assert busy_time + sum(idle.values()) == 45
    # the host's whole window by part, and its waits (overlapping ones counted once)
    assert time_by_part([(0, 45)], parts, window=(0, 45)) == {"step": 18, "loss": 7, "optimizer": 8, "sync": 2,
                                                               BETWEEN: 10}
    assert time_by_part([(12, 14), (13, 14), (30, 32)], parts, window=(0, 45)) == {"loss": 2, "optimizer": 1,
                                                                                    "sync": 1}


def test_split_used_for_training(make_trainer):
    t = make_trainer(TINY, "3d_fullres")
    train, val = t.do_split()
    assert (len(train), len(val)) == (4, 1)
    assert (Path(t.preprocessed_dataset_folder_base) / "splits_segmamba_70_10_20.json").is_file()


def test_elastic_deformation_is_on_and_visible(make_trainer):
    t = make_trainer(TINY, "3d_fullres")
    rot, dummy_2d, _, mirror = t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    patch = t.configuration_manager.patch_size
    pipeline = t.get_training_transforms(patch, rot, None, mirror, dummy_2d)
    (spatial,) = find_spatial_transforms(pipeline)
    assert spatial.p_elastic_deform == ELASTIC_P > 0
    assert spatial.p_rotation == 0.2 and spatial.p_scaling == 0.2  # nnU-Net's others unchanged

    # with p=1 and no rotation/scaling: a real displacement of more than one voxel, and the image changes
    spatial.p_elastic_deform, spatial.p_rotation, spatial.p_scaling = 1.0, 0.0, 0.0
    np.random.seed(0)
    torch.manual_seed(0)
    params = spatial.get_parameters(image=torch.zeros(1, *patch))
    assert params["elastic_offsets"].abs().max() > 1.0
    image = torch.arange(int(np.prod(patch)), dtype=torch.float32).reshape(1, *patch)
    deformed = spatial._apply_to_image(image, **params)
    assert deformed.shape == image.shape and not torch.allclose(deformed, image, atol=1)


# ---- nnUNetTrainerMedMamba ------------------------------------------------------------------------------------
class _TinyMedMamba(trainers.nnUNetTrainerMedMamba):
    """nnUNetTrainerMedMamba with a narrow network, for a fast CPU step (not exported, not looked up by name)."""

    network_kwargs = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}
    max_batch_size = 2


def test_medmamba_trainer_builds_its_network_from_a_2d_plan_and_trains(make_trainer):
    from nnunet_segmamba.networks.medmamba_unet import MedMambaUNet

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a shared 2-core machine are ~10x slower
    try:
        torch.manual_seed(0)
        t = make_trainer(_TinyMedMamba, "2d")
        t.initialize()
        assert isinstance(t.network, MedMambaUNet) and t.network.dims == [8, 16, 32, 64]
        assert t._get_deep_supervision_scales() == [[1 / s] * 2 for s in (1, 2, 4, 8)]
        patch = t.configuration_manager.patch_size
        assert len(patch) == 2 and all(p % 16 == 0 for p in patch)
        t.set_deep_supervision_enabled(True)
        target = [torch.randint(0, 3, (2, 1, *[p // s for p in patch])).float() for s in (1, 2, 4, 8)]
        before = [p.detach().clone() for p in t.network.parameters()]
        out = t.train_step({"data": torch.randn(2, 1, *patch), "target": target})
        assert np.isfinite(out["loss"])
        assert any(not torch.equal(a, b) for a, b in zip(before, t.network.parameters()))
        # what nnUNetv2_predict does: rebuild without deep supervision, load strictly
        net = _TinyMedMamba.build_network_architecture(t.plans_manager, t.configuration_manager, 1, 3,
                                                       enable_deep_supervision=False)
        net.load_state_dict(t.network.state_dict())
        with torch.no_grad():
            assert net.eval()(torch.randn(1, 1, *patch)).shape == (1, 3, *patch)
    finally:
        torch.set_num_threads(threads)


def test_medmamba_trainer_refuses_3d_configurations(make_trainer):
    t = make_trainer(trainers.nnUNetTrainerMedMamba, "3d_fullres")
    with pytest.raises(ValueError, match="nnUNetTrainerMedMamba is 2D only: use -c 2d"):
        t.initialize()
    with pytest.raises(ValueError, match="2D only"):
        trainers.nnUNetTrainerMedMamba_1epoch.build_network_architecture(
            t.plans_manager, t.configuration_manager, 1, 3, enable_deep_supervision=False)
