"""Real-data pipeline: ImageNet-layout folders of variable-size JPEGs read through DataLoaders with EasyRobust's
benchmark transform, the same top-1 as EasyRobust's own evaluators (A / R masks included), lazy seeded attacked
subsets, and evaluation on the model's device."""
import pytest
import torch

from ns_plugin.errors import NSPluginError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    from ns_plugin.evaluation.smoke import write_smoke_imagenet
    return write_smoke_imagenet(tmp_path_factory.mktemp("j") / "data", train_per_class=2, val_per_class=2,
                                corruptions=("contrast",), severities=(2,))


@pytest.fixture(scope="module")
def vit224():
    """A 1000-class ViT at 224 with patch 16 (the paper's geometry), one narrow block: seconds on a CPU."""
    from timm.models.vision_transformer import VisionTransformer
    from ns_plugin.models import wrap
    torch.manual_seed(0)
    net = VisionTransformer(img_size=224, patch_size=16, embed_dim=48, depth=1, num_heads=2, num_classes=1000)
    return wrap(net, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).eval()


def test_smoke_folder_has_variable_size_jpegs_in_imagenet_layout(jpeg_root):
    from PIL import Image
    for rel in ("train", "imagenet-val", "imagenetv2", "imagenet-sketch", "imagenet-style", "imagenet-a",
                "imagenet-r", "imagenet-c/contrast/2"):
        files = sorted((jpeg_root / rel).rglob("*.JPEG"))
        assert len(files) == 10, rel
    sizes = {Image.open(f).size for f in (jpeg_root / "imagenet-val").rglob("*.JPEG")}
    assert len(sizes) > 1                                              # variable sizes, as ImageNet
    assert {Image.open(f).size for f in (jpeg_root / "imagenet-c").rglob("*.JPEG")} == {(224, 224)}
    assert sorted(p.name for p in (jpeg_root / "imagenet-val").iterdir())[0] == "n01440764"


def test_plain_totensor_cannot_batch_variable_sizes_but_the_benchmark_transform_can(jpeg_root, vit224):
    from ns_plugin.data import eval_transform
    from ns_plugin.evaluation.suite import folder_accuracy
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        folder_accuracy(vit224, jpeg_root / "imagenet-val", batch_size=10)   # the old ToTensor-only path
    tf = eval_transform(224)
    assert 0 <= folder_accuracy(vit224, jpeg_root / "imagenet-val", transform=tf, batch_size=4) <= 100


@pytest.mark.parametrize("rel,evaluator", [("imagenet-val", "evaluate_imagenet_val"),
                                           ("imagenet-a", "evaluate_imagenet_a"),
                                           ("imagenet-r", "evaluate_imagenet_r")])
def test_fast_engine_equals_easyrobust_on_jpegs(jpeg_root, vit224, rel, evaluator):
    """Same transform (EasyRobust benchmark.py's: resize by crop pct, centre crop, bicubic), same top-1, same
    200-class masks for A and R. The model's logits are made to depend on the image so accuracy varies."""
    from ns_plugin.data import eval_transform
    from ns_plugin.evaluation.suite import folder_accuracy
    tf = eval_transform(224, 0.875)
    fast = folder_accuracy(vit224, jpeg_root / rel, transform=tf, batch_size=4, evaluator=evaluator)
    er = folder_accuracy(vit224, jpeg_root / rel, transform=tf, batch_size=4, evaluator=evaluator, engine="easyrobust")
    assert fast == pytest.approx(er, abs=1e-4)


def test_eval_transform_is_easyrobust_benchmark_transform():
    from torchvision import transforms
    from ns_plugin.data import eval_transform
    tf = eval_transform(224, 0.875).transforms
    assert isinstance(tf[0], transforms.Resize) and tf[0].size == 256
    assert tf[0].interpolation == transforms.InterpolationMode.BICUBIC
    assert isinstance(tf[1], transforms.CenterCrop) and tf[1].size == (224, 224)
    with pytest.raises(NSPluginError, match="crop_pct"):
        eval_transform(224, 1.5)


def test_attack_subset_is_a_fixed_seeded_index_list():
    from ns_plugin.data import subset_indices
    a, b = subset_indices(50_000, 5, seed=0), subset_indices(50_000, 5, seed=0)
    assert a == b and a == sorted(a) and len(set(a)) == 5 and max(a) > 5   # spread over the folder
    assert subset_indices(10, 5, seed=None) == [0, 1, 2, 3, 4]
    assert subset_indices(3, 5) == [0, 1, 2]


def test_attack_accuracy_streams_batches_on_the_model_device(jpeg_root, vit224):
    import torchattacks
    from torch.utils.data import Subset
    from ns_plugin.data import eval_transform, image_folder, make_loader, subset_indices
    from ns_plugin.evaluation.suite import attack_accuracy, top1
    ds = image_folder(jpeg_root / "imagenet-val", transform=eval_transform(224))
    sub = Subset(ds, subset_indices(len(ds), 4, seed=0))
    loader = make_loader(sub, 2)
    acc, ips = attack_accuracy(vit224, torchattacks.FGSM(vit224, eps=1 / 255), loader)
    x = torch.stack([sub[i][0] for i in range(4)])
    y = torch.tensor([sub[i][1] for i in range(4)])
    acc2, _ = attack_accuracy(vit224, torchattacks.FGSM(vit224, eps=1 / 255), x, y, batch_size=2)
    assert acc == acc2 and ips > 0 and acc <= top1(vit224, x, y) + 1e-9


def test_folder_training_reads_through_workers_with_seeded_augmentation(tmp_path, digits, trained):
    """Training on a folder goes through a DataLoader; each sample's augmentation is seeded by its place in the
    batch stream, so the run is the same with 0 or 1 decoding workers, and augment: true really augments."""
    from ns_plugin.data import save_image_folder
    from ns_plugin.training import load_config, train
    x, y = digits.train.tensors
    save_image_folder(tmp_path / "d" / "train", x[:60], y[:60], classes=[str(i) for i in range(10)])
    kw = dict(method="standard", data=str(tmp_path / "d"), rounds=1, steps_per_round=3, batch_size=8, lr=1e-3,
              progress=False, plot=False)

    def weights(**extra):
        return train(load_config(**kw, **extra), model=__import__("copy").deepcopy(trained[0]))["model"].state_dict()
    a, b = weights(augment=True, workers=0), weights(augment=True, workers=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = weights(augment=False, workers=0)
    assert not all(torch.equal(a[k], c[k]) for k in a)
