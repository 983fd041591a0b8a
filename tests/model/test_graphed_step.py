"""train.cuda_graph: the training step replayed from a CUDA graph against the same step run eagerly.

GPU only (CUDA graphs). Both sides run the fast path's kernels in float32; the eikonal jitter is set to 0
so that both draw the same samples. What may differ: the rasterizer backward's atomic additions, whose
order varies from run to run.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_fast_path import set_backwards
from test_model import IMG_RES, build, make_input, perturb_
from tolerances import assert_close

from pointavatar.config import LossConf
from pointavatar.model import point_avatar
from pointavatar.train.graphed_step import GraphedStep
from pointavatar.train.losses import Loss
from pointavatar.train.vgg import VGGPerceptualLoss, make_vgg16_features

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ATOMICS = "fp32; the rasterizer backward adds with atomics in a run-dependent order"
BF16_ATOMICS = "bf16 geometry operands: an atomics-order difference upstream can flip a bf16 rounding"


def batches(n_steps: int) -> list[tuple[dict, dict]]:
    """Different frames of the same shapes, as a training epoch gives them."""
    out = []
    p = IMG_RES * IMG_RES
    for s in range(n_steps):
        g = torch.Generator().manual_seed(100 + s)
        inp = {k: v.cuda() for k, v in make_input(2, seed=s).items()}
        gt = {
            "rgb": torch.rand(2, p, 3, generator=g).cuda(),
            "object_mask": (torch.rand(2, p, generator=g) > 0.5).float().cuda(),
        }
        out.append((inp, gt))
    return out


def make_loss(vgg: bool) -> Loss:
    """The training loss; with ``vgg`` the perceptual term too, on a randomly initialised VGG16 (its
    trained weights are a download the tests do not have)."""
    if not vgg:
        return Loss(LossConf(vgg_feature_weight=0.0), var_expression=None).cuda()
    torch.manual_seed(5)
    module = VGGPerceptualLoss(features=make_vgg16_features())
    return Loss(LossConf(vgg_feature_weight=0.1), var_expression=None, vgg=module).cuda()


def train_steps(model, embedding, steps, graphed: GraphedStep | None, loss_fn: Loss, sgd: bool = False):
    """Adam on the model and SparseAdam on a per-frame expression embedding (the trainer's set-up);
    returns every step's losses and gradients. sgd: plain SGD on both instead, for comparisons at
    bf16, where Adam's normalised steps would turn a flipped rounding in a near-zero gradient into
    a full learning-rate step (chaotic growth of the eager-graph difference over the steps)."""
    if sgd:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        opt_emb = torch.optim.SGD(embedding.parameters(), lr=1e-3)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        opt_emb = torch.optim.SparseAdam(embedding.parameters(), lr=1e-3)
    model.train()
    record = []
    for i, (inp, gt) in enumerate(steps):
        inp = dict(inp, expression=embedding(torch.full((2,), i % 3, device="cuda")))
        opt.zero_grad(set_to_none=True)
        opt_emb.zero_grad(set_to_none=True)
        if graphed is None:
            out = model(inp)
            losses = loss_fn(out, gt, flame=model.FLAMEServer, lbs_weight=10.0)
            losses["loss"].backward()
        else:
            losses = graphed(inp, gt, 10.0).losses
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        grads["embedding"] = embedding.weight.grad.to_dense().clone()
        record.append(({k: v.detach().clone() for k, v in losses.items()}, grads))
        opt.step()
        opt_emb.step()
    return record


def make_pair(flame_files, scope: str):
    eager = build(flame_files).cuda()
    perturb_(eager, 0.05)
    eager.implementation, eager.compile_scope = "fast", scope
    eager.render_backend = "cuda"  # the Triton rasterizer: the reference one waits for the device
    eager.geometry_bf16 = eager.deformer_bf16 = False  # fp32 unless a case asks for bf16 ("+bf16")
    graph = copy.deepcopy(eager)
    frames = make_input(3, seed=7)["expression"]  # three frames' expressions, trained per frame
    emb = torch.nn.Embedding.from_pretrained(frames, freeze=False, sparse=True).cuda()
    return eager, graph, emb, copy.deepcopy(emb)


def assert_same_steps(eager_record, graph_record, bf16: bool = False):
    """Losses and gradients of each step. bf16: the geometry's operands are rounded to bf16 (8 bits of
    mantissa), so an atomics-order difference upstream can flip a rounding: 10x the fp32 tolerances."""
    loose = 10.0 if bf16 else 1.0
    reason = BF16_ATOMICS if bf16 else ATOMICS
    for (loss_e, grad_e), (loss_g, grad_g) in zip(eager_record, graph_record, strict=True):
        for k, v in loss_e.items():
            assert_close(loss_g[k], v, rtol=1e-4 * loose, atol=1e-7 * loose, reason=reason)
        assert grad_g.keys() == grad_e.keys()
        for k, v in grad_e.items():
            scale = v.abs().max().item()
            assert_close(grad_g[k], v, rtol=1e-3 * loose, atol=1e-4 * loose * scale + 1e-9, reason=reason)


@pytest.mark.parametrize(
    ("scope", "chunk", "vgg", "backward"),
    [
        ("none", 0, False, "autograd"),
        ("per_point", 0, False, "autograd"),
        ("all", 0, False, "autograd"),
        ("all", 37, False, "autograd"),
        ("all", 0, True, "autograd"),
        ("all", 0, False, "fused"),
        ("all", 37, False, "fused"),
        ("none", 0, False, "fused"),
        ("all", 0, False, "autograd+bf16"),
        ("all", 37, False, "fused_recompute+deformer"),
    ],
)
def test_graphed_steps_equal_eager_steps(flame_files, monkeypatch, scope, chunk, vgg, backward):
    """Also with recomputation by chunks (torch.utils.checkpoint's backward inside the capture), with
    the VGG perceptual term (cuDNN convolutions inside the capture) and with the fused geometry backward
    (model.geometry_backward = "fused", its own compiled passes); "+bf16": with model.geometry_bf16 (the
    default; the other cases turn it off), under SGD; "+deformer": with model.deformer_backward = "fused"."""
    monkeypatch.setattr(point_avatar, "EIKONAL_JITTER", 0.0)
    eager, graph, emb_e, emb_g = make_pair(flame_files, scope)
    eager.recompute_chunk = graph.recompute_chunk = chunk
    set_backwards(eager, backward)
    set_backwards(graph, backward)
    steps = batches(4)
    loss_fn = make_loss(vgg)
    graphed = GraphedStep(graph, loss_fn)
    bf16 = "+bf16" in backward
    graph_record = train_steps(graph, emb_g, steps, graphed, loss_fn, sgd=bf16)
    eager_record = train_steps(eager, emb_e, steps, None, loss_fn, sgd=bf16)
    # Step 1 eager (new configuration), step 2 captured and replayed, steps 3-4 replayed.
    assert (graphed.eager_steps, graphed.captures, graphed.overflows) == (1, 1, 0)
    assert_same_steps(eager_record, graph_record, bf16=bf16)


def test_a_short_rasterizer_budget_reruns_the_step_eagerly(flame_files, monkeypatch):
    monkeypatch.setattr(point_avatar, "EIKONAL_JITTER", 0.0)
    eager, graph, emb_e, emb_g = make_pair(flame_files, "none")
    steps = batches(4)
    loss_fn = make_loss(vgg=False)
    graphed = GraphedStep(graph, loss_fn)
    real_eager = graphed._eager

    def eager_then_short_budget(*args):
        result = real_eager(*args)
        if graphed.eager_steps == 1:
            graphed.capacity = 16  # the first capture gets far too few (tile, point) pairs
        return result

    monkeypatch.setattr(graphed, "_eager", eager_then_short_budget)
    graph_record = train_steps(graph, emb_g, steps, graphed, loss_fn)
    eager_record = train_steps(eager, emb_e, steps, None, loss_fn)
    # Step 2's replay overflows and reruns eagerly (sizing the budget anew); step 3 captures again.
    assert (graphed.eager_steps, graphed.captures, graphed.overflows) == (2, 2, 1)
    assert_same_steps(eager_record, graph_record)
