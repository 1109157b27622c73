"""Tests for data.py: tiny fixtures in the official layouts, the cache, the device loader, augmentations, downloads."""
import hashlib
import io
import itertools
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from data import DataError, DeviceLoader  # noqa: E402

# -----------------------------------------------------------------------------
# fixtures in the official layouts; every image is a flat colour that encodes its label

COLORS = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]
TIN_WNIDS = ['n02', 'n00', 'n01']  # deliberately unsorted: labels must follow wnids.txt
CUB_CLASSES = ['001.Albatross', '002.Auklet', '003.Cormorant']
CUB_BOX = (10.0, 8.0, 40.0, 30.0)  # x, y, w, h; the box is white, the rest of the image the class colour


def save_image(path, color, size=(64, 64), mode='RGB', box=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new(mode, size, color)
    if box is not None:
        x, y, w, h = map(int, box)
        im.paste((255, 255, 255), (x, y, x + w, y + h))
    im.save(path, format='JPEG', quality=95)


def make_tin(data_dir, n_train=3, val_labels=(0, 1, 2, 0, 1, 2, 2)):
    root = Path(data_dir) / 'tiny-imagenet-200'
    root.mkdir(parents=True)
    (root / 'wnids.txt').write_text('\n'.join(TIN_WNIDS) + '\n')
    (root / 'words.txt').write_text(''.join(f'{w}\tthing {w}\n' for w in TIN_WNIDS))
    for label, w in enumerate(TIN_WNIDS):
        for i in range(n_train):
            save_image(root / 'train' / w / 'images' / f'{w}_{i}.JPEG', COLORS[label])
        (root / 'train' / w / f'{w}_boxes.txt').write_text(f'{w}_0.JPEG\t0\t0\t63\t63\n')
    save_image(root / 'train' / 'n00' / 'images' / 'n00_gray.JPEG', 128, mode='L')  # a grayscale one, label 1
    lines = []
    for i, label in enumerate(val_labels):
        save_image(root / 'val' / 'images' / f'val_{i}.JPEG', COLORS[label])
        lines.append(f'val_{i}.JPEG\t{TIN_WNIDS[label]}\t0\t0\t63\t63\n')
    (root / 'val' / 'val_annotations.txt').write_text(''.join(reversed(lines)))  # order on disk must not matter
    save_image(root / 'test' / 'images' / 'test_0.JPEG', (0, 0, 0))
    return root


def make_cub(data_dir, n_images=9):
    root = Path(data_dir) / 'CUB_200_2011'
    root.mkdir(parents=True)
    images, labels, split, boxes = [], [], [], []
    for i in range(1, n_images + 1):
        c = (i - 1) % 3 + 1  # 1-based class id
        rel = f'{CUB_CLASSES[c - 1]}/{CUB_CLASSES[c - 1]}_{i}.jpg'
        save_image(root / 'images' / rel, COLORS[c - 1], size=(96, 72), box=CUB_BOX)  # non-square like the real ones
        images.append(f'{i} {rel}\n')
        labels.append(f'{i} {c}\n')
        split.append(f'{i} {1 if i <= 6 else 0}\n')  # 6 train, 3 test
        boxes.append(f'{i} ' + ' '.join(map(str, CUB_BOX)) + '\n')
    (root / 'images.txt').write_text(''.join(images))
    (root / 'image_class_labels.txt').write_text(''.join(labels))
    (root / 'train_test_split.txt').write_text(''.join(split))
    (root / 'bounding_boxes.txt').write_text(''.join(boxes))
    (root / 'classes.txt').write_text(''.join(f'{k + 1} {c}\n' for k, c in enumerate(CUB_CLASSES)))
    return root


def dominant_channel(images):  # uint8 (N, 3, H, W) -> (N,) index of the strongest mean channel
    return images.float().mean((2, 3)).argmax(1)


def md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    # these tensors are tiny: intra-op threads only add overhead (a lot of it on a busy 2-core machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# -----------------------------------------------------------------------------
# Tiny ImageNet and CUB layouts


def test_tin_labels_and_class_order(tmp_path):
    make_tin(tmp_path)
    train = data.load_split('tin', 'train', str(tmp_path))
    assert train.classes == TIN_WNIDS and train.num_classes == 3
    assert train.images.shape == (10, 3, 64, 64) and train.images.dtype == torch.uint8
    assert train.images.is_contiguous() and train.labels.dtype == torch.int64
    coloured = train.images.float().std(1).mean((1, 2)) > 10  # all but the grayscale image
    assert coloured.sum() == 9
    assert torch.equal(dominant_channel(train.images[coloured]), train.labels[coloured])
    assert sorted(train.labels.tolist()) == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    val = data.load_split('tin', 'val', str(tmp_path))
    assert val.labels.tolist() == [0, 1, 2, 0, 1, 2, 2]  # val_0..val_6, labels from val_annotations.txt
    assert torch.equal(dominant_channel(val.images), val.labels)


def test_tin_grayscale_becomes_rgb(tmp_path):
    make_tin(tmp_path)
    train = data.load_split('tin', 'train', str(tmp_path))
    gray = train.images[train.images.float().std(1).mean((1, 2)) < 1]
    assert gray.shape == (1, 3, 64, 64)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    assert abs(gray.float().mean().item() - 128) < 3


def test_cub_split_labels_and_bbox(tmp_path):
    root = make_cub(tmp_path)
    train = data.load_split('cub', 'train', str(tmp_path))
    val = data.load_split('cub', 'val', str(tmp_path))  # the official test split
    assert train.images.shape == (6, 3, 64, 64) and val.images.shape == (3, 3, 64, 64)
    assert train.labels.tolist() == [0, 1, 2, 0, 1, 2] and val.labels.tolist() == [0, 1, 2]
    assert train.classes == CUB_CLASSES
    assert torch.equal(dominant_channel(train.images), train.labels)  # mostly class colour without the box
    boxed = data.load_split('cub', 'train', str(tmp_path), cub_bbox=True)
    assert torch.equal(boxed.labels, train.labels)
    assert boxed.images.float().mean() > 240  # cropped to the white box
    assert (root / 'cache_train.pt').exists() and (root / 'cache_train_bbox.pt').exists()
    (root / 'classes.txt').unlink()  # class names then come from the image folders
    assert data.load_split('cub', 'train', str(tmp_path)).classes == CUB_CLASSES
    (root / 'bounding_boxes.txt').unlink()  # only needed for cub_bbox
    data.load_split('cub', 'val', str(tmp_path))
    with pytest.raises(DataError, match='bounding_boxes.txt'):
        data.load_split('cub', 'val', str(tmp_path), cub_bbox=True)


def test_decode_matches_resize_and_center_crop(tmp_path):
    # short side to 64 then centre crop: a 128x64 image whose middle half is white keeps only the white part
    path = tmp_path / 'wide.png'
    im = Image.new('RGB', (128, 64), (0, 0, 0))
    im.paste((255, 255, 255), (32, 0, 96, 64))
    im.save(path)
    out = data._decode_image(str(path))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out[:, 2:-2].min() == 255

# -----------------------------------------------------------------------------
# cache


def test_cache_reused_then_invalidated(tmp_path, monkeypatch):
    root = make_tin(tmp_path)
    first = data.load_split('tin', 'train', str(tmp_path))
    assert (root / 'cache_train.pt').exists()

    def fail(*args, **kwargs):
        raise AssertionError('decoded although the cache is valid')
    real_decode = data._decode_image
    monkeypatch.setattr(data, '_decode_image', fail)
    again = data.load_split('tin', 'train', str(tmp_path))  # must come from the cache
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    assert again.classes == first.classes

    # replacing an image changes its size/mtime: the cache is rebuilt and shows the new pixels
    img = root / 'train' / 'n02' / 'images' / 'n02_0.JPEG'
    save_image(img, (250, 250, 250))
    os.utime(img, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    with pytest.raises(DataError):  # the failing decoder proves it tries to rebuild
        data.load_split('tin', 'train', str(tmp_path))
    monkeypatch.setattr(data, '_decode_image', real_decode)
    rebuilt = data.load_split('tin', 'train', str(tmp_path))
    assert not torch.equal(rebuilt.images, first.images)
    assert rebuilt.images[rebuilt.labels == 0].float().mean(1).amax() > 240


def test_truncated_cache_is_rebuilt(tmp_path):
    root = make_tin(tmp_path)
    first = data.load_split('tin', 'val', str(tmp_path))
    cache = root / 'cache_val.pt'
    cache.write_bytes(cache.read_bytes()[:100])
    again = data.load_split('tin', 'val', str(tmp_path))
    assert torch.equal(again.images, first.images)
    assert cache.stat().st_size > 1000


def test_corrupt_images_are_all_listed_and_no_cache_left(tmp_path):
    root = make_tin(tmp_path)
    (root / 'train' / 'n00' / 'images' / 'n00_1.JPEG').write_bytes(b'not a jpeg')
    (root / 'train' / 'n01' / 'images' / 'n01_2.JPEG').write_bytes(b'\xff\xd8\xff\xe0 truncated')
    with pytest.raises(DataError) as e:
        data.load_split('tin', 'train', str(tmp_path))
    msg = str(e.value)
    assert 'n00_1.JPEG' in msg and 'n01_2.JPEG' in msg and msg.startswith('2 unreadable') and '\n' not in msg
    assert not [p for p in root.iterdir() if 'cache' in p.name]


def test_missing_dataset_dir_names_path_and_download(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_split('tin', 'train', str(tmp_path / 'nowhere'))
    msg = str(e.value)
    assert str(tmp_path / 'nowhere' / 'tiny-imagenet-200') in msg and '--download true' in msg and '\n' not in msg
    with pytest.raises(DataError, match='--download true'):
        data.load_split('cub', 'val', str(tmp_path / 'nowhere'))


def test_missing_annotation_files(tmp_path):
    tin, cub = make_tin(tmp_path), make_cub(tmp_path)
    (tin / 'val' / 'val_annotations.txt').unlink()
    with pytest.raises(DataError) as e:
        data.load_split('tin', 'val', str(tmp_path))
    assert str(tin / 'val' / 'val_annotations.txt') in str(e.value) and '--download true' in str(e.value)
    (cub / 'train_test_split.txt').unlink()
    with pytest.raises(DataError) as e:
        data.load_split('cub', 'train', str(tmp_path))
    assert str(cub / 'train_test_split.txt') in str(e.value) and '--download true' in str(e.value)
    (tin / 'val' / 'val_annotations.txt').write_text('val_0.JPEG\n')  # damaged
    with pytest.raises(DataError, match='fewer than 2 fields'):
        data.load_split('tin', 'val', str(tmp_path))
    (tin / 'val' / 'images' / 'val_3.JPEG').unlink()  # a listed image that is missing
    (tin / 'val' / 'val_annotations.txt').write_text('val_3.JPEG\tn00\t0\t0\t1\t1\n')
    with pytest.raises(DataError, match='missing.*val_3.JPEG'):
        data.load_split('tin', 'val', str(tmp_path))


def test_unknown_names():
    with pytest.raises(DataError, match='unknown dataset'):
        data.load_split('imagenet', 'train')
    with pytest.raises(DataError, match='unknown split'):
        data.load_split('demo', 'test')

# -----------------------------------------------------------------------------
# demo and synthetic


def test_demo_loads_deterministically():
    data._demo_photos.cache_clear()
    train, val = data.load_split('demo', 'train'), data.load_split('demo', 'val')
    assert train.images.shape[1:] == (3, 64, 64) and train.images.dtype == torch.uint8
    assert 1000 <= len(train.labels) <= 2000 and 200 <= len(val.labels) <= 500
    assert train.num_classes > 1 and train.classes == val.classes
    counts = torch.bincount(train.labels, minlength=train.num_classes)
    assert counts.min() > 0 and counts.max() <= 2 * counts.min()  # balanced
    assert set(val.labels.tolist()) == set(range(val.num_classes))
    again = data.load_split('demo', 'train')
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)


def test_demo_train_and_val_share_no_pixels():
    # by construction: each photo is cut into two disjoint parts that are resized separately ...
    for img in data._demo_photos().values():
        train_part, val_part = data._demo_parts(img)
        axis = 0 if img.shape[0] > img.shape[1] else 1
        assert np.array_equal(np.concatenate([train_part, val_part], axis), img)
    # ... and no val crop equals any train crop
    train, val = data.load_split('demo', 'train'), data.load_split('demo', 'val')
    train_crops = {bytes(x.numpy()) for x in train.images}
    assert not any(bytes(x.numpy()) in train_crops for x in val.images)


def test_synthetic_val():
    a, b = data.load_split('synthetic', 'val'), data.load_split('synthetic', 'val')
    assert a.images.shape == (10_000, 3, 64, 64) and a.images.dtype == torch.uint8 and a.num_classes == 200
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert 0 <= a.labels.min() and a.labels.max() < 200
    assert 120 < a.images.float().mean() < 135  # uniform bytes

# -----------------------------------------------------------------------------
# normalisation, seeds, loaders


def test_normalize_constants_survive_inference_mode():
    data._mean_std.cache_clear()
    with torch.inference_mode():  # the first call builds the cached constants
        data.normalize(torch.rand(1, 3, 2, 2, device='cpu'))
    pred = torch.rand(1, 3, 2, 2, requires_grad=True)
    data.normalize(data.denormalize(pred)).sum().backward()  # no "inference tensors" error
    assert pred.grad is not None


def test_normalize_round_trip():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    n = data.normalize(x)
    assert n.dtype == torch.float32 and torch.allclose(n, data.normalize(x.float() / 255))
    assert torch.allclose(data.denormalize(n), x.float() / 255, atol=1e-6)
    assert torch.allclose(n[0, 0, 0, 0], (x[0, 0, 0, 0] / 255 - 0.485) / 0.229)
    assert data.normalize(x[0]).shape == (3, 8, 8)


def test_seed_for():
    assert data.seed_for(1, 2, 3) == data.seed_for(1, 2, 3)
    seeds = {data.seed_for(s, e, k) for s in range(3) for e in range(10) for k in range(10)}
    assert len(seeds) == 300 and all(0 <= s < 2**63 for s in seeds)
    assert data.seed_for(1, 2) != data.seed_for(2, 1) and data.seed_for(0) != data.seed_for(0, 0)


def toy(n=40):
    images = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return images, torch.arange(n)  # label = index, so batches tell which samples they hold


def labels_per_step(loader, epoch):
    return [torch.cat([y for _, y in micro]) for _, micro in loader.epoch(epoch)]


def test_loader_determinism_and_coverage():
    images, labels = toy()
    loader = DeviceLoader(images, labels, batch_size=8, device='cpu', seed=3)
    assert loader.steps_per_epoch == 5
    e0, e0_again, e1 = labels_per_step(loader, 0), labels_per_step(loader, 0), labels_per_step(loader, 1)
    assert all(torch.equal(a, b) for a, b in zip(e0, e0_again))
    assert not all(torch.equal(a, b) for a, b in zip(e0, e1))
    assert sorted(torch.cat(e0).tolist()) == list(range(40))  # a permutation: every sample once
    other_seed = labels_per_step(DeviceLoader(images, labels, batch_size=8, device='cpu', seed=4), 0)
    assert not all(torch.equal(a, b) for a, b in zip(e0, other_seed))
    resumed = [(s, torch.cat([y for _, y in m])) for s, m in loader.epoch(0, start_step=3)]
    assert [s for s, _ in resumed] == [3, 4] and torch.equal(resumed[0][1], e0[3])
    # x is the normalised image of the sample named by y
    _, micro = next(loader.epoch(0))
    x, y = micro[0]
    assert x.shape == (8, 3, 64, 64) and x.dtype == torch.float32
    assert torch.allclose(x, data.normalize(images[y]))
    unshuffled = labels_per_step(DeviceLoader(images, labels, batch_size=8, device='cpu', shuffle=False), 0)
    assert torch.equal(torch.cat(unshuffled), torch.arange(40))


@pytest.mark.parametrize('world_size,accum_steps', [(2, 1), (1, 2), (2, 2), (4, 2)])
def test_loader_shards_rebuild_the_global_batch(world_size, accum_steps):
    images, labels = toy()
    B = 16
    reference = labels_per_step(DeviceLoader(images, labels, batch_size=B, device='cpu', seed=7), 2)
    loaders = [DeviceLoader(images, labels, batch_size=B, device='cpu', seed=7, rank=r, world_size=world_size,
                            accum_steps=accum_steps) for r in range(world_size)]
    assert loaders[0].micro_batch == B // (world_size * accum_steps)
    for step, ref in enumerate(reference):
        rebuilt = torch.full((B,), -1)
        for loader in loaders:
            s, micro = list(loader.epoch(2))[step]
            assert s == step and len(micro) == accum_steps
            for m, (x, y) in enumerate(micro):
                assert len(y) == loader.micro_batch
                assert (rebuilt[loader.rows(m)] == -1).all()  # ranks and micro-steps are disjoint
                rebuilt[loader.rows(m)] = y
        assert torch.equal(rebuilt, ref)  # same global batch, same positions, whatever the sharding


def test_loader_errors_and_resize():
    images, labels = toy(10)
    with pytest.raises(DataError, match='divisible'):
        DeviceLoader(images, labels, batch_size=6, device='cpu', world_size=4)
    with pytest.raises(DataError, match='fewer than one global batch'):
        DeviceLoader(images, labels, batch_size=16, device='cpu')
    loader = DeviceLoader(data.Split(images, labels, ['a'] * 10), batch_size=4, device='cpu', img_size=32)
    _, micro = next(loader.epoch(0))
    assert micro[0][0].shape == (4, 3, 32, 32) and loader.steps_per_epoch == 2


def test_loader_augmentation_reproducible_per_step():
    images, labels = toy(32)
    make = lambda: DeviceLoader(images, labels, batch_size=8, device='cpu', seed=1, augment=data.finetune_augment)
    a, b = list(itertools.islice(make().epoch(0), 3)), next(make().epoch(0, start_step=2))
    assert torch.equal(a[2][1][0][0], b[1][0][0])  # step 2 reproduced without replaying steps 0-1
    plain = DeviceLoader(images, labels, batch_size=8, device='cpu', seed=1)
    assert not torch.allclose(a[0][1][0][0], next(plain.epoch(0))[1][0][0])


def test_iterate_batches():
    images, labels = toy(10)
    batches = list(data.iterate_batches(images, labels, 4, 'cpu'))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), labels)
    assert torch.allclose(batches[1][0], data.normalize(images[4:8]))
    x, _ = next(data.iterate_batches(images, labels, 4, 'cpu', img_size=48))
    assert x.shape == (4, 3, 48, 48)

# -----------------------------------------------------------------------------
# augmentations


def photo_batch(n=16):
    """n copies of one demo crop: any difference between outputs comes from per-sample randomness."""
    return (data.load_split('demo', 'train').images[100:101].float() / 255).expand(n, 3, 64, 64).contiguous()


AUGMENTATIONS = [data.random_resized_crop, data.rand_augment, data.pretrain_augment, data.finetune_augment]


@pytest.mark.parametrize('fn', AUGMENTATIONS, ids=lambda f: f.__name__)
def test_augmentation_shape_range_determinism(fn):
    x = photo_batch()
    out = fn(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, fn(x, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(out, fn(x, generator=torch.Generator().manual_seed(1)))
    distinct = {bytes(o.numpy()) for o in out}
    assert len(distinct) > 1  # per-sample, not one draw for the whole batch
    assert torch.equal(x, photo_batch())  # input untouched


def test_rand_augment_draws_many_ops_per_batch():
    x = photo_batch(64)
    out = data.rand_augment(x, num_ops=1, generator=torch.Generator().manual_seed(0))
    assert len({bytes(o.numpy()) for o in out}) > 10


def test_identity_warp_is_exact():
    x = photo_batch(2)
    theta = torch.tensor([[1., 0, 0], [0, 1, 0]]).expand(2, 2, 3)
    assert torch.allclose(data._warp(x, theta, 'zeros'), x, atol=1e-5)
    shift = torch.tensor([[1., 0, 2 * 8 / 64], [0, 1, 0]]).expand(2, 2, 3)  # sample 8 px to the right
    assert torch.allclose(data._warp(x, shift, 'zeros')[..., :-8], x[..., 8:], atol=1e-5)


def test_colour_ops_match_pil():
    # RandAugment's colour ops from data.py's pieces: f x + (1 - f) other (clamped) and the level look-up tables
    img = data.load_split('demo', 'train').images[::97][:8]  # crops of different photos
    x, f = img.float() / 255, torch.full((8, 1, 1, 1), 1.8)
    blend = lambda other: (f * x + (1 - f) * other).clamp(0, 1)
    q = data._levels(x)
    lo, hi = q.aminmax(dim=2, keepdim=True)

    def pil(fn):
        out = [np.array(fn(Image.fromarray(i.permute(1, 2, 0).numpy()))) for i in img]
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255
    enhance = lambda op: pil(lambda im: op(im).enhance(1.8))
    pairs = [((x + (1 - f) * data._smooth_delta(x)).clamp(0, 1), enhance(ImageEnhance.Sharpness)),  # smoothed x
             (blend(data._gray(x).mean((1, 2, 3), keepdim=True)), enhance(ImageEnhance.Contrast)),
             (blend(data._gray(x)), enhance(ImageEnhance.Color)),
             (data._apply_lut(data._autocontrast_lut(lo, hi), q, x.shape), pil(ImageOps.autocontrast)),
             (data._apply_lut(data._equalize_lut(q, hi), q, x.shape), pil(ImageOps.equalize))]
    for ours, ref in pairs:  # PIL rounds to uint8 along the way
        assert (ours - ref).abs().max() <= 1.5 / 255


def test_random_resized_crop_full_scale_is_identity_or_mirror():
    x = photo_batch(4)
    out = data.random_resized_crop(x, scale=(1, 1), ratio=(1, 1), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x, atol=1e-5)
    flipped = data.random_resized_crop(x, scale=(1, 1), ratio=(1, 1), generator=torch.Generator().manual_seed(0),
                                       hflip=1.0)  # always mirrored, in the same resampling
    assert torch.allclose(flipped, x.flip(3), atol=1e-5)


def test_mixup_cutmix():
    x = torch.rand(8, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    xm, t = data.mixup_cutmix(x, y, 10, label_smoothing=0.1, seed=0)
    assert xm.shape == x.shape and t.shape == (8, 10)
    assert torch.allclose(t.sum(1), torch.ones(8)) and t.min() >= 0.01 - 1e-6
    # cutmix only: every pixel comes from the sample or its partner, the target weight is the kept area
    kept = []
    for seed in range(5):
        xm, t = data.mixup_cutmix(x, y, 10, mixup_alpha=0, seed=seed)
        own = (xm == x).all(1)
        assert (own | (xm == x.flip(0)).all(1)).all()
        assert torch.allclose(t[0, 0], own[0].float().mean())
        kept.append(own[0].float().mean().item())
    assert min(kept) < 1  # some boxes are not empty
    # mixup only: a convex blend with one lambda for the batch
    xm, t = data.mixup_cutmix(x, y, 10, cutmix_alpha=0, seed=0)
    lam = t[0, 0]
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    # neither: the batch as it is, with hard targets
    xm, t = data.mixup_cutmix(x, y, 10, mixup_alpha=0, cutmix_alpha=0, seed=0)
    assert torch.equal(xm, x) and torch.equal(t, torch.eye(10)[y])


def test_mixup_lambda_is_beta_and_reproducible_from_seed():
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    for kw in ({}, {'mixup_alpha': 0}, {'cutmix_alpha': 0}):
        a, b = data.mixup_cutmix(x, y, 4, seed=7, **kw), data.mixup_cutmix(x, y, 4, seed=7, **kw)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[1], data.mixup_cutmix(x, y, 4, seed=8, **kw)[1])
    # one lambda per batch from np.random.default_rng(seed).beta(alpha, alpha); the old rejection sampler's std
    # was 0.092 at alpha 5, Beta(5, 5)'s is sqrt(25 / (10 ** 2 * 11)) = 0.1508
    lams = np.array([data.mixup_cutmix(x[:2], y[:2], 2, mixup_alpha=5, cutmix_alpha=0, seed=s)[1][0, 0].item()
                     for s in range(4000)])
    assert abs(lams.std() / 0.15076 - 1) < 0.03 and abs(lams.mean() - 0.5) < 0.01


def test_rand_augment_geometric_ops_resample_nearest():
    # pixels of four flat colours: nearest resampling (torchvision's default) only moves pixels, so rotations,
    # shears and translations show the input's colours and the black fill, never a blend of neighbours
    palette = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.3, 0.9], [0.7, 0.7, 0.2]])
    x = palette[torch.randint(4, (16, 64, 64), generator=torch.Generator().manual_seed(0))]  # (16, 64, 64, 3)
    x = x.permute(0, 3, 1, 2).contiguous()  # (16, 3, 64, 64)
    geometric = ('rotate', 'shear_x', 'shear_y', 'translate_x', 'translate_y')
    out = data.rand_augment(x, num_ops=2, generator=torch.Generator().manual_seed(0), ops=geometric)
    colours = out.permute(0, 2, 3, 1).reshape(-1, 1, 3)  # (16 * 64 * 64, 1, 3)
    allowed = torch.cat([palette, torch.zeros(1, 3)])  # (5, 3)
    assert (colours == allowed).all(2).any(1).all()
    assert not torch.equal(out, x) and (out == 0).all(1).any()  # moved, with some fill


def test_augment_and_mixup_op_count_does_not_grow_with_batch():
    """Fine-tuning's augmentation + mixup/cutmix dispatch a fixed, small number of aten ops (a bound on kernel
    launches) per micro-batch: a fine-tuning step is a few ms of GPU work, so more would make it launch-bound."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    def count(n, **mix):
        x, y = torch.rand(n, 3, 64, 64), torch.arange(n) % 10
        with Count() as c:
            x = data.finetune_augment(x, torch.Generator().manual_seed(0))
            data.mixup_cutmix(x, y, 10, label_smoothing=0.1, seed=1, **mix)
        return c.n
    count(8)  # the first call makes RandAugment's per-device tables
    for mix in ({'mixup_alpha': 0}, {'cutmix_alpha': 0}):  # cutmix, mixup
        assert count(8, **mix) == count(64, **mix) <= 210  # 503 when every op ran on every sample

# -----------------------------------------------------------------------------
# downloads (served from file:// URLs)


def zip_dir(src_root, archive, extra=()):
    with zipfile.ZipFile(archive, 'w') as z:
        for p in sorted(src_root.rglob('*')):
            z.write(p, p.relative_to(src_root.parent).as_posix())
        for name, content in extra:
            z.writestr(name, content)
    return archive


def test_download_tin_zip(tmp_path, monkeypatch):
    archive = zip_dir(make_tin(tmp_path / 'src'), tmp_path / 'tin.zip')
    monkeypatch.setitem(data.ARCHIVES['tin'], 'url', archive.as_uri())
    monkeypatch.setitem(data.ARCHIVES['tin'], 'md5', md5(archive))
    dst = tmp_path / 'data'
    train = data.load_split('tin', 'train', str(dst), download=True)
    assert len(train.labels) == 10 and train.classes == TIN_WNIDS
    assert sorted(os.listdir(dst)) == ['tiny-imagenet-200']  # no temp files or extraction dirs left


def test_download_cub_tgz(tmp_path):
    src = make_cub(tmp_path / 'src')
    archive = tmp_path / 'CUB_200_2011.tgz'
    with tarfile.open(archive, 'w:gz') as tf:
        tf.add(src, arcname='CUB_200_2011')
        tf.addfile(tarfile.TarInfo('attributes.txt'), io.BytesIO(b''))  # the real archive has a sibling file
    dst = tmp_path / 'data'
    data.download('cub', str(dst), url=archive.as_uri(), md5=md5(archive))
    assert sorted(os.listdir(dst)) == ['CUB_200_2011']
    assert data.load_split('cub', 'val', str(dst)).labels.tolist() == [0, 1, 2]


def test_download_wrong_md5_extracts_nothing(tmp_path):
    archive = zip_dir(make_tin(tmp_path / 'src'), tmp_path / 'tin.zip')
    dst = tmp_path / 'data'
    with pytest.raises(DataError) as e:
        data.download('tin', str(dst), url=archive.as_uri(), md5='0' * 32)
    assert '0' * 32 in str(e.value) and md5(archive) in str(e.value)
    assert not dst.exists()  # the folder it made for the download is removed again


def test_download_refuses_escaping_members(tmp_path):
    src = make_tin(tmp_path / 'src')
    evil_zip = zip_dir(src, tmp_path / 'evil.zip', extra=[('../evil.txt', 'gotcha')])
    dst = tmp_path / 'data'
    with pytest.raises(DataError, match='refusing'):
        data.download('tin', str(dst), url=evil_zip.as_uri(), md5=md5(evil_zip))
    assert not (tmp_path / 'evil.txt').exists() and not dst.exists()


@pytest.mark.parametrize('member, why', [
    (dict(name='CUB_200_2011/../../evil.txt'), 'would be written outside'),
    (dict(name='CUB_200_2011/escape', type=tarfile.SYMTYPE, linkname='../../../outside'), 'is a link to'),
    (dict(name='CUB_200_2011/hard', type=tarfile.LNKTYPE, linkname='../outside'), 'is a hard link to'),
    (dict(name='CUB_200_2011/pipe', type=tarfile.FIFOTYPE), 'is a device or fifo'),
], ids=['path', 'symlink', 'hardlink', 'fifo'])
def test_download_refuses_a_tar_whose_member_escapes(member, why, tmp_path):
    """One member that would write outside the data folder (or is a device) and nothing of the archive is extracted."""
    evil_tgz = tmp_path / 'evil.tgz'
    with tarfile.open(evil_tgz, 'w:gz') as tf:
        tf.add(make_cub(tmp_path / 'src'), arcname='CUB_200_2011')
        info = tarfile.TarInfo(member.pop('name'))
        for k, v in member.items():
            setattr(info, k, v)
        tf.addfile(info, io.BytesIO(b'') if info.isfile() else None)
    dst = tmp_path / 'data'
    with pytest.raises(DataError, match=f'refusing.*{why}'):
        data.download('cub', str(dst), url=evil_tgz.as_uri(), md5=md5(evil_tgz))
    assert not dst.exists() and not (tmp_path / 'evil.txt').exists()


def test_download_of_a_file_that_is_no_archive_extracts_nothing(tmp_path):
    page = tmp_path / 'login.html'  # what a captive portal or a moved URL serves
    page.write_text('<html>please log in</html>')
    dst = tmp_path / 'data'
    with pytest.raises(DataError, match='neither a zip nor a tar archive'):
        data.download('cub', str(dst), url=page.as_uri(), md5=md5(page))
    assert not dst.exists()


def test_download_command_line(tmp_path):
    """python data.py download NAME: a dataset already there is left alone (exit 0); a data_dir that cannot be
    written to is one line on stderr and exit 1."""
    def download(data_dir):
        return subprocess.run([sys.executable, os.path.join(os.path.dirname(data.__file__), 'data.py'), 'download',
                               'cub', '--data_dir', str(data_dir)], capture_output=True, text=True, timeout=120)
    make_cub(tmp_path / 'data')
    done = download(tmp_path / 'data')
    assert done.returncode == 0 and 'already exists, not downloading' in done.stdout
    (tmp_path / 'a_file').write_text('')
    done = download(tmp_path / 'a_file')
    assert done.returncode == 1 and done.stderr.startswith('data.py: error: cannot download into')
    assert done.stderr.count('\n') == 1


def test_download_unreachable_fails_fast(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        data.download('tin', str(tmp_path / 'new' / 'data'), url='http://127.0.0.1:9/x.zip')
    assert time.perf_counter() - t0 < 20
    msg = str(e.value)
    assert '\n' not in msg and 'could not download' in msg and 'tiny-imagenet-200.zip' in msg
    assert str(tmp_path / 'new' / 'data' / 'tiny-imagenet-200' / 'wnids.txt') in msg
    assert os.listdir(tmp_path) == []  # no partial archive, and the folders it made are removed again
