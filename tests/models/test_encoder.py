import pytest
import torch
from torch import nn

from selfsup.models.encoder import Encoder


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="did you mean.*resnet18"):
        Encoder("resnt18")


def test_cifar_stem_keeps_resolution():
    enc = Encoder("resnet18", cifar_stem=True)
    conv = enc.model.conv1
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1)
    assert isinstance(enc.model.maxpool, nn.Identity)
    # layer1 sees the full 16x16 input: no downsampling in the stem
    x = torch.randn(2, 3, 16, 16)
    stem = enc.model.maxpool(enc.model.act1(enc.model.bn1(enc.model.conv1(x))))
    assert stem.shape[-2:] == (16, 16)
    assert enc(x).shape == (2, enc.embed_dim) == (2, 512)


def test_cifar_stem_needs_resnet():
    with pytest.raises(ValueError, match="cifar_stem"):
        Encoder("vit_tiny_patch16_224", cifar_stem=True, image_size=32, patch_size=8)


def test_grayscale_is_repeated_to_in_chans():
    enc = Encoder("resnet18").eval()
    gray = torch.rand(2, 1, 32, 32)
    assert torch.equal(enc(gray), enc(gray.repeat(1, 3, 1, 1)))
    one = Encoder("resnet18", in_chans=1).eval()
    assert one(gray).shape == (2, 512)
    with pytest.raises(ValueError, match="in_chans=1"):
        one(torch.rand(2, 3, 32, 32))


def test_vit_sizes_and_tokens():
    enc = Encoder("vit_tiny_patch16_224", image_size=32, patch_size=8)
    x = torch.randn(2, 3, 32, 32)
    assert enc.is_vit and enc(x).shape == (2, 192)
    assert enc.forward_tokens(x).shape == (2, 1 + 16, 192)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_vit_pool_choice(pool):
    enc = Encoder("vit_tiny_patch16_224", image_size=32, patch_size=8, pool=pool).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = enc.forward_tokens(x)
    expected = tokens[:, 0] if pool == "token" else tokens[:, 1:].mean(1)
    torch.testing.assert_close(enc.model.fc_norm(expected) if pool == "avg" else expected, enc(x))


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_encode_patches_leaves_through_the_final_layernorm(pool):
    """MAE and SimMIM train through encode_patches: every token is layer-normalised (with ``pool: avg``
    timm keeps that LayerNorm as ``fc_norm``), and every parameter of the encoder gets a gradient."""
    enc = Encoder("vit_tiny_patch16_224", image_size=16, patch_size=4, pool=pool, model_kwargs={"depth": 1})
    assert enc.token_norm is (enc.model.fc_norm if pool == "avg" else enc.model.norm)
    tokens = enc.encode_patches(enc.embed_patches(torch.randn(2, 3, 16, 16)))
    assert tokens.shape == (2, 1 + 16, 192)
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(2, 17), atol=1e-5, rtol=0)  # fresh LayerNorm: 0, 1
    torch.testing.assert_close(tokens.var(-1, unbiased=False), torch.ones(2, 17), atol=1e-3, rtol=0)
    (tokens * torch.randn_like(tokens)).sum().backward()
    assert [n for n, p in enc.named_parameters() if p.grad is None] == []


def test_bad_image_patch_sizes_name_both_and_suggest():
    with pytest.raises(ValueError, match=r"image_size=30 is not divisible by patch_size=4 \(use image_size 28 or 32"):
        Encoder("vit_tiny_patch16_224", image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="patch_size=4 only applies to ViT"):
        Encoder("resnet18", patch_size=4)


def test_cnn_ignores_image_size():
    assert Encoder("resnet18", image_size=64)(torch.randn(1, 3, 64, 64)).shape == (1, 512)


def test_grad_checkpointing_recomputes_the_token_path_with_equal_gradients(monkeypatch):
    """MAE's and SimMIM's token path (encode_patches) honours grad_checkpointing: the blocks run under
    torch's checkpoint, and the gradients equal those without it."""
    import torch.utils.checkpoint as checkpoint

    calls = []
    original = checkpoint.checkpoint
    monkeypatch.setattr(checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        encoder = Encoder("vit_tiny_patch16_224", image_size=16, patch_size=4, grad_checkpointing=checkpointing,
                          model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})
        images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        keep = torch.tensor([[0, 2, 5, 7], [1, 3, 4, 15]])
        encoder.encode_patches(encoder.embed_patches(images), keep=keep).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None})
    assert len(calls) == 2, "one checkpointed call per block, only with grad_checkpointing"
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_masked_token_path_takes_non_square_crops():
    """A dynamic-size ViT on a 16 x 32 crop (4 x 8 patches): with nothing masked the token path gives timm's
    own tokens, and a masked patch changes the tokens (positions follow the real grid, not a square guess)."""
    encoder = Encoder("vit_tiny_patch16_224", image_size=16, patch_size=4, dynamic_img_size=True,
                      model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}).eval()
    x = torch.randn(2, 3, 16, 32)
    token = torch.zeros(1, 1, 32)
    none = torch.zeros(2, 4, 8)
    torch.testing.assert_close(encoder.encode_masked(x, none, token), encoder.forward_tokens(x))
    masked = none.clone()
    masked[:, 1, 5] = 1
    assert not torch.allclose(encoder.encode_masked(x, masked, token), encoder.forward_tokens(x))


def test_intermediate_tokens_are_each_blocks_output_through_the_final_norm():
    encoder = Encoder("vit_tiny_patch16_224", image_size=16, patch_size=4,
                      model_kwargs={"depth": 3, "embed_dim": 32, "num_heads": 2, "reg_tokens": 2}).eval()
    x = torch.randn(2, 3, 16, 16)
    seen = []
    hooks = [block.register_forward_hook(lambda m, i, o: seen.append(o)) for block in encoder.model.blocks]
    with torch.no_grad():
        encoder.forward_tokens(x)
    for hook in hooks:
        hook.remove()
    got = encoder.intermediate_tokens(x, 2)
    assert len(got) == 2 and got[0].shape == (2, 1 + 2 + 16, 32)          # class, 2 registers, 16 patches
    for tokens, block_out in zip(got, seen[1:]):
        torch.testing.assert_close(tokens, encoder.model.norm(block_out))
    torch.testing.assert_close(got[-1], encoder.forward_tokens(x))          # the last one is the final output
    with pytest.raises(TypeError, match="timm ViT"):
        Encoder("resnet18").intermediate_tokens(torch.randn(1, 3, 32, 32))
