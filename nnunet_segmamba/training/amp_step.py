"""The end of nnU-Net's train_step under a GradScaler, with fewer passes over the gradients.

nnU-Net's `train_step` ends with `scaler.unscale_(optimizer)` (a pass reading and writing every gradient, which also
finds non-finite ones), `clip_grad_norm_(params, 12)` (a pass reading them for the norm, then one reading and writing
them to clip), `scaler.step(optimizer)` and `scaler.update()`. SGD's fused kernel divides each gradient by a scale
on the device and skips the step on a found-inf flag (the protocol `GradScaler.step` uses with it), so the unscale
and the clip can be one divisor, scale / clip factor, applied inside the SGD pass: of the four passes, the norm's and
SGD's remain. The norm of the scaled gradients also finds the non-finite ones (an inf or NaN makes it non-finite),
and a power-of-two scale divides it exactly.

The update is nnU-Net's: where the clip factor is 1, bit for bit, else within a rounding of float32 (nnU-Net rounds
g / scale * factor, this g / (scale / factor)). The one difference: finite scaled gradients whose norm overflows
float32 count as non-finite here (GradScaler then lowers its scale and the step is skipped), where nnU-Net's clip
would scale them to zero.
"""
from __future__ import annotations

import torch


def fuses_unscale_and_clip(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> bool:
    """Whether `scaled_sgd_step` takes the one-divisor path: SGD with its fused kernel, an enabled GradScaler (a
    disabled one scales nothing: its calls are the plain clip and step), and a torch with
    `torch.nn.utils.get_total_norm` (2.6)."""
    return (type(optimizer) is torch.optim.SGD and bool(optimizer.defaults.get("fused")) and scaler.is_enabled()
            and hasattr(torch.nn.utils, "get_total_norm"))


def scaled_sgd_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, max_norm: float) -> None:
    """After `scaler.scale(loss).backward()`: nnU-Net's unscale, gradient-norm clip at `max_norm`, optimizer step
    and scale update, queued without waiting for the GPU. For SGD with its fused kernel, in two passes over the
    gradients (module docstring); otherwise nnU-Net's calls."""
    if not fuses_unscale_and_clip(optimizer, scaler):
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_norm)
        scaler.step(optimizer)
        scaler.update()
        return
    # GradScaler's scale and growth tracker, created by scaler.scale(); they are what its state_dict saves
    scale, growth_tracker = scaler._get_scale_async(), scaler._growth_tracker
    if scale is None or growth_tracker is None:
        raise RuntimeError("scaled_sgd_step: the GradScaler has no scale yet; call scaler.scale(loss).backward() "
                           "before the step")
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    scaled_norm = torch.nn.utils.get_total_norm(grads)
    found_inf = (~torch.isfinite(scaled_norm)).float()
    # clip_grad_norm_'s factor on the unscaled gradients, min(1, max_norm / (norm + 1e-6)); GradScaler's 1 / scale
    norm = scaled_norm * scale.double().reciprocal().float()
    factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    optimizer.grad_scale, optimizer.found_inf = scale / factor, found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf
    # GradScaler.update's rule (back off after a skipped step, grow after growth_interval good ones), on its state
    torch._amp_update_scale_(scale, growth_tracker, found_inf, scaler.get_growth_factor(),
                             scaler.get_backoff_factor(), scaler.get_growth_interval())
