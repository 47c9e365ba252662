"""The randomisation check redraws TorchScript parameters tensor by tensor (#11 item 8)."""
import torch

from conftest import make_unet_instancenorm_prelu
from EsegetaLib.metrics.randomisation import randomisable_layers, randomised_copies


def test_torchscript_layers_are_redrawn_like_eager_ones():
    eager = make_unet_instancenorm_prelu()
    traced = torch.jit.trace(eager, torch.randn(1, 1, 16, 16, 16))
    names_eager = [n for n, _ in randomisable_layers(eager)]
    names_traced = [n for n, _ in randomisable_layers(traced)]
    assert names_traced == names_eager and len(names_traced) > 5  # the same stages, output side first
    before = {n: p.detach().clone() for n, p in traced.named_parameters()}
    *_, (last, model) = list(randomised_copies(traced, seed=0))
    after = dict(model.named_parameters())
    for name, value in before.items():
        new = after[name].detach()
        if new.dim() >= 2:  # conv weights: redrawn within PyTorch's default bound 1/sqrt(fan_in)
            fan_in = new[0].numel()
            assert not torch.equal(new, value) and float(new.abs().max()) <= fan_in ** -0.5 + 1e-7, name
    assert all(torch.equal(p, before[n]) for n, p in traced.named_parameters())  # the original is untouched
    x = torch.randn(1, 1, 16, 16, 16)
    assert not torch.allclose(model(x), traced(x))
