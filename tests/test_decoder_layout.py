"""The decoder's CNN part runs in the memory format it is told to, whatever the layout of the map it receives.

On CPU a convolution's output follows its input's layout, and the recovered map ``z`` is a channels_last view of the
token tensor; these tests pin the decoder's own choice, forward and backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergevq.tokenizer.decoder import Decoder
from mergevq.tokenizer.model import MergeVQ

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _cnn_modules(decoder: Decoder) -> list[tuple[str, nn.Module]]:
    """Every conv and GroupNorm of the CNN part (levels, output norm and conv); not the MixFFN depth-wise convs."""
    found = [(f"levels.{n}", m) for n, m in decoder.levels.named_modules() if isinstance(m, (nn.Conv2d, nn.GroupNorm))]
    return found + [("norm_out", decoder.norm_out), ("conv_out", decoder.conv_out)]


def _layout(t: Tensor) -> str:
    # Shapes here have B, C > 1 and H·W > 1, so the two formats cannot both hold.
    if t.is_contiguous():
        return "nchw"
    if t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return f"strided {t.stride()}"


def _record_layouts(decoder: Decoder, *, backward: bool) -> tuple[dict[str, str], list]:
    """Hooks that record ``{"fwd <name>": layout, "bwd <name>": layout}`` of each CNN module's output / grad_output."""
    seen: dict[str, str] = {}
    handles = []
    for name, module in _cnn_modules(decoder):
        if name == "conv_out":
            continue  # 3 output channels: its output is converted on purpose, checked separately

        def fwd(_m, _inp, out, name=name):
            seen[f"fwd {name}"] = _layout(out)

        handles.append(module.register_forward_hook(fwd))
        if backward:

            def bwd(_m, grad_in, grad_out, name=name):
                seen[f"bwd {name}"] = _layout(grad_out[0])
                if grad_in[0] is not None:
                    seen[f"bwd-in {name}"] = _layout(grad_in[0])

            handles.append(module.register_full_backward_hook(bwd))
    return seen, handles


def _tiny_model() -> MergeVQ:
    torch.manual_seed(0)
    return MergeVQ.from_preset("tiny-32")


def test_training_step_keeps_decoder_in_nchw_although_z_arrives_channels_last():
    model = _tiny_model().train()
    assert model.decoder.memory_format is torch.contiguous_format
    seen, handles = _record_layouts(model.decoder, backward=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x, num_tokens=16)
    (F.l1_loss(out.reconstruction, x) + out.losses["commitment"]).backward()
    for h in handles:
        h.remove()

    assert len(seen) >= 3 * len(_cnn_modules(model.decoder)) - 4  # forward, grad_output and most grad_inputs
    flipped = {k: v for k, v in seen.items() if v != "nchw"}
    assert not flipped, f"decoder activations or gradients not NCHW: {flipped}"
    assert out.reconstruction.is_contiguous()


def test_decode_output_independent_of_input_layout():
    torch.manual_seed(0)
    decoder = MergeVQ.from_preset("tiny-32").decoder.eval()
    z = torch.randn(2, decoder.conv_in.in_channels, 8, 8).sign()
    seen_cl, handles = _record_layouts(decoder, backward=False)
    with torch.no_grad():
        y_cl = decoder(z.contiguous(memory_format=torch.channels_last))
    for h in handles:
        h.remove()
    seen_nchw, handles = _record_layouts(decoder, backward=False)
    with torch.no_grad():
        y_nchw = decoder(z.contiguous())
    for h in handles:
        h.remove()

    assert seen_cl == seen_nchw
    assert set(seen_cl.values()) == {"nchw"}
    torch.testing.assert_close(y_cl, y_nchw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_memory_format_option_sets_every_cnn_layout(fmt):
    model = _tiny_model().train()
    model.decoder.memory_format = FORMATS[fmt]
    seen, handles = _record_layouts(model.decoder, backward=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x, num_tokens=16)
    F.l1_loss(out.reconstruction, x).backward()
    for h in handles:
        h.remove()

    assert set(seen.values()) == {fmt}
    assert out.reconstruction.is_contiguous()  # the image itself is NCHW in both modes


def test_both_formats_compute_the_same_image_and_gradients():
    model = _tiny_model().train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    results = {}
    for name, fmt in FORMATS.items():
        model.decoder.memory_format = fmt
        torch.manual_seed(1)  # the same merge sampling in both runs
        out = model(x, num_tokens=16)
        F.l1_loss(out.reconstruction, x).backward()
        grads = {n: p.grad.clone() for n, p in model.decoder.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results[name] = (out.reconstruction.detach(), grads)
    (y_a, g_a), (y_b, g_b) = results.values()
    torch.testing.assert_close(y_a, y_b, rtol=1e-4, atol=1e-5)
    assert g_a.keys() == g_b.keys() and g_a
    for n in g_a:
        torch.testing.assert_close(g_a[n], g_b[n], rtol=1e-3, atol=1e-5, msg=n)


def test_rejects_other_memory_formats():
    config = MergeVQ.from_preset("tiny-32").config
    with pytest.raises(ValueError, match="memory_format"):
        Decoder(config, memory_format=torch.channels_last_3d)
