"""flowmill's hand-written CPU forms of GELU(tanh) and RMS norm are PyTorch's functions:
same values, same gradients, and a second derivative refuses instead of being wrong."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flowmill.models.layers import DiTBlock, RMSNorm, apply_rotary, attention, gelu_tanh


def grad_of(fn, x: torch.Tensor, weights: torch.Tensor, *params: torch.Tensor):
    """(output, gradient of sum(output * weights) for x and each param)."""
    out = fn(x)
    grads = torch.autograd.grad((out * weights).sum(), (x, *params))
    return out.detach(), grads


def test_gelu_tanh_is_pytorchs_in_value_and_gradient():
    x = (torch.randn(64, 300) * 4).requires_grad_()  # far into both tails
    weights = torch.randn(64, 300)
    got, (grad,) = grad_of(gelu_tanh, x, weights)
    # Against PyTorch's GELU in float64: in fp32 its gradient rounds to 0 beyond x ~ -5 where
    # the sigmoid form still carries the ~1e-6 true value.
    exact = x.detach().double().requires_grad_()
    want, (want_grad,) = grad_of(lambda v: F.gelu(v, approximate="tanh"), exact, weights.double())
    assert torch.allclose(got.double(), want, atol=1e-6, rtol=1e-6)
    assert torch.allclose(grad.double(), want_grad, atol=1e-5, rtol=1e-5)


def test_rms_norm_is_pytorchs_in_value_and_gradients():
    torch.manual_seed(0)
    ours, theirs = RMSNorm(32, eps=1e-6), torch.nn.RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(32))
        theirs.weight.copy_(ours.weight)
    # A strided view, as queries taken out of a fused qkv projection are.
    x = torch.randn(4, 10, 3, 2, 32)[:, :, 0].requires_grad_()
    weights = torch.randn(4, 10, 2, 32)
    got, grads = grad_of(ours, x, weights, ours.weight)
    want, want_grads = grad_of(theirs, x, weights, theirs.weight)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    for grad, want_grad in zip(grads, want_grads):
        assert torch.allclose(grad, want_grad, atol=1e-4, rtol=1e-5)
    assert list(ours.state_dict()) == ["weight"]


@pytest.mark.parametrize("layer", ["gelu", "rms_norm"])
def test_second_derivative_refuses(layer):
    fn = gelu_tanh if layer == "gelu" else RMSNorm(8)  # eps None: nn.RMSNorm's default
    x = torch.randn(3, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(fn(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad.sum().backward()


def test_bf16_and_inference_take_pytorchs_kernels():
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))
    bf16 = x.bfloat16().requires_grad_()
    assert torch.equal(gelu_tanh(bf16), F.gelu(bf16, approximate="tanh"))


def test_rotary_scores_depend_on_the_distance_only():
    """The same query and key at every position: after ``apply_rotary`` their scores depend on i - j only,
    and position 0 is left as it is."""
    q, k = torch.randn(1, 2, 1, 8).expand(1, 2, 6, 8), torch.randn(1, 2, 1, 8).expand(1, 2, 6, 8)
    scores = apply_rotary(q) @ apply_rotary(k).transpose(-1, -2)  # (1, 2, 6, 6)
    torch.testing.assert_close(scores[..., 1:, 1:], scores[..., :-1, :-1])
    assert not torch.allclose(scores[..., 0, 0], scores[..., 0, 3])
    torch.testing.assert_close(apply_rotary(q)[..., 0, :], q[..., 0, :])


def test_attention_softcap_bounds_the_logits_with_tanh():
    """A soft-capped attention is the softmax of cap·tanh(q·k/sqrt(Dh) / cap); no cap is PyTorch's attention."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (8 * torch.randn(2, 3, 5, 4, generator=generator) for _ in range(3))  # logits far beyond the cap
    logits = q @ k.transpose(-1, -2) / 2.0  # sqrt(Dh) = 2
    assert logits.abs().max() > 20
    expected = (5.0 * torch.tanh(logits / 5.0)).softmax(-1) @ v  # (B, H, L, Dh)
    torch.testing.assert_close(attention(q, k, v, softcap=5.0), expected.transpose(1, 2).reshape(2, 5, 12))
    torch.testing.assert_close(attention(q, k, v), (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 12))
    torch.testing.assert_close(attention(q, k, v, softcap=1e6), attention(q, k, v), atol=1e-4, rtol=1e-4)  # a far cap is none


def test_dit_block_dropout_acts_only_in_training_and_softcap_changes_the_output():
    torch.manual_seed(0)
    plain = DiTBlock(16, 2, 8, dropout=0.0)
    dropped = DiTBlock(16, 2, 8, dropout=0.5)
    capped = DiTBlock(16, 2, 8, attn_softcap=0.5)
    with torch.no_grad():
        for param in plain.parameters():
            param.normal_(0.0, 0.5)  # a live modulation, so both residual branches reach the output
    dropped.load_state_dict(plain.state_dict())
    capped.load_state_dict(plain.state_dict())
    x, cond = torch.randn(2, 5, 16), torch.randn(2, 8)
    torch.testing.assert_close(dropped.eval()(x, cond), plain(x, cond))
    dropped.train()
    first, second = dropped(x, cond), dropped(x, cond)
    assert not torch.allclose(first, second) and not torch.allclose(first, plain(x, cond))
    assert not torch.allclose(capped(x, cond), plain(x, cond), atol=1e-3)
