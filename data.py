"""
Datasets and the on-device data pipeline.

Every split is decoded once into a uint8 tensor (N, 3, 64, 64) plus int64 labels and cached next to the data.
Training then keeps the whole split on the device and does shuffling, resizing, augmentation and normalisation
there, with per-(seed, epoch, step) generators so that any step can be reproduced without stored RNG state.

    python data.py download tin --data_dir data
"""
import argparse
import contextlib
import functools
import hashlib
import http.client
import math
import os
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATASETS = ('tin', 'cub', 'demo', 'synthetic')
IMG = 64                # every split is stored at 64x64
CACHE_VERSION = 1       # bump when the decoding changes, so that old caches are rebuilt
DOWNLOAD_TIMEOUT = 15   # seconds without an answer before a download gives up

ARCHIVES = {
    'tin': dict(url='http://cs231n.stanford.edu/tiny-imagenet-200.zip', md5='90528d7ca1a48142e341f4ef8d21d0de',
                archive='tiny-imagenet-200.zip', root='tiny-imagenet-200', marker='wnids.txt'),
    'cub': dict(url='https://data.caltech.edu/records/65de6-vzc35/files/CUB_200_2011.tgz',
                md5='97eceeb196236b17998738112f37df78',
                archive='CUB_200_2011.tgz', root='CUB_200_2011', marker='images.txt'),
}


class DataError(Exception):
    """A problem with the data on disk; the message is one line: what is wrong, where, and how to fix it."""


@dataclass
class Split:
    images: torch.Tensor   # uint8 (N, 3, 64, 64), contiguous, CPU
    labels: torch.Tensor   # int64 (N,)
    classes: list          # class names, index = label

    @property
    def num_classes(self):
        return len(self.classes)


def seed_for(*parts):
    """Mix integers into one 63-bit seed (splitmix64 on each part), so (seed, epoch, step, ...) never collide."""
    mask = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for p in parts:
        z = (h ^ (int(p) & mask)) + 0x9E3779B97F4A7C15 & mask
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & mask
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & mask
        h = z ^ (z >> 31)
    return h & ((1 << 63) - 1)

# -----------------------------------------------------------------------------
# reading the official layouts


def _missing(name, data_dir, what):
    a = ARCHIVES[name]
    return DataError(f"{name}: {what}; pass --download true or unpack {a['archive']} into {data_dir}/ so that "
                     f"{os.path.join(data_dir, a['root'], a['marker'])} exists")


def _read_rows(name, data_dir, root, rel, columns):
    """Whitespace-split rows of an annotation file, each with at least `columns` fields."""
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        raise _missing(name, data_dir, f"missing annotation file {path}")
    with open(path) as f:
        rows = [line.split() for line in f if line.strip()]
    short = [k for k, r in enumerate(rows) if len(r) < columns]
    if short:
        raise DataError(f"{path}: line {short[0] + 1} has fewer than {columns} fields; the file is damaged, "
                        f"delete {root} and pass --download true")
    return rows


def _bad_files(root, bad, what):
    shown = ', '.join(bad[:20]) + (f' and {len(bad) - 20} more' if len(bad) > 20 else '')
    return DataError(f"{len(bad)} {what} image file(s) under {root}: {shown}; replace them "
                     f"(or delete {root} and pass --download true) and try again")


def _list_tin(data_dir, root, split):
    """-> (relative image paths, labels, classes, annotation files, no boxes). Label = index in wnids.txt."""
    wnids = [r[0] for r in _read_rows('tin', data_dir, root, 'wnids.txt', 1)]
    index = {w: i for i, w in enumerate(wnids)}
    files, labels = [], []
    if split == 'train':
        for i, w in enumerate(wnids):
            d = os.path.join(root, 'train', w, 'images')
            if not os.path.isdir(d):
                raise _missing('tin', data_dir, f"missing image folder {d}")
            names = sorted(e.name for e in os.scandir(d) if e.name.lower().endswith(('.jpeg', '.jpg', '.png')))
            files += [f'train/{w}/images/{n}' for n in names]
            labels += [i] * len(names)
        return files, labels, wnids, ['wnids.txt'], None
    ann = 'val/val_annotations.txt'
    rows = sorted(_read_rows('tin', data_dir, root, ann, 2))  # (file, wnid, x0, y0, x1, y1), sorted by file name
    unknown = sorted({r[1] for r in rows if r[1] not in index})
    if unknown:
        raise DataError(f"{os.path.join(root, ann)} names wnids missing from wnids.txt: {', '.join(unknown[:20])}; "
                        f"the dataset is inconsistent, re-download it with --download true")
    return [f'val/images/{r[0]}' for r in rows], [index[r[1]] for r in rows], wnids, ['wnids.txt', ann], None


def _list_cub(data_dir, root, split, bbox):
    """-> (paths, labels, classes, annotation files, boxes or None). 'val' is the official test split."""
    paths = {r[0]: 'images/' + r[1] for r in _read_rows('cub', data_dir, root, 'images.txt', 2)}
    cls = {r[0]: int(r[1]) - 1 for r in _read_rows('cub', data_dir, root, 'image_class_labels.txt', 2)}
    is_train = {r[0]: r[1] == '1' for r in _read_rows('cub', data_dir, root, 'train_test_split.txt', 2)}
    ids = sorted((i for i in paths if is_train.get(i) == (split == 'train')), key=int)
    if os.path.isfile(os.path.join(root, 'classes.txt')):
        classes = [r[1] for r in sorted(_read_rows('cub', data_dir, root, 'classes.txt', 2), key=lambda r: int(r[0]))]
    else:  # class dir names, from the image paths of the whole dataset so that train and val agree
        names = {cls[i]: paths[i].split('/')[1] for i in paths}
        classes = [names.get(c, f'class_{c + 1:03d}') for c in range(max(names) + 1)]
    annotations = ['images.txt', 'image_class_labels.txt', 'train_test_split.txt']
    boxes = None
    if bbox:  # (x, y, w, h) per image
        rows = {r[0]: tuple(map(float, r[1:5])) for r in _read_rows('cub', data_dir, root, 'bounding_boxes.txt', 5)}
        boxes, annotations = [rows[i] for i in ids], annotations + ['bounding_boxes.txt']
    return [paths[i] for i in ids], [cls[i] for i in ids], classes, annotations, boxes


def _decode_image(path, box=None):
    """One image -> uint8 (64, 64, 3): RGB, optional (x, y, w, h) box crop, short side to 64, centre crop.
    This is torchvision's Resize(64) + CenterCrop(64) on PIL images, as the paper's code did."""
    with Image.open(path) as im:
        im = im.convert('RGB')  # grayscale, CMYK, palette -> 3 channels
        if box is not None:
            x, y, w, h = box
            im = im.crop((max(0, round(x)), max(0, round(y)), min(im.width, round(x + w)),
                          min(im.height, round(y + h))))
        w, h = im.size
        if (w, h) != (IMG, IMG):
            w, h = (IMG, int(IMG * h / w)) if w <= h else (int(IMG * w / h), IMG)
            im = im.resize((w, h), Image.BILINEAR)  # PIL antialiases when downscaling
            left, top = int(round((w - IMG) / 2)), int(round((h - IMG) / 2))
            im = im.crop((left, top, left + IMG, top + IMG))
        return np.asarray(im, dtype=np.uint8)


def _decode_all(root, files, boxes):
    """Decode every file with a thread pool (PIL releases the GIL while decoding); DataError lists all bad files."""
    out = np.empty((len(files), IMG, IMG, 3), np.uint8)

    def work(chunk):
        bad = []
        for i in chunk:
            try:
                out[i] = _decode_image(os.path.join(root, files[i]), None if boxes is None else boxes[i])
            except Exception as e:
                bad.append(f"{files[i]} ({type(e).__name__}: {' '.join(str(e).split())})")
        return bad
    chunks = [range(i, min(i + 256, len(files))) for i in range(0, len(files), 256)]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        bad = [b for chunk_bad in pool.map(work, chunks) for b in chunk_bad]
    if bad:
        raise _bad_files(root, bad, 'unreadable')
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # (N, 3, 64, 64)


def _signature(root, files, extra):
    """Hash of (path, size, mtime) of every image and annotation file: cheap to recompute, changes on any edit."""
    h = hashlib.sha1(f'{CACHE_VERSION}|{extra}'.encode())
    missing = []
    for rel in files:
        try:
            st = os.stat(os.path.join(root, rel))
            h.update(f'{rel}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
        except OSError:
            missing.append(rel)
    if missing:
        raise _bad_files(root, missing, 'missing')
    return h.hexdigest()


def _load_disk_split(name, split, data_dir, bbox):
    root = os.path.join(data_dir, ARCHIVES[name]['root'])
    if not os.path.isdir(root):
        raise _missing(name, data_dir, f"dataset folder {root} not found")
    listing = _list_tin(data_dir, root, split) if name == 'tin' else _list_cub(data_dir, root, split, bbox)
    files, labels, classes, annotations, boxes = listing
    if not files:
        raise _missing(name, data_dir, f"no {split} images listed under {root}")
    signature = _signature(root, annotations + files, f'{name}|{split}|{boxes is not None}')
    cache = os.path.join(root, f"cache_{split}{'_bbox' if boxes is not None else ''}.pt")
    if os.path.isfile(cache):
        try:
            c = torch.load(cache, map_location='cpu', weights_only=True)
            if c['version'] == CACHE_VERSION and c['signature'] == signature:
                return Split(c['images'], c['labels'], list(c['classes']))
            print(f'{cache} is out of date, rebuilding it')
        except Exception as e:  # truncated or foreign file: rebuild rather than crash
            print(f'{cache} could not be read ({type(e).__name__}), rebuilding it')
    print(f'decoding {len(files)} {name}/{split} images into {cache} (once) ...')
    out = Split(_decode_all(root, files, boxes), torch.tensor(labels, dtype=torch.int64), list(classes))
    tmp = f"{cache}.tmp.{os.getpid()}"  # written whole, then renamed: never a half-written cache
    try:
        torch.save(dict(version=CACHE_VERSION, signature=signature, **vars(out)), tmp)  # + images, labels, classes
        os.replace(tmp, cache)
    except OSError as e:  # e.g. a read-only dataset folder or a full disk: work without the cache
        print(f'warning: could not write {cache}: {e}', file=sys.stderr)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return out

# -----------------------------------------------------------------------------
# demo (scikit-image's bundled colour photographs) and synthetic data

DEMO_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field', 'immunohistochemistry', 'retina',
               'stereo_motorcycle')
DEMO_VAL_FRACTION = 1 / 3   # the last third of each photo's long side is val, the first two thirds train
DEMO_SCALES = (200, 300)    # the photo's short side is resized to these before cutting 64x64 crops
DEMO_GRID = {'train': (12, 8), 'val': (3, 8)}  # crops per scale: along the split axis x across it


@functools.lru_cache(maxsize=1)
def _demo_photos():
    """-> {name: uint8 (H, W, 3)} for the bundled photographs that load offline (ones needing pooch are skipped)."""
    need = "the demo dataset needs scikit-image's bundled photographs; pip install scikit-image"
    try:
        import skimage.data
    except ImportError:
        raise DataError(need) from None
    photos = {}
    for name in DEMO_PHOTOS:
        try:
            img = getattr(skimage.data, name)()
        except Exception:  # needs a download in this skimage version
            continue
        img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle -> (left, right, disparity)
        photos[name] = np.ascontiguousarray(img[..., :3])  # drop alpha
    if len(photos) < 2:
        raise DataError(need)
    return photos


def _demo_parts(img):
    """Split a photo along its long side into disjoint (train, val) parts, which are then resized separately,
    so no val crop shares (or even blends in) a source pixel of a train crop."""
    axis = 0 if img.shape[0] > img.shape[1] else 1
    cut = round(img.shape[axis] * (1 - DEMO_VAL_FRACTION))
    return (img[:cut], img[cut:]) if axis == 0 else (img[:, :cut], img[:, cut:])


def _demo(split):
    photos = _demo_photos()
    crops, labels = [], []
    for label, img in enumerate(photos.values()):
        part = _demo_parts(img)[split == 'val']
        ny, nx = DEMO_GRID[split] if img.shape[0] > img.shape[1] else DEMO_GRID[split][::-1]  # as (y, x)
        for short in DEMO_SCALES:
            f = short / min(img.shape[:2])
            h, w = round(part.shape[0] * f), round(part.shape[1] * f)
            p = np.asarray(Image.fromarray(part).resize((w, h), Image.BILINEAR))
            for y in np.linspace(0, h - IMG, ny).round().astype(int):
                for x in np.linspace(0, w - IMG, nx).round().astype(int):
                    crops.append(p[y:y + IMG, x:x + IMG])
                    labels.append(label)
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    return Split(images, torch.tensor(labels, dtype=torch.int64), list(photos))


def _synthetic(split):
    """Random images for benchmarks: 200 classes, 100k train / 10k val, always the same."""
    n = 100_000 if split == 'train' else 10_000
    g = torch.Generator().manual_seed(seed_for(1234, split == 'train'))
    # 8 random bytes per int64 draw: ~3x faster than drawing uint8s one by one
    words = torch.randint(-2**63, 2**63 - 1, (n * 3 * IMG * IMG // 8,), dtype=torch.int64, generator=g)
    images = words.view(torch.uint8).view(n, 3, IMG, IMG)
    labels = torch.randint(0, 200, (n,), generator=g)
    return Split(images, labels, [f'class_{i:03d}' for i in range(200)])


def load_split(name, split, data_dir='data', download=False, cub_bbox=False):
    """-> Split with uint8 (N, 3, 64, 64) images. For cub, 'val' is the official test split."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in ('train', 'val'):
        raise DataError(f"unknown split {split!r}; choose 'train' or 'val'")
    if name == 'demo':
        return _demo(split)
    if name == 'synthetic':
        return _synthetic(split)
    if download and not os.path.isdir(os.path.join(data_dir, ARCHIVES[name]['root'])):
        _fetch(name, data_dir)
    return _load_disk_split(name, split, data_dir, cub_bbox and name == 'cub')


def subset(split, n, seed):
    """A fixed random subset of n images of a Split (all of it when n is 0 or not smaller than the split)."""
    if not n or n >= len(split.labels):
        return split
    idx = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Split(split.images[idx], split.labels[idx], split.classes)


def spread(split, n):
    """n images of a Split spread evenly over it, first and last included (every class, as splits are in class or
    file order): fixed val images for pictures, val losses and kNN queries."""
    idx = torch.linspace(0, len(split.labels) - 1, min(n, len(split.labels))).long()
    return Split(split.images[idx], split.labels[idx], split.classes)

# -----------------------------------------------------------------------------
# download and safe extraction


def _safe_extract(archive, dest):
    """Extract a zip or tar(.gz) into dest, refusing the whole archive if any member or link would land outside."""
    dest = os.path.realpath(dest)

    def inside(*path):  # path relative to dest
        p = os.path.realpath(os.path.join(dest, *path))
        return p == dest or p.startswith(dest + os.sep)

    def refuse(member, why):
        raise DataError(f"refusing to extract {archive}: member {member!r} {why}; the archive is not trustworthy")
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():  # zipfile writes symlink members as plain files, so only paths matter
                if not inside(info.filename):
                    refuse(info.filename, f'would be written outside {dest}')
            z.extractall(dest)
        return
    try:
        tf = tarfile.open(archive, 'r:*')
    except tarfile.TarError as e:
        raise DataError(f"{archive} is neither a zip nor a tar archive ({e}); delete it and download again") from None
    with tf:
        for m in tf.getmembers():
            if not inside(m.name):
                refuse(m.name, f'would be written outside {dest}')
            if m.issym() and (os.path.isabs(m.linkname) or not inside(os.path.dirname(m.name), m.linkname)):
                refuse(m.name, f'is a link to {m.linkname!r} outside {dest}')
            if m.islnk() and not inside(m.linkname):
                refuse(m.name, f'is a hard link to {m.linkname!r} outside {dest}')
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                refuse(m.name, 'is a device or fifo')
        # Python >= 3.11.4 has the 'data' filter: the stdlib's own checks on top of ours
        tf.extractall(dest, **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))


def download(name, data_dir, url=None, md5=None):
    """Fetch the official archive into data_dir, check its MD5 before extracting, extract atomically."""
    if name not in ARCHIVES:
        raise DataError(f"dataset {name!r} has no download; downloadable: {', '.join(ARCHIVES)}")
    a = ARCHIVES[name]
    url, md5 = url or a['url'], md5 or a['md5']
    root = os.path.join(data_dir, a['root'])
    if os.path.exists(root):
        print(f'{root} already exists, not downloading (delete it to download again)')
        return
    try:
        os.makedirs(data_dir, exist_ok=True)
        fd, archive = tempfile.mkstemp(dir=data_dir, prefix=f".{a['archive']}.", suffix='.part')
    except OSError as e:  # a file where the folder should be, a read-only folder
        raise DataError(f"cannot download into {data_dir} ({e.strerror}): choose a writable --data_dir") from None
    try:
        print(f'downloading {url} ...')
        digest = hashlib.md5()
        with os.fdopen(fd, 'wb') as f:
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as r:
                    while chunk := r.read(1 << 20):
                        digest.update(chunk)
                        f.write(chunk)
            except (OSError, ValueError, http.client.HTTPException) as e:  # no network, timeouts, bad URLs
                raise DataError(f"could not download {url} ({' '.join(str(e).split())}); without network, fetch "
                                f"{a['archive']} by hand and unpack it into {data_dir}/ so that "
                                f"{os.path.join(root, a['marker'])} exists") from None
        if digest.hexdigest() != md5:
            raise DataError(f"checksum mismatch for {url}: expected md5 {md5}, got {digest.hexdigest()}; "
                            f"the download is corrupt or not the official {a['archive']}, try again")
        with tempfile.TemporaryDirectory(dir=data_dir, prefix='.extract_', ignore_cleanup_errors=True) as extract_dir:
            _safe_extract(archive, extract_dir)
            if not os.path.isfile(os.path.join(extract_dir, a['root'], a['marker'])):
                raise DataError(f"{url} does not contain {a['root']}/{a['marker']}; it is not the {name} archive")
            os.replace(os.path.join(extract_dir, a['root']), root)  # appears all at once, never half-extracted
            print(f'{name} is ready in {root}')
    finally:
        os.remove(archive)


_fetch = download  # load_split's `download` flag shadows the function's name

# -----------------------------------------------------------------------------
# normalisation and the device-side pipeline


@functools.lru_cache(maxsize=None)
def _mean_std(device):
    # built once per device, so normalize() never copies from the host; built outside inference mode even when
    # first called inside it, because inference tensors can't be saved for backward (denormalize in a loss)
    with torch.inference_mode(False):
        return tuple(torch.tensor(v, device=device).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))


def normalize(x):
    """uint8 or float in [0, 1] (..., 3, H, W) -> float32 (x - mean) / std, on x's device."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    mean, std = _mean_std(x.device)
    return (x - mean) / std


def denormalize(x):
    """Inverse of normalize: -> float in [0, 1] space (not clamped)."""
    mean, std = _mean_std(x.device)
    return x.float() * std + mean


def _resize(x, size):
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False, antialias=size < x.shape[-1])


def iterate_batches(images_uint8, labels, batch_size, device, img_size=64):
    """In-order batches (last partial one included) for evaluation: yields (normalized x, y) on device."""
    for i in range(0, len(images_uint8), batch_size):
        x = images_uint8[i:i + batch_size].to(device, non_blocking=True).float() / 255
        y = None if labels is None else labels[i:i + batch_size].to(device, non_blocking=True)
        yield normalize(_resize(x, img_size)), y


def _generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


class DeviceLoader:
    """The whole split as one uint8 tensor on the device; shuffled, augmented and normalised there.

    batch_size is the global batch per optimizer step (all ranks and accumulation micro-steps together). Every
    rank draws the same permutation from seed_for(seed, epoch), so the global batch of a step does not depend
    on world_size or accum_steps; each rank takes its strided share of it (see rows()).
    """

    def __init__(self, split_or_images, labels=None, *, batch_size, device, seed=0, rank=0, world_size=1,
                 accum_steps=1, shuffle=True, img_size=64, augment=None):
        images = split_or_images.images if isinstance(split_or_images, Split) else split_or_images
        labels = split_or_images.labels if isinstance(split_or_images, Split) else labels
        if batch_size % (world_size * accum_steps):
            raise DataError(f'batch_size {batch_size} must be divisible by world_size * accum_steps = '
                            f'{world_size} * {accum_steps}; change --batch_size or the accumulation steps')
        self.device = torch.device(device)
        if self.device.type == 'cuda' and self.device.index is None:  # generators and tensors on one device
            self.device = torch.device('cuda', torch.cuda.current_device())
        self.images = images.to(self.device)  # uint8 (N, 3, 64, 64), moved once
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size, self.seed, self.rank, self.accum_steps = batch_size, seed, rank, accum_steps
        self.micro_batch = batch_size // (world_size * accum_steps)
        self.shuffle, self.img_size, self.augment = shuffle, img_size, augment
        self.steps_per_epoch = len(self.images) // batch_size  # drop_last
        if self.steps_per_epoch == 0:
            raise DataError(f'the dataset has {len(self.images)} images, fewer than one global batch of '
                            f'{batch_size}; lower --batch_size')
        self._rows = torch.arange(rank, batch_size, world_size, device=self.device)  # this rank's positions

    def rows(self, micro):
        """Positions inside the global batch held by this rank's micro-batch `micro`."""
        return self._rows[micro * self.micro_batch:(micro + 1) * self.micro_batch]

    def epoch(self, epoch, start_step=0):
        """Yields (step, [(x, y)] * accum_steps) for step in range(start_step, steps_per_epoch)."""
        n, B = len(self.images), self.batch_size
        perm = (torch.randperm(n, generator=_generator(self.device, seed_for(self.seed, epoch)), device=self.device)
                if self.shuffle else torch.arange(n, device=self.device))
        for step in range(start_step, self.steps_per_epoch):
            batch = perm[step * B:(step + 1) * B]  # the global batch, identical on every rank
            micro_batches = []
            for micro in range(self.accum_steps):
                idx = batch[self.rows(micro)]
                x = _resize(self.images[idx].float() / 255, self.img_size)  # (mb, 3, img_size, img_size) in [0, 1]
                if self.augment is not None:
                    x = self.augment(x, _generator(self.device, seed_for(self.seed, epoch, step, self.rank, micro)))
                micro_batches.append((normalize(x), self.labels[idx]))
            yield step, micro_batches

# -----------------------------------------------------------------------------
# augmentations: float (N, 3, H, W) in [0, 1] -> same, per sample, batched, on x's device


def _rand(shape, x, generator):
    return torch.rand(shape, generator=generator, device=x.device)


@functools.lru_cache(maxsize=None)
def _const(device, values, dtype=torch.float32):
    """A constant tensor made once per device: building it at each call would copy host to device, which syncs."""
    return torch.tensor(values, dtype=dtype, device=device)


def _warp(x, theta, padding_mode, mode='bilinear', size=None):
    """Per-sample affine warp to size x size (default: x's size); theta (N, 2, 3) maps output to input coordinates
    in [-1, 1]."""
    N, C, H, W = x.shape
    grid = F.affine_grid(theta, [N, C, size or H, size or W], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


RRC_TRIES = 10  # RandomResizedCrop's attempts before it falls back to the whole image


def random_resized_crop(x, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), generator=None, hflip=0.0, u=None, size=None,
                        mode='bilinear'):
    """torchvision's RandomResizedCrop drawn per sample (RRC_TRIES tries, else the whole image), resampled (`mode`) to
    size x size (default: x's size), then mirrored with probability hflip (within the same resampling: one rand call
    and one grid_sample). u: the per-sample uniforms (N, 2 * RRC_TRIES + 3) when the caller draws them (dino.py).
    Unlike torchvision, crop size and position are continuous rather than whole pixels."""
    N, _, H, W = x.shape
    tries = RRC_TRIES
    # per sample: tries areas, tries ratios, centre x, y, flip
    u = _rand((N, 2 * tries + 3), x, generator) if u is None else u
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[:, :tries])  # (N, tries) in pixels
    r = (math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, tries:2 * tries]).exp()
    w, h = (area * r).sqrt(), (area / r).sqrt()
    ok = (w <= W) & (h <= H)
    first = ok.byte().argmax(1, keepdim=True)  # index of the first try that fits
    fits = ok.any(1)
    sw = torch.where(fits, w.gather(1, first)[:, 0] / W, 1.0)  # crop size as a fraction of the image, (N,)
    sh = torch.where(fits, h.gather(1, first)[:, 0] / H, 1.0)
    pos = 2 * u[:, 2 * tries:] - 1  # (N, 3) in [-1, 1]
    tx, ty = (1 - sw) * pos[:, 0], (1 - sh) * pos[:, 1]  # crop centre, anywhere that keeps the crop inside
    sx = torch.where(pos[:, 2] < 2 * hflip - 1, -sw, sw)  # mirroring = negating the x scale
    zero = torch.zeros_like(sw)
    theta = torch.stack([sx, zero, tx, zero, sh, ty], 1).view(N, 2, 3)  # (N, 6) -> (N, 2, 3)
    return _warp(x, theta, 'border', mode=mode, size=size)


LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma weights of R, G, B, as torchvision's rgb_to_grayscale


def _gray(x):  # (N, 1, H, W)
    return (x * _const(x.device, LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)


def _smooth_delta(x):
    """PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13) minus x; 0 on the border, which PIL leaves alone."""
    return F.pad((F.avg_pool2d(x, 3, stride=1) - x[..., 1:-1, 1:-1]) * (9 / 13), (1, 1, 1, 1))

# The level ops (equalize, autocontrast, posterize, solarize) are per-channel look-up tables on 256 levels, as in
# PIL (the usual input of torchvision's RandAugment), so that a batch applies whichever each sample drew in one gather.


def _levels(x):  # float (N, C, H, W) in [0, 1] -> int64 (N, C, H*W) on 256 levels, as a uint8 image
    return (x * 255).round().long().flatten(2)


def _apply_lut(lut, q, shape):  # lut (N, C or 1, 256), q (N, C, H*W) levels -> float `shape` (N, C, H, W)
    return lut.expand(*q.shape[:2], 256).gather(2, q).view(shape).float() / 255


def _equalize_lut(q, hi):
    """PIL's / torchvision's histogram equalisation of levels q (N, C, H*W) with maximum hi (N, C, 1) -> (N, C, 256)."""
    hist = torch.zeros(*q.shape[:2], 256, dtype=torch.long, device=q.device).scatter_add_(2, q, torch.ones_like(q))
    step = (q.shape[2] - hist.gather(2, hi)) // 255  # pixels below the highest level in use, per output level
    lut = ((hist.cumsum(2) - hist + step // 2) // step.clamp(min=1)).clamp(max=255)
    return torch.where(step > 0, lut, torch.arange(256, device=q.device))  # step 0: nothing to equalise


def _autocontrast_lut(lo, hi):
    """PIL's autocontrast (cutoff 0): each channel's range [lo, hi] (N, C, 1) stretched to [0, 255] -> (N, C, 256)."""
    levels = torch.arange(256, device=lo.device)
    lut = ((levels - lo) * 255 // (hi - lo).clamp(min=1)).clamp(0, 255)  # exact integers, truncated like PIL
    return torch.where(hi > lo, lut, levels)  # constant channels stay as they are


RA_OPS = ('identity', 'autocontrast', 'equalize', 'rotate', 'solarize', 'color', 'posterize', 'contrast',
          'brightness', 'sharpness', 'shear_x', 'shear_y', 'translate_x', 'translate_y')
_RA_KIND = {'posterize': 1, 'solarize': 1, 'equalize': 2, 'autocontrast': 3}  # else 0: blend formula (or x)


def _ra_theta(name, s, m, H, W):
    """Affine map (output -> input, normalised coords, row-major 2x3) of a geometric op, the identity otherwise.
    Shears are about the top-left corner as in torchvision, translations whole pixels."""
    a = math.radians(30 * m) * s if name == 'rotate' else 0.0
    sx, sy = (0.3 * m * s if name == n else 0.0 for n in ('shear_x', 'shear_y'))
    tx = -2 * int(150 / 331 * W * m) / W * s if name == 'translate_x' else 0.0  # content moves by +s pixels
    ty = -2 * int(150 / 331 * H * m) / H * s if name == 'translate_y' else 0.0
    cos, sin = math.cos(a), math.sin(a)
    return (cos, (sx - sin) * H / W, sx * H / W + tx, (sin + sy) * W / H, cos, sy * W / H + ty)


def _ra_blend(name, s, m):
    """(a, w_gray, w_mean, w_smooth) of clamp(a x + w_gray gray + w_mean mean(gray) + w_smooth smooth_delta):
    torchvision's blend f x + (1 - f) other with other gray, mean gray, black or smoothed x; x for the other ops."""
    f = 1 + 0.9 * m * s
    return {'color': (f, 1 - f, 0, 0), 'contrast': (f, 0, 1 - f, 0), 'brightness': (f, 0, 0, 0),
            'sharpness': (1, 0, 0, 1 - f)}.get(name, (1, 0, 0, 0))


def _ra_lut(name, m, magnitude, num_bins):
    """Posterize's and solarize's fixed look-up table on 256 levels, the identity for the other ops."""
    step = 2 ** int(round(magnitude / ((num_bins - 1) / 4)))  # posterize: keep 8 - log2(step) bits
    if name == 'posterize':
        return tuple(v // step * step for v in range(256))
    if name == 'solarize':
        return tuple(255 - v if v >= 255 * (1 - m) else v for v in range(256))
    return tuple(range(256))


@functools.lru_cache(maxsize=None)
def _ra_tables(device, ops, H, W, magnitude, num_bins):
    """RandAugment's ops at one magnitude as table rows, row 2 * i + (sign < 0) for ops[i], so that a batch looks
    up its draws in one index op; made once per device and shape.
    -> params (2 * len(ops), 11) float: theta (6), blend (4), kind; luts (2 * len(ops), 256) int64"""
    m = magnitude / (num_bins - 1)  # fraction of each op's maximum
    rows = [(name, s) for name in ops for s in (1, -1)]
    params = [_ra_theta(n, s, m, H, W) + _ra_blend(n, s, m) + (_RA_KIND.get(n, 0),) for n, s in rows]
    luts = [_ra_lut(n, m, magnitude, num_bins) for n, _ in rows]
    return torch.tensor(params, dtype=torch.float32, device=device), torch.tensor(luts, device=device)


def _ra_colour(x, p, lut):
    """Each sample's colour op of one RandAugment round, from its table rows p (N, 5) and lut (N, 256). Every
    formula runs on the whole batch (no host sync, a fixed number of kernels); each sample keeps its own."""
    N = len(x)
    a, w_gray, w_mean, w_smooth, kind = p.reshape(N, 5, 1, 1, 1).unbind(1)  # each (N, 1, 1, 1)
    gray = _gray(x)
    blend = torch.addcmul(a * x, w_gray, gray)
    blend = torch.addcmul(blend, w_mean, gray.mean((2, 3), keepdim=True))
    blend = torch.addcmul(blend, w_smooth, _smooth_delta(x)).clamp(0, 1)
    q = _levels(x)  # (N, C, H*W)
    lo, hi = q.aminmax(dim=2, keepdim=True)  # (N, C, 1) each
    kind = kind.view(N, 1, 1)  # _RA_KIND: 2 equalize, 3 autocontrast, 1 the row's own lut, 0 the blend
    lut = torch.where(kind == 2, _equalize_lut(q, hi), lut.view(N, 1, 256))  # (N, C, 256)
    lut = torch.where(kind == 3, _autocontrast_lut(lo, hi), lut)
    return torch.where(kind.view(N, 1, 1, 1) > 0, _apply_lut(lut, q, x.shape), blend)


def rand_augment(x, num_ops=2, magnitude=9, generator=None, num_bins=31, ops=RA_OPS):
    """torchvision's RandAugment (14 ops, magnitudes on num_bins bins, nearest resampling, black fill), but each
    sample draws its own ops and signs (from `ops`). At magnitude 9 of 31: rotate 9 deg, shear 0.09, translate 8 px
    at 64, colour factors 1 +- 0.27, posterize to 7 bits, solarize above 0.7. Whatever the batch and the draws, a
    round costs the same few kernels: one table look-up, one grid_sample, one blend and one look-up table gather."""
    N, _, H, W = x.shape
    params, luts = _ra_tables(x.device, tuple(ops), H, W, magnitude, num_bins)
    rows = (_rand((num_ops, N), x, generator) * len(params)).long()  # (num_ops, N) table row of each round
    for r in rows:
        p = params[r]  # (N, 11)
        x = _warp(x, p[:, :6].view(N, 2, 3), 'zeros', mode='nearest')  # (N, 6) -> (N, 2, 3)
        x = _ra_colour(x, p[:, 6:], luts[r])
    return x


def pretrain_augment(x, generator=None):
    return random_resized_crop(x, (0.2, 1.0), generator=generator, hflip=0.5)


def finetune_augment(x, generator=None):
    x = random_resized_crop(x, (0.08, 1.0), generator=generator, hflip=0.5)
    return rand_augment(x, 2, 9, generator=generator)


def _mix_draw(seed, H, W, mixup_alpha, cutmix_alpha, switch_prob):
    """timm's per-batch draws, on the host from np.random.default_rng(seed): the mixup-or-cutmix switch, lambda
    ~ Beta(alpha, alpha) and the cutmix box. -> (lam, box): box (y0, y1, x0, x1) for cutmix, None for mixup."""
    rng = np.random.default_rng(seed)
    use_cutmix = rng.random() < switch_prob if mixup_alpha > 0 and cutmix_alpha > 0 else cutmix_alpha > 0
    if not use_cutmix:
        return (float(rng.beta(mixup_alpha, mixup_alpha)) if mixup_alpha > 0 else 1.0), None
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
    # box with sides sqrt(1 - lam) of the image around a random centre, clipped at the border (timm's rand_bbox)
    cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
    cy, cx = int(rng.integers(H)), int(rng.integers(W))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
    return 1 - (y1 - y0) * (x1 - x0) / (H * W), (y0, y1, x0, x1)  # lambda corrected for the clipped box


def mixup_cutmix(x, y, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.0,
                 seed=0):
    """timm-style batch Mixup/CutMix: one lambda per batch, sample i mixed with sample N-1-i, label smoothing
    folded into the soft targets. The draws are host floats from `seed` (as in timm), so this costs a handful of
    device ops and no host sync. -> (x_mixed, soft targets (N, num_classes))"""
    lam, box = _mix_draw(seed, x.shape[2], x.shape[3], mixup_alpha, cutmix_alpha, switch_prob)
    x_flip = x.flip(0)
    if box is None:
        x = torch.lerp(x_flip, x, lam)  # lam * x + (1 - lam) * x_flip, exactly x at lam 1
    else:
        y0, y1, x0, x1 = box
        x = x.clone()
        x[..., y0:y1, x0:x1] = x_flip[..., y0:y1, x0:x1]
    off = label_smoothing / num_classes
    t = torch.full((len(y), num_classes), off, device=x.device).scatter_(1, y.view(-1, 1), 1 - label_smoothing + off)
    return x, torch.lerp(t.flip(0), t, lam)

# -----------------------------------------------------------------------------
# command line: python data.py download tin --data_dir data   (loader speed: bench.py --only loader)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='fetch and unpack an official archive (MD5-checked, atomic)')
    parser.add_argument('command', choices=['download'])
    parser.add_argument('name', choices=sorted(ARCHIVES))
    parser.add_argument('--data_dir', default='data')
    args = parser.parse_args()
    try:
        download(args.name, args.data_dir)
    except DataError as e:
        sys.exit(f'data.py: error: {e}')
