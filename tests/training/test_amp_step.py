"""`amp_step.scaled_sgd_step` against nnU-Net's end of train_step (unscale_, clip_grad_norm_, step, update), on
the CPU with torch's CPU GradScaler and fused SGD."""
import copy

import pytest
import torch

from nnunet_segmamba.training.amp_step import fuses_unscale_and_clip, scaled_sgd_step

SGD = dict(lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(2, 8, 3), torch.nn.InstanceNorm3d(8, affine=True),
                               torch.nn.LeakyReLU(), torch.nn.Conv3d(8, 3, 1))


def _pair(growth_interval: int = 2000):
    """Two identical models, each with fused SGD and a GradScaler: one for nnU-Net's calls, one for ours."""
    runs = []
    model = _model()
    for _ in range(2):
        m = copy.deepcopy(model)
        runs.append((m, torch.optim.SGD(m.parameters(), **SGD, fused=True),
                     torch.amp.GradScaler("cpu", growth_interval=growth_interval)))
    return runs


def _backward(model, scaler, seed: int, loss_scale: float = 1.0, bad: float | None = None) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 6, 6, 6, generator=g)
    loss = model(x).square().mean() * loss_scale
    if bad is not None:
        loss = loss * bad
    scaler.scale(loss).backward()


def _nnunets_step(model, optimizer, scaler, max_norm: float) -> None:
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    scaler.step(optimizer)
    scaler.update()


def _steps(loss_scales, max_norm: float, growth_interval: int = 2000, bad_at: int | None = None):
    (ref, ref_opt, ref_scaler), (ours, opt, scaler) = _pair(growth_interval)
    assert fuses_unscale_and_clip(opt, scaler)
    for i, loss_scale in enumerate(loss_scales):
        bad = float("inf") if i == bad_at else None
        for model, optimizer, sc in ((ref, ref_opt, ref_scaler), (ours, opt, scaler)):
            optimizer.zero_grad(set_to_none=True)
            _backward(model, sc, seed=i, loss_scale=loss_scale, bad=bad)
        _nnunets_step(ref, ref_opt, ref_scaler, max_norm)
        scaled_sgd_step(opt, scaler, max_norm)
    return (ref, ref_opt, ref_scaler), (ours, opt, scaler)


def _assert_same_weights_and_momentum(ref, ours, rtol: float = 0.0, atol: float = 0.0) -> None:
    (ref_model, ref_opt, _), (model, opt, _) = ref, ours
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=name)
    for p_ref, p in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[p_ref]["momentum_buffer"],
                                   rtol=rtol, atol=atol)


def _assert_same_training_state(ref, ours, rtol: float = 0.0, atol: float = 0.0) -> None:
    """The weights, SGD's momentum and the GradScaler's state (what a checkpoint saves) all agree."""
    _assert_same_weights_and_momentum(ref, ours, rtol, atol)
    assert ours[2].state_dict() == ref[2].state_dict()


def test_unclipped_steps_are_nnunets_bit_for_bit():
    """Gradient norms under the clip: the divisor is the scale alone, a power of two, as nnU-Net's unscale."""
    ref, ours = _steps([1e-3] * 3, max_norm=1e6)
    _assert_same_training_state(ref, ours)


def test_clipped_steps_are_nnunets_within_float32_rounding():
    ref, ours = _steps([1.0, 5.0, 2.0], max_norm=0.5)
    # the clip was active: the clipped update differs from the unclipped one by far more than the tolerance
    (unclipped, *_), _ = _steps([1.0, 5.0, 2.0], max_norm=1e6)
    weight = next(iter(ours[0].parameters()))
    assert (weight - next(iter(unclipped.parameters()))).abs().max() > 1e-4
    _assert_same_training_state(ref, ours, rtol=1e-6, atol=1e-7)


def test_non_finite_gradients_skip_the_step_and_back_off_the_scale():
    ref, ours = _steps([1.0, 1.0, 1.0], max_norm=0.5, bad_at=1)
    scale = ours[2].get_scale()
    assert scale == 65536.0 / 2  # one backoff, as GradScaler after overflowing gradients
    _assert_same_training_state(ref, ours, rtol=1e-6, atol=1e-7)

    # the skipped step changed neither the weights nor the momentum
    before, after = _steps([1.0], max_norm=0.5), _steps([1.0, 1.0], max_norm=0.5, bad_at=1)
    _assert_same_weights_and_momentum(before[1], after[1])


def test_the_scale_grows_after_growth_interval_good_steps():
    ref, ours = _steps([1e-3] * 4, max_norm=1e6, growth_interval=2)
    assert ours[2].get_scale() == 65536.0 * 4
    _assert_same_training_state(ref, ours)


def test_other_optimizers_take_nnunets_calls():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), **SGD)  # foreach, not fused: no found-inf flag on the device
    scaler = torch.amp.GradScaler("cpu")
    assert not fuses_unscale_and_clip(optimizer, scaler)
    _backward(model, scaler, seed=0)
    scaled_sgd_step(optimizer, scaler, 12.0)
    assert scaler._per_optimizer_states == {}  # update() ran, after unscale_ and step recorded their checks
    assert all(p.grad is not None for p in model.parameters())


def test_a_disabled_scaler_gives_the_plain_clipped_step():
    """A disabled GradScaler (the benchmark without fp16) scales nothing: nnU-Net's calls, i.e. clip and step."""
    (ref, ref_opt, _), (ours, opt, _) = _pair()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert not fuses_unscale_and_clip(opt, scaler)
    for model, optimizer in ((ref, ref_opt), (ours, opt)):
        _backward(model, scaler, seed=0)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    ref_opt.step()
    scaled_sgd_step(opt, scaler, 0.5)
    _assert_same_weights_and_momentum((ref, ref_opt, None), (ours, opt, None))


def test_a_step_before_any_scaled_backward_names_the_fix():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), **SGD, fused=True)
    with pytest.raises(RuntimeError, match=r"call scaler.scale\(loss\).backward\(\) before the step"):
        scaled_sgd_step(optimizer, torch.amp.GradScaler("cpu"), 12.0)
