import pytest
import torch

from lit_sharp.models import preact_resnet18, simple_vit
from lit_sharp.models.preact_resnet import PreActBlock


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_resnet18_paper_size_and_shape():
    model = preact_resnet18()
    # Hand count: stem 3*64*9; stages of two blocks; shortcut 1x1 convs where the width changes; BN pairs; head.
    def block(cin, cout):
        convs = cin * cout * 9 + cout * cout * 9 + (cin * cout if cin != cout else 0)
        return convs + 2 * cin + 2 * cout
    widths = [64, 128, 256, 512]
    expected = 3 * 64 * 9
    cin = 64
    for w in widths:
        expected += block(cin, w) + block(w, w)
        cin = w
    expected += 2 * 512 + 512 * 10 + 10
    assert n_params(model) == expected == 11_172_170
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_block_is_preactivation_with_projection_of_activated_input():
    block = PreActBlock(4, 8, stride=2).eval()
    x = torch.randn(1, 4, 8, 8)
    pre = torch.relu(block.bn1(x))
    expected = block.conv2(torch.relu(block.bn2(block.conv1(pre)))) + block.shortcut(pre)
    torch.testing.assert_close(block(x), expected)
    assert all(conv.bias is None for conv in (block.conv1, block.conv2, block.shortcut))


def test_resnet18_tiny_width():
    model = preact_resnet18(width=4)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert n_params(model) < 50_000
    with pytest.raises(ValueError, match="width"):
        preact_resnet18(width=0)


def test_resnet_with_one_block_per_stage_drops_exactly_the_second_blocks():
    shallow = preact_resnet18(width=4, blocks_per_stage=1)
    full = preact_resnet18(width=4)
    second_blocks = sum(n_params(full.layers[i]) for i in (1, 3, 5, 7))
    assert n_params(full) - n_params(shallow) == second_blocks
    assert shallow(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="blocks_per_stage"):
        preact_resnet18(width=4, blocks_per_stage=0)


def test_simplevit_paper_size_and_shape():
    model = simple_vit()
    assert n_params(model) == 18_928_234
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_simplevit_tiny_and_bad_patch():
    model = simple_vit(dim=16, depth=1, heads=2, mlp_dim=32, dim_head=8)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="patch_size"):
        simple_vit(patch_size=5)
