import pytest
import torch

from dml_ray.config import ModelConfig
from dml_ray.models.backbones import build_backbone
from dml_ray.models.checkpoint import checkpoint_bytes, load_checkpoint, save_checkpoint
from dml_ray.models.embedding import build_model
from dml_ray.models.heads import EmbeddingHead, gmp_mask
from tests.heads import random_eval_head

HEADS = [
    dict(pooling="gap", embedding_dim=None),
    dict(pooling="gap", embedding_dim=16),
    dict(pooling="gap", embedding_dim=16, bn=True),
    dict(pooling="gap", embedding_dim=16, hidden_dims=[24], bn=True),
    dict(pooling="gmp", embedding_dim=None),
    dict(pooling="gmp", embedding_dim=16),
    dict(pooling="gmp", embedding_dim=16, hidden_dims=[24, 20], bn=True),
    dict(pooling="flatten", embedding_dim=16),
    dict(pooling="flatten", embedding_dim=16, hidden_dims=[24], bn=True),
]


@pytest.mark.parametrize("kw", HEADS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_equivalent_features_sum_to_raw_embedding(kw):
    head = random_eval_head(8, (3, 4), **kw)
    a = torch.relu(torch.randn(5, 8, 3, 4, dtype=torch.float64))
    e, bias = head.equivalent_features(a)
    assert e.shape == (5, 3, 4, head.out_dim) and bias.shape == (5, head.out_dim)
    torch.testing.assert_close(e.sum(dim=(1, 2)) + bias, head(a), rtol=1e-10, atol=1e-10)


def test_relu_masks_are_active_in_the_test():
    # the hidden ReLU must zero some units, or the ReLU case above proves nothing
    torch.manual_seed(0)
    head = EmbeddingHead(8, pooling="gap", embedding_dim=16, hidden_dims=[24]).eval()
    a = torch.randn(5, 8, 3, 4)
    hidden = head.fcs[0](head.pool(a))
    assert (hidden < 0).any() and (hidden > 0).any()


def test_gap_equivalent_features_are_w_over_hw():
    torch.manual_seed(0)
    head = EmbeddingHead(8, pooling="gap", embedding_dim=4).eval()
    a = torch.randn(2, 8, 3, 3)
    e, bias = head.equivalent_features(a)
    expected = torch.einsum("kc,bcij->bijk", head.fcs[0].weight, a) / 9
    torch.testing.assert_close(e, expected)
    torch.testing.assert_close(bias, head.fcs[0].bias.expand(2, -1))


def test_gmp_mask_is_argmax_one_hot():
    a = torch.tensor([[[[1.0, 5.0], [2.0, 5.0]], [[0.0, -1.0], [3.0, 2.0]]]])
    m = gmp_mask(a)
    assert m.sum(dim=(2, 3)).eq(1).all()
    assert m[0, 0, 0, 1] == 1 and m[0, 1, 1, 0] == 1


def test_equivalent_features_refuse_training_mode():
    head = EmbeddingHead(8, pooling="gap", embedding_dim=4, bn=True)
    with pytest.raises(RuntimeError, match="eval mode"):
        head.equivalent_features(torch.randn(2, 8, 2, 2))


@pytest.mark.parametrize("name,side", [("resnet18", 2), ("resnet50", 2), ("densenet121", 2), ("googlenet", 2),
                                       ("tiny_cnn", 8)])
def test_backbones_return_feature_maps(name, side):
    net = build_backbone(name).eval()
    with torch.no_grad():
        a = net(torch.randn(1, 3, 64, 64))
    assert a.ndim == 4 and a.shape[1] == net.out_channels and a.shape[2:] == (side, side)


@pytest.mark.parametrize("name", ["resnet101", "densenet161", "densenet169", "densenet201"])
def test_other_backbones_report_channels(name):
    assert build_backbone(name).out_channels > 0


def test_unknown_backbone_names_choices():
    with pytest.raises(ValueError, match="model.backbone: unknown backbone 'resnet9'"):
        build_backbone("resnet9")


def test_model_outputs_and_checkpoint_round_trip(tmp_path):
    cfg = ModelConfig(backbone="tiny_cnn", pooling="flatten", embedding_dim=8, bn=True)
    model = build_model(cfg, image_size=64).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert out.feature_map.shape == (3, 64, 8, 8)
    torch.testing.assert_close(out.embedding.norm(dim=1), torch.ones(3))
    data = checkpoint_bytes(model, cfg, 64, ["a", "b"])
    uri = str(tmp_path / "model.pt")
    save_checkpoint(uri, data)
    loaded = load_checkpoint(uri)
    assert loaded.class_names == ["a", "b"] and loaded.image_size == 64
    assert loaded.model_id.startswith("tiny_cnn-")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x).raw, out.raw)


def test_checkpoint_refuses_pickled_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    uri = tmp_path / "evil.pt"
    uri.write_bytes(pickle.dumps({"format": 1, "x": Evil()}))
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(str(uri))
