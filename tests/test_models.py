import math

import pytest
import torch
import torch.nn.functional as F

from lit_sharp.models import preact_resnet18, simple_vit
from lit_sharp.models.preact_resnet import PreActBlock


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def released_preact_resnet18_shapes(width, num_classes=10):
    """Keys and shapes of the paper's released ``models.py`` ``PreActResNet18`` (stages ``layer1..4`` of two
    blocks ``bn1, conv1, bn2, conv2[, shortcut.0]``, head BN ``bn`` and ``linear``), written out from that code."""
    def bn(prefix, c):
        return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}
    shapes = {"conv1.weight": (width, 3, 3, 3)}
    cin = width
    for stage, mult in zip((1, 2, 3, 4), (1, 2, 4, 8)):
        cout = width * mult
        for block in (0, 1):
            c_in = cin if block == 0 else cout
            p = f"layer{stage}.{block}"
            shapes |= bn(f"{p}.bn1", c_in)
            shapes[f"{p}.conv1.weight"] = (cout, c_in, 3, 3)
            shapes |= bn(f"{p}.bn2", cout)
            shapes[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            if block == 0 and stage > 1:
                shapes[f"{p}.shortcut.0.weight"] = (cout, c_in, 1, 1)
        cin = cout
    return shapes | bn("bn", 8 * width) | {"linear.weight": (num_classes, 8 * width), "linear.bias": (num_classes,)}


def released_simplevit_shapes(dim, depth, heads, mlp_dim, dim_head, patch=4, num_classes=10):
    """Keys and shapes of vit-pytorch 0.40.2's ``SimpleViT`` state_dict, written out from that version."""
    shapes = {"to_patch_embedding.1.weight": (dim, 3 * patch * patch), "to_patch_embedding.1.bias": (dim,)}
    for i in range(depth):
        p = f"transformer.layers.{i}"
        shapes |= {f"{p}.0.norm.weight": (dim,), f"{p}.0.norm.bias": (dim,),
                   f"{p}.0.to_qkv.weight": (3 * heads * dim_head, dim), f"{p}.0.to_out.weight": (dim, heads * dim_head),
                   f"{p}.1.net.0.weight": (dim,), f"{p}.1.net.0.bias": (dim,),
                   f"{p}.1.net.1.weight": (mlp_dim, dim), f"{p}.1.net.1.bias": (mlp_dim,),
                   f"{p}.1.net.3.weight": (dim, mlp_dim), f"{p}.1.net.3.bias": (dim,)}
    return shapes | {"linear_head.0.weight": (dim,), "linear_head.0.bias": (dim,),
                     "linear_head.1.weight": (num_classes, dim), "linear_head.1.bias": (num_classes,)}


def shapes_of(model):
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


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


@pytest.mark.parametrize("width", [64, 4])
def test_resnet18_state_dict_keys_are_those_of_the_released_code(width):
    model = preact_resnet18(width=width)
    assert shapes_of(model) == released_preact_resnet18_shapes(width)
    assert list(model.state_dict())[:3] == ["conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias"]
    assert list(model.state_dict())[-2:] == ["linear.weight", "linear.bias"]


def test_resnet18_block_is_preactivation_with_projection_of_activated_input():
    block = PreActBlock(4, 8, stride=2).eval()
    x = torch.randn(1, 4, 8, 8)
    pre = torch.relu(block.bn1(x))
    expected = block.conv2(torch.relu(block.bn2(block.conv1(pre)))) + block.shortcut(pre)
    torch.testing.assert_close(block(x), expected)
    assert all(conv.bias is None for conv in (block.conv1, block.conv2, block.shortcut[0]))


def test_resnet18_tiny_width():
    model = preact_resnet18(width=4)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert n_params(model) < 50_000
    with pytest.raises(ValueError, match="width"):
        preact_resnet18(width=0)


def test_resnet_with_one_block_per_stage_drops_exactly_the_second_blocks():
    shallow = preact_resnet18(width=4, blocks_per_stage=1)
    full = preact_resnet18(width=4)
    second_blocks = sum(n_params(stage[1]) for stage in (full.layer1, full.layer2, full.layer3, full.layer4))
    assert n_params(full) - n_params(shallow) == second_blocks
    assert shallow(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="blocks_per_stage"):
        preact_resnet18(width=4, blocks_per_stage=0)


def test_simplevit_paper_size_keys_and_shape():
    model = simple_vit()
    dim, mlp, inner, patch_dim, depth, classes = 512, 1024, 16 * 64, 3 * 4 * 4, 6, 10
    embedding = patch_dim * dim + dim  # Linear(48, 512); no LayerNorm on the patches nor after the embedding
    attention = 2 * dim + dim * 3 * inner + inner * dim  # LayerNorm, to_qkv and to_out without bias
    feed_forward = 2 * dim + (dim * mlp + mlp) + (mlp * dim + dim)  # LayerNorm, Linear, GELU, Linear
    head = 2 * dim + dim * classes + classes  # LayerNorm + Linear; no final LayerNorm in the transformer
    assert embedding == 25_088 and attention == 2_098_176 and feed_forward == 1_051_136 and head == 6_154
    assert n_params(model) == embedding + depth * (attention + feed_forward) + head == 18_927_114
    assert shapes_of(model) == released_simplevit_shapes(512, 6, 16, 1024, 64)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def reference_simplevit_forward(state, img, *, heads, patch=4):
    """vit-pytorch 0.40.2's forward written from its equations on a state_dict: explicit softmax attention and the
    sin-cos embedding from its closed form."""
    b, c, h, w = img.shape
    gh, gw = h // patch, w // patch
    patches = img.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch * patch * c)
    x = patches @ state["to_patch_embedding.1.weight"].T + state["to_patch_embedding.1.bias"]
    dim = x.shape[-1]
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter) / (quarter - 1))
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    px, py = xs.flatten()[:, None] * omega, ys.flatten()[:, None] * omega
    x = x + torch.cat([px.sin(), px.cos(), py.sin(), py.cos()], dim=1)
    for i in range(len({k.split(".")[2] for k in state if k.startswith("transformer.layers.")})):
        p = f"transformer.layers.{i}"
        y = F.layer_norm(x, (dim,), state[f"{p}.0.norm.weight"], state[f"{p}.0.norm.bias"])
        q, k, v = (y @ state[f"{p}.0.to_qkv.weight"].T).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, gh * gw, heads, -1).transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, gh * gw, -1) @ state[f"{p}.0.to_out.weight"].T + x
        y = F.layer_norm(x, (dim,), state[f"{p}.1.net.0.weight"], state[f"{p}.1.net.0.bias"])
        y = F.gelu(y @ state[f"{p}.1.net.1.weight"].T + state[f"{p}.1.net.1.bias"])
        x = y @ state[f"{p}.1.net.3.weight"].T + state[f"{p}.1.net.3.bias"] + x
    pooled = F.layer_norm(x.mean(dim=1), (dim,), state["linear_head.0.weight"], state["linear_head.0.bias"])
    return pooled @ state["linear_head.1.weight"].T + state["linear_head.1.bias"]


def test_simplevit_computes_the_0_40_2_network():
    torch.manual_seed(0)
    shapes = released_simplevit_shapes(dim=16, depth=2, heads=2, mlp_dim=32, dim_head=8)
    state = {key: torch.randn(shape) * 0.3 for key, shape in shapes.items()}
    model = simple_vit(dim=16, depth=2, heads=2, mlp_dim=32, dim_head=8)
    model.load_state_dict(state)  # strict: exactly the keys of 0.40.2
    img = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model(img), reference_simplevit_forward(state, img, heads=2), atol=1e-4, rtol=1e-4)


def test_simplevit_variant_latest_is_the_installed_vit_pytorch_network():
    import vit_pytorch

    model = simple_vit(variant="vit_pytorch_latest")
    assert type(model) is vit_pytorch.SimpleViT
    # 1.x adds LayerNorm(48) on the patches, LayerNorm(512) after the embedding and at the end of the transformer,
    # and drops the head's LayerNorm: +96 +1024 +1024 -1024 parameters.
    assert n_params(model) == 18_927_114 + 96 + 1024 + 1024 - 1024 == 18_928_234
    with pytest.raises(ValueError, match="variant"):
        simple_vit(variant="0.40")


def test_a_bad_simplevit_variant_is_refused_before_training(tmp_path):
    from conftest import compose_config

    from lit_sharp.errors import ConfigError
    from lit_sharp.train import run

    cfg = compose_config("experiment=quickstart", "model=simplevit", "~model.width", "model.variant=0.40.2",
                         f"paths.root={tmp_path}")
    with pytest.raises(ConfigError, match="model.variant='0.40.2': must be one of paper, vit_pytorch_latest"):
        run(cfg)
    assert not (tmp_path / "quickstart").exists()


def test_simplevit_tiny_and_bad_patch():
    model = simple_vit(dim=16, depth=1, heads=2, mlp_dim=32, dim_head=8)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="patch_size"):
        simple_vit(patch_size=5)
