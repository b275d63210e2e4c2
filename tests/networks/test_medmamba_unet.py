"""MedMambaUNet: shapes for nnU-Net 2D patch sizes, deep-supervision sizes, reuse of MedMamba's encoder names,
gradients, errors."""
from __future__ import annotations

import pytest
import torch

from nnunet_segmamba.networks.medmamba import MedMamba, PatchMerging2D, SSConvSSM
from nnunet_segmamba.networks.medmamba_unet import MedMambaUNet

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_default_layout_and_parameter_count():
    net = MedMambaUNet(1, 3)
    assert net.depths == (2, 2, 2, 2) and net.dims == [32, 64, 128, 256]
    assert [len(layer.blocks) for layer in net.layers] == [2, 2, 2, 2]
    assert all(isinstance(b, SSConvSSM) for layer in net.layers for b in layer.blocks)
    assert [type(layer.downsample) for layer in net.layers] == [PatchMerging2D] * 3 + [type(None)]
    assert _num_params(net) == 2_354_403
    assert not hasattr(net, "ds_heads")
    assert MedMambaUNet(1, 3, dims=32).dims == [32, 64, 128, 256]


def test_drop_path_rises_linearly_over_all_blocks():
    net = MedMambaUNet(1, 2, depths=(1, 2, 1, 1), dims=8, drop_path_rate=0.2)
    rates = [b.drop_path.drop_prob for layer in net.layers for b in layer.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_encoder_keys_match_the_medmamba_classifier():
    # stage weights of a MedMamba classifier of the same widths load into the U-Net's `layers`
    unet, clf = MedMambaUNet(1, 2, **TINY), MedMamba(in_chans=1, num_classes=2, **TINY)
    stages = {k: v for k, v in clf.state_dict().items() if k.startswith("layers.")}
    assert set(stages) == {k for k in unet.state_dict() if k.startswith("layers.")}
    missing, unexpected = unet.load_state_dict(stages, strict=False)
    assert not unexpected and not any(k.startswith("layers.") for k in missing)


@pytest.mark.parametrize("size", [(64, 64), (56, 40), (33, 17), (16, 32)])
def test_output_shape(size):
    torch.manual_seed(0)
    net = MedMambaUNet(2, 5, **TINY).eval()
    with torch.no_grad():
        y = net(torch.randn(2, 2, *size))
    assert y.shape == (2, 5, *size) and y.dtype == torch.float32 and torch.isfinite(y).all()


@pytest.mark.parametrize("size", [(56, 40), (64, 48), (33, 17)])
def test_deep_supervision_outputs_match_nnunet_target_sizes(size):
    net = MedMambaUNet(1, 3, deep_supervision=True, **TINY)
    outs = net(torch.randn(1, 1, *size))
    # nnU-Net's targets for scales 1 / (1, 2, 4, 8): round(size * scale) per axis
    expected = [tuple(round(s / stride) for s in size) for stride in MedMambaUNet.deep_supervision_strides]
    assert [tuple(o.shape[2:]) for o in outs] == expected
    assert all(o.shape[:2] == (1, 3) for o in outs)
    net.deep_supervision = False  # validation / inference: the heads stay, a single output comes back
    assert net(torch.randn(1, 1, *size)).shape == (1, 3, *size)
    assert any(k.startswith("ds_heads.") for k in net.state_dict())


def test_pad_input_changes_nothing_for_multiples_of_16_and_eval_is_deterministic():
    torch.manual_seed(0)
    a = MedMambaUNet(1, 2, **TINY).eval()
    b = MedMambaUNet(1, 2, pad_input=False, **TINY).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 1, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
        assert torch.equal(a(x), a(x))  # eval mode is deterministic (no drop path)


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_every_parameter_receives_a_gradient(deep_supervision):
    torch.manual_seed(0)
    # no drop path: with a batch of 2 it can drop an SSM branch for both samples, leaving it without gradient
    net = MedMambaUNet(2, 3, deep_supervision=deep_supervision, drop_path_rate=0.0, **TINY).train()
    outs = net(torch.randn(2, 2, 24, 40))
    outs = outs if isinstance(outs, list) else [outs]
    sum(o.square().mean() for o in outs).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert not missing, f"parameters without gradient: {missing}"
    assert any(n.startswith("ds_heads.") for n, _ in net.named_parameters()) == deep_supervision


@pytest.mark.parametrize("kwargs, x_shape, message", [
    (dict(), (1, 1, 32, 32, 32), "MedMambaUNet (2D) expects a (B, C, H, W) tensor"),
    (dict(), (1, 3, 32, 32), "3 channels but the network was built with in_chans=1"),
    (dict(pad_input=False), (1, 1, 56, 40), "not a multiple of the total stride 16"),
    (dict(), (1, 1, 16, 12), "deepest stage (stride 16) would hold a single pixel"),
    (dict(), (1, 1, 0, 32), "empty spatial size"),
])
def test_clear_errors_for_bad_input(kwargs, x_shape, message):
    net = MedMambaUNet(1, 2, **TINY, **kwargs)
    with pytest.raises(ValueError) as err:
        net(torch.randn(*x_shape))
    assert message in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(in_chans=0), "in_chans and out_chans must be positive"),
    (dict(depths=(1, 1, 1)), "depths needs 4 positive block counts"),
    (dict(depths=(1, 0, 1, 1)), "depths needs 4 positive block counts"),
    (dict(dims=(8, 16, 32)), "dims needs 4 even widths"),
    (dict(dims=(7, 14, 28, 56)), "dims needs 4 even widths"),
    (dict(dims=(8, 16, 32, 32)), "dims must be (C, 2C, 4C, 8C)"),
    (dict(drop_path_rate=1.0), "drop_path_rate must be in [0, 1)"),
    (dict(d_state=0), "d_state must be positive"),
])
def test_clear_errors_for_bad_arguments(kwargs, message):
    args = {"in_chans": 1, "out_chans": 2, **TINY, **kwargs}
    with pytest.raises(ValueError) as err:
        MedMambaUNet(**args)
    assert message in str(err.value)
