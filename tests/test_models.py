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


BN_EPS = 1e-5  # nn.BatchNorm2d's default


def batch_norm(x, state, prefix, training):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel: the running statistics in evaluation mode, the
    batch's mean and biased variance in training mode."""
    if training:
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"]
    shape = (1, -1, 1, 1)
    normalized = (x - mean.view(shape)) / (var.view(shape) + BN_EPS).sqrt()
    return normalized * state[f"{prefix}.weight"].view(shape) + state[f"{prefix}.bias"].view(shape)


def reference_preact_resnet18_forward(state, img, *, training=False):
    """The CIFAR PreAct ResNet-18 of docs/protocol.md section 1 written out on a state_dict: 3x3 stem; four stages
    of two blocks with strides 1/2/2/2; block = BN, ReLU, conv3x3 (the stage's stride), BN, ReLU, conv3x3, plus the
    input, or a 1x1 convolution (same stride) of the pre-activated input where the block has one; head = BN, ReLU,
    global average pool, linear."""
    out = F.conv2d(img, state["conv1.weight"], padding=1)
    for stage, first_stride in zip((1, 2, 3, 4), (1, 2, 2, 2)):
        for block, stride in enumerate((first_stride, 1)):
            p = f"layer{stage}.{block}"
            pre = torch.relu(batch_norm(out, state, f"{p}.bn1", training))
            shortcut = F.conv2d(pre, state[f"{p}.shortcut.0.weight"], stride=stride) \
                if f"{p}.shortcut.0.weight" in state else out
            residual = F.conv2d(pre, state[f"{p}.conv1.weight"], stride=stride, padding=1)
            residual = F.conv2d(torch.relu(batch_norm(residual, state, f"{p}.bn2", training)),
                                state[f"{p}.conv2.weight"], padding=1)
            out = residual + shortcut
    out = torch.relu(batch_norm(out, state, "bn", training))
    pooled = F.avg_pool2d(out, kernel_size=out.shape[-2:]).flatten(1)
    return pooled @ state["linear.weight"].T + state["linear.bias"]


def randomize_batchnorms(model, generator):
    """Affine parameters and running statistics away from their initial 1, 0, 0, 1 (so that a BatchNorm applied to
    the wrong tensor, or skipped, changes the output)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(torch.empty(c).uniform_(0.5, 1.5, generator=generator))
                module.bias.copy_(torch.randn(c, generator=generator) * 0.3)
                module.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
                module.running_var.copy_(torch.empty(c).uniform_(0.5, 2.0, generator=generator))


@pytest.mark.parametrize("training", [False, True])
def test_resnet18_computes_the_preactivation_network_of_the_protocol(training):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = preact_resnet18(width=4).double()
    randomize_batchnorms(model, generator)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    assert "layer1.0.shortcut.0.weight" not in state and "layer2.0.shortcut.0.weight" in state  # both block kinds
    img = torch.randn(3, 3, 32, 32, generator=generator, dtype=torch.float64)
    model.train(training)
    with torch.no_grad():
        out = model(img)
    expected = reference_preact_resnet18_forward(state, img, training=training)
    assert out.shape == (3, 10) and expected.abs().max() > 0.1
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


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


def sincos_position_embedding(grid_h, grid_w, dim, dtype):
    """The fixed 2-D embedding of Beyer et al. 2022 from its closed form: for the patch in row ``y``, column ``x``,
    ``[sin(x w), cos(x w), sin(y w), cos(y w)]`` with ``w_i = 10000 ** -(i / (dim/4 - 1))``, i < dim/4."""
    quarter = dim // 4
    omega = 10000.0 ** -(torch.arange(quarter, dtype=dtype) / (quarter - 1))
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=dtype), torch.arange(grid_w, dtype=dtype), indexing="ij")
    px, py = cols.flatten()[:, None] * omega, rows.flatten()[:, None] * omega
    return torch.cat([px.sin(), px.cos(), py.sin(), py.cos()], dim=1)


def reference_simplevit_forward(state, img, *, heads, patch=4, latest=False):
    """The SimpleViT written from its equations on a state_dict: patches cut by reshapes (row-major patch order,
    pixels in (row, column, channel) order inside a patch), the sin-cos embedding from its closed form,
    ``softmax(q k^T / sqrt(d)) v`` with heads split by a reshape, GELU MLPs, mean pooling.

    ``latest=False``: vit-pytorch 0.40.2 (Linear patch embedding; LayerNorm + Linear head). ``latest=True``: the 1.x
    network (LayerNorms on the raw patches, after the embedding and after the last block; a bare Linear head)."""
    b, c, h, w = img.shape
    gh, gw = h // patch, w // patch
    tokens = gh * gw
    patches = img.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, tokens, patch * patch * c)

    def layer_norm(x, prefix):
        return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"])

    def linear(x, prefix):
        out = x @ state[f"{prefix}.weight"].T
        return out + state[f"{prefix}.bias"] if f"{prefix}.bias" in state else out

    if latest:
        x = layer_norm(linear(layer_norm(patches, "to_patch_embedding.1"), "to_patch_embedding.2"),
                       "to_patch_embedding.3")
    else:
        x = linear(patches, "to_patch_embedding.1")
    dim = x.shape[-1]
    x = x + sincos_position_embedding(gh, gw, dim, img.dtype)
    depth = len({key.split(".")[2] for key in state if key.startswith("transformer.layers.")})
    for i in range(depth):
        p = f"transformer.layers.{i}"
        q, k, v = linear(layer_norm(x, f"{p}.0.norm"), f"{p}.0.to_qkv").chunk(3, dim=-1)
        q, k, v = (t.reshape(b, tokens, heads, -1).transpose(1, 2) for t in (q, k, v))  # (b, heads, tokens, d)
        attn = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        x = linear((attn @ v).transpose(1, 2).reshape(b, tokens, -1), f"{p}.0.to_out") + x
        y = F.gelu(linear(layer_norm(x, f"{p}.1.net.0"), f"{p}.1.net.1"))
        x = linear(y, f"{p}.1.net.3") + x
    if latest:
        return linear(layer_norm(x, "transformer.norm").mean(dim=1), "linear_head")
    return linear(layer_norm(x.mean(dim=1), "linear_head.0"), "linear_head.1")


@pytest.mark.parametrize("variant", ["paper", "vit_pytorch_latest"])
def test_simplevit_computes_the_network_of_its_variant(variant):
    generator = torch.Generator().manual_seed(0)
    dims = dict(dim=16, depth=2, heads=2, mlp_dim=32, dim_head=8)
    model = simple_vit(**dims, variant=variant).double().eval()
    if variant == "paper":
        assert shapes_of(model) == released_simplevit_shapes(**dims)
    # Random values everywhere, LayerNorm affine parameters included, so that no term hides behind a 1 or a 0.
    state = {key: torch.randn(value.shape, generator=generator, dtype=torch.float64) * 0.3
             for key, value in model.state_dict().items()}
    model.load_state_dict(state)  # strict: exactly the variant's keys
    img = torch.randn(3, 3, 32, 32, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        out = model(img)
    expected = reference_simplevit_forward(state, img, heads=2, latest=variant != "paper")
    assert expected.abs().max() > 0.1
    # Both models compute their position embedding in float32 (entries 1e-7 from the closed form): outputs 4e-9 apart.
    torch.testing.assert_close(out, expected, rtol=1e-7, atol=1e-7)


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
