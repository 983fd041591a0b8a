"""The fused geometry node's Triton passes against its PyTorch passes on a GPU, in bf16 (the GPU tests of
test_triton_mlp.py)."""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def bf16_errors(monkeypatch, recompute_sweep: bool) -> list[tuple[float, float]]:
    """For out, grad, x's gradient and every parameter's gradient of the paper's geometry network (perturbed
    off its init) at 20,000 points: (the PyTorch bf16 passes' error, the Triton ones' error, through
    geometry_fused.TRITON_PASSES), each against the fp32 node (TF32 off) and relative to its largest
    magnitude."""
    from pointavatar.config import load_conf
    from pointavatar.model import geometry_fused
    from pointavatar.model.geometry import GeometryNetwork

    torch.manual_seed(0)
    net = GeometryNetwork(load_conf(ROOT / "confs" / "subject1.conf").model.geometry_network).cuda()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # off the geometric init, so every path carries gradient
    x0 = (torch.rand(20_000, 3, device="cuda") - 0.5) * 1.2
    g = torch.Generator(device="cuda").manual_seed(1)

    def run(dtype, triton):
        monkeypatch.setattr(geometry_fused, "TRITON_PASSES", triton)
        net.zero_grad()
        x = x0.clone().requires_grad_(True)
        out, grad = geometry_fused.forward_with_gradient_fused(
            net, x, save_dtype=dtype, mm_dtype=dtype, recompute_sweep=recompute_sweep
        )
        g.manual_seed(1)
        loss = (torch.randn(out.shape, device="cuda", generator=g) * out).sum()
        loss = loss + (torch.randn(grad.shape, device="cuda", generator=g) * grad).sum()
        loss.backward()
        return [out.detach(), grad.detach(), x.grad] + [p.grad.clone() for p in net.parameters()]

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        exact = run(None, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    torch_bf16, other_bf16 = run(torch.bfloat16, False), run(torch.bfloat16, True)
    errors = []
    for e, t, r in zip(exact, torch_bf16, other_bf16, strict=True):
        scale = e.abs().max().item() + 1e-30
        errors.append(((t - e).abs().max().item() / scale, (r - e).abs().max().item() / scale))
    return errors
