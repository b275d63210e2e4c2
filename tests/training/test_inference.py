"""The tile forward of the predictor's fast path (`nnunet_segmamba.training.inference`), on the CPU."""
import pytest
import torch

from nnunet_segmamba.training.inference import (MirroredTileForward, half_precision_convs, mirror_mean,
                                                prepare_for_cuda_inference)


def test_mirror_mean_averages_eight_flips():
    calls = []

    def net(x):
        calls.append(x)
        return x * 2

    x = torch.randn(1, 2, 3, 4, 5)
    torch.testing.assert_close(mirror_mean(net, x, (2, 3, 4)), 2 * x)
    assert len(calls) == 8
    assert len({tuple(c.flatten()[:8].tolist()) for c in calls}) == 8  # eight distinct flips

    def first_axis_ramp(x):  # not flip-equivariant: the mean gives axis 2's ramp the same weight both ways
        ramp = torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1, 1)
        return x * ramp

    ones = torch.ones(1, 1, 4, 2, 2)
    expected = torch.full_like(ones, (4 - 1) / 2)
    torch.testing.assert_close(mirror_mean(first_axis_ramp, ones, (2, 3, 4)), expected)


def test_batched_mirroring_is_one_forward_pass_with_the_same_mean():
    calls = []
    conv = torch.nn.Conv3d(2, 3, 3, padding=1)  # not flip-equivariant: the flips give eight different outputs

    def net(x):
        calls.append(tuple(x.shape))
        return conv(x)

    x = torch.randn(2, 2, 4, 6, 5)
    with torch.no_grad():
        per_flip = mirror_mean(net, x, (2, 3, 4))
        batched = mirror_mean(net, x, (2, 3, 4), batched=True)
    assert calls[-1] == (16, 2, 4, 6, 5) and len(calls) == 9  # 8 passes of 2 tiles, then one of 8 x 2
    torch.testing.assert_close(batched, per_flip)


def test_tile_forward_falls_back_to_one_pass_per_flip_when_out_of_memory():
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)
    batches, lines = [], []

    def net(x):  # "too little memory" for more than one tile at a time
        batches.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return conv(x)

    forward = MirroredTileForward(net, batched=True, log=lines.append)
    x = torch.randn(1, 1, 4, 5, 6)
    with torch.no_grad():
        first, second = forward(x, (2, 3, 4)), forward(x, (2, 3, 4))
        expected = mirror_mean(conv, x, (2, 3, 4))
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    assert batches == [8] + [1] * 16 and forward.batched is False  # tried batched once, then per flip
    assert len(lines) == 1 and "one pass per mirroring" in lines[0]


def test_tile_forward_puts_the_input_in_the_networks_layout_and_mirrors_only_when_asked():
    seen = []

    def net(x):
        seen.append((x.shape[0], x.is_contiguous(memory_format=torch.channels_last_3d)))
        return x

    forward = MirroredTileForward(net, batched=True, memory_format=torch.channels_last_3d)
    x = torch.randn(1, 3, 4, 5, 6)
    torch.testing.assert_close(forward(x, None), x)
    torch.testing.assert_close(forward(x, (2, 3)), x)
    assert seen == [(1, True), (4, True)]  # no mirroring: one tile; two axes: 4 flips in one pass


def test_half_precision_convs_keeps_names_and_loads_float32_weights():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.ConvTranspose3d(4, 2, 2, 2),
                              torch.nn.Conv1d(2, 2, 3), torch.nn.InstanceNorm3d(2, affine=True))
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    half_precision_convs(net)
    dtypes = {k: v.dtype for k, v in net.state_dict().items()}
    assert dtypes == {"0.weight": torch.float16, "0.bias": torch.float16, "1.weight": torch.float16,
                      "1.bias": torch.float16, "2.weight": torch.float32, "2.bias": torch.float32,
                      "3.weight": torch.float32, "3.bias": torch.float32}
    net.load_state_dict(reference)  # strict, float32 into float16: what nnU-Net's predictor does per fold
    torch.testing.assert_close(net[0].weight, reference["0.weight"].half())


def test_prepared_3d_network_keeps_its_state_dict_names_and_loads_per_fold():
    from torch._dynamo import OptimizedModule

    net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.InstanceNorm3d(4, affine=True))
    fold = {k: torch.randn_like(v) for k, v in net.state_dict().items()}
    compiled, memory_format = prepare_for_cuda_inference(net)  # lazily compiled: nothing runs here
    assert isinstance(compiled, OptimizedModule) and compiled._orig_mod is net and not net.training
    assert memory_format == torch.channels_last_3d
    assert net[0].weight.dtype == torch.float16 and net[0].weight.is_contiguous(memory_format=memory_format)
    compiled._orig_mod.load_state_dict(fold)  # as nnUNetPredictor loads each fold
    assert net[0].weight.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(net[0].weight, fold["0.weight"].half())
    torch.testing.assert_close(net[1].weight, fold["1.weight"])


def test_prepared_2d_network_keeps_its_layout_and_types():
    net = torch.nn.Conv2d(2, 4, 3)
    _, memory_format = prepare_for_cuda_inference(net)
    assert memory_format is None and net.weight.dtype == torch.float32 and net.weight.is_contiguous()
