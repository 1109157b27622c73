"""
Datasets and the on-device data pipeline.

Every split is decoded once into a uint8 tensor (N, 3, 64, 64) plus int64 labels and cached next to the data.
Training then keeps the whole split on the device and does shuffling, resizing, augmentation and normalisation
there, with per-(seed, epoch, step) generators so that any step can be reproduced without stored RNG state.

    python data.py download tin --data_dir data
"""
import argparse
import contextlib
import errno
import functools
import hashlib
import http.client
import math
import os
import re
import socket
import stat
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATASETS = ('tin', 'cub', 'demo', 'synthetic')
IMG = 64                # every split is stored at 64x64
CACHE_VERSION = 2       # bump when the decoding changes, so that old caches are rebuilt (2: 16-bit PNGs)
DOWNLOAD_TIMEOUT = 15   # seconds without an answer before a download gives up
PROGRESS_EVERY = 10     # seconds between progress lines while a split decodes (by the clock)
RATE_SMOOTHING = 0.3    # weight of the latest interval in the progress lines' averaged images/s and ETA
STALE_TEMP_S = 3600     # a cache temp file of another machine untouched this long was left by a killed run

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
#
# A damaged dataset is an error (DataError: one line naming the file and the line; the scripts exit with 2 and write
# nothing) whenever the annotation files contradict themselves or cannot be read: a repeated image id, val file
# name, wnid, class id or class name; an image id in one CUB file and not another; an id or label that is not a
# number or not a class; a split flag other than 0/1; a box that is not four numbers with an area; a row with too
# few fields; a val row whose wnid is not in wnids.txt; a text file that is empty or not UTF-8; a class without a
# train image; and every listed image that is missing, unreadable or not a regular file (all named at once). Labels
# that contradict themselves would make every figure of a week-long run meaningless, and each is fixed in minutes
# once named. Warnings with a count (the run goes on): classes with no val image (the val figures still hold for the
# classes present, and a trimmed val split may be deliberate), and a cache that cannot be written (a read-only folder
# or a full disk: the decoded split is in memory and correct, the cache only spares the next run the decoding).

FILE_KINDS = {stat.S_IFDIR: 'a directory', stat.S_IFIFO: 'a named pipe (fifo)', stat.S_IFCHR: 'a character device',
              stat.S_IFBLK: 'a block device', stat.S_IFSOCK: 'a socket'}
SIXTEEN_BIT = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')  # 16-bit grayscale as PIL opens it (PNG; Pillow < 10: 'I')
_TEMP = re.compile(r'cache_(?:train|val)(?:_bbox)?\.pt\.tmp\.(?:(?P<host>.+)\.)?(?P<pid>\d{1,7})')  # see _temp_name


def _missing(name, data_dir, what):
    a = ARCHIVES[name]
    return DataError(f"{name}: {what}; pass --download true or unpack {a['archive']} into {data_dir}/ so that "
                     f"{os.path.join(data_dir, a['root'], a['marker'])} exists")


def _damaged(path, line, what):
    """A damaged annotation file or folder: where (the file and line), what is wrong, and how to fix it."""
    where = f"{path} line {line}" if line else path
    return DataError(f"{where}: {what}; the dataset is damaged: correct it, or delete the dataset folder and pass "
                     f"--download true (or unpack the official archive again)")


def _warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _kind(path):
    """What path is when it is not a regular file ('a directory', 'a named pipe (fifo)', ...), else None. From stat
    alone: opening a fifo for reading blocks until a writer comes, which may be never."""
    mode = os.stat(path).st_mode
    return None if stat.S_ISREG(mode) else FILE_KINDS.get(stat.S_IFMT(mode), 'not a regular file')


def _read_rows(name, data_dir, root, rel, columns):
    """[(line number, fields)] of the non-blank lines of an annotation file, each with at least `columns`
    whitespace-separated fields; the file must be UTF-8 text and not empty."""
    path = os.path.join(root, rel)
    if not os.path.exists(path):
        raise _missing(name, data_dir, f"missing annotation file {path}")
    if kind := _kind(path):
        raise _damaged(path, None, f"this is {kind}, not a text file")
    try:
        with open(path, 'rb') as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}): check its permissions") from None
    try:
        text = raw.decode('utf-8').removeprefix('\ufeff')  # the byte-order mark some editors write
    except UnicodeDecodeError as e:
        raise _damaged(path, raw.count(b'\n', 0, e.start) + 1,
                       f"byte {e.start} (0x{raw[e.start]:02x}) is not UTF-8 text") from None
    rows = [(k, line.split()) for k, line in enumerate(text.split('\n'), 1) if line.strip()]
    if not rows:
        raise _damaged(path, None, "the file is empty")
    for k, fields in rows:
        if len(fields) < columns:
            raise _damaged(path, k, f"has fewer than {columns} fields")
    return rows


def _utf8(name):
    """Whether a file name read from the disk is UTF-8 text (Python keeps other bytes as lone surrogates)."""
    try:
        name.encode('utf-8')
        return True
    except UnicodeEncodeError:
        return False


def _bad_files(root, bad, what):
    shown = ', '.join(bad[:20]) + (f' and {len(bad) - 20} more' if len(bad) > 20 else '')
    return DataError(f"{len(bad)} {what} image file(s) under {root}: {shown}; replace them "
                     f"(or delete {root} and pass --download true) and try again")


def _warn_empty_classes(root, split, classes, labels):
    """Classes without an image in a val split: a warning, since the val figures still hold for the others."""
    empty = sorted(set(range(len(classes))) - set(labels))
    if empty:
        shown = ', '.join(classes[c] for c in empty[:5]) + (', ...' if len(empty) > 5 else '')
        _warn(f"{len(empty)} of {len(classes)} classes have no {split} image under {root} ({shown}): the {split} "
              f"figures cover the other {len(classes) - len(empty)}")


def _list_tin(data_dir, root, split):
    """-> (relative image paths, labels, classes, annotation files, no boxes). Label = index in wnids.txt."""
    line_of = {}  # wnid -> its line in wnids.txt
    for line, (wnid, *_) in _read_rows('tin', data_dir, root, 'wnids.txt', 1):
        if wnid in line_of:
            raise _damaged(os.path.join(root, 'wnids.txt'), line, f"wnid {wnid} repeats line {line_of[wnid]}")
        line_of[wnid] = line
    wnids = list(line_of)
    files, labels = [], []
    if split == 'train':
        for i, w in enumerate(wnids):
            d = os.path.join(root, 'train', w, 'images')
            if not os.path.isdir(d):
                raise _missing('tin', data_dir, f"missing image folder {d}")
            try:
                names = sorted(e.name for e in os.scandir(d) if e.name.lower().endswith(('.jpeg', '.jpg', '.png')))
            except OSError as e:
                raise DataError(f"cannot read {d} ({e.strerror}): check its permissions") from None
            odd = [n for n in names if not _utf8(n)]
            if odd:  # (an image's name goes into the cache's signature, and into messages, as UTF-8)
                raise _damaged(d, None, f"the file name {odd[0].encode(errors='surrogateescape')!r} is not UTF-8 text "
                                        f"({len(odd)} such name(s)): rename it")
            if not names:  # a class the model could never learn: a copy cut short, not a choice
                raise _damaged(d, None, f"no images, though {os.path.join(root, 'wnids.txt')} line {line_of[w]} "
                                        f"lists class {w}")
            files += [f'train/{w}/images/{n}' for n in names]
            labels += [i] * len(names)
        return files, labels, wnids, ['wnids.txt'], None
    ann = 'val/val_annotations.txt'
    index, rows = {w: i for i, w in enumerate(wnids)}, {}  # rows: file name -> (line, label)
    for line, (name, wnid, *_) in _read_rows('tin', data_dir, root, ann, 2):
        if name in rows:
            raise _damaged(os.path.join(root, ann), line, f"image {name} repeats line {rows[name][0]}")
        if wnid not in index:
            raise _damaged(os.path.join(root, ann), line, f"wnid {wnid} is not in wnids.txt")
        rows[name] = line, index[wnid]
    names = sorted(rows)  # file order, whatever the order on disk
    labels = [rows[n][1] for n in names]
    _warn_empty_classes(root, split, wnids, labels)
    return [f'val/images/{n}' for n in names], labels, wnids, ['wnids.txt', ann], None


def _by_id(data_dir, root, rel, columns, parse):
    """{image id: (line number, parse(path, line, the fields after the id))} of a CUB file with a row per image."""
    path, rows = os.path.join(root, rel), {}
    for line, (image_id, *fields) in _read_rows('cub', data_dir, root, rel, columns):
        if not image_id.isdecimal():
            raise _damaged(path, line, f"the image id {image_id!r} is not a number")
        i = int(image_id)
        if i in rows:
            raise _damaged(path, line, f"image id {i} repeats line {rows[i][0]}")
        rows[i] = line, parse(path, line, fields)
    return rows


def _same_ids(root, images, rel, rows):
    """The CUB file rel has a row for every image id of images.txt, and for no other."""
    extra = [i for i in rows if i not in images]
    if extra:
        raise _damaged(os.path.join(root, rel), rows[extra[0]][0],
                       f"image id {extra[0]} is not in images.txt ({len(extra)} such id(s))")
    missing = [i for i in images if i not in rows]
    if missing:
        raise _damaged(os.path.join(root, rel), None, f"no row for image id {missing[0]} of images.txt line "
                                                      f"{images[missing[0]][0]} ({len(missing)} id(s) missing)")


def _class_id(path, line, fields):  # image_class_labels.txt: 1-based class id -> 0-based label
    if not fields[0].isdecimal() or int(fields[0]) < 1:
        raise _damaged(path, line, f"the class id {fields[0]!r} is not a number >= 1")
    return int(fields[0]) - 1


def _split_flag(path, line, fields):  # train_test_split.txt: 1 train, 0 test
    if fields[0] not in ('0', '1'):
        raise _damaged(path, line, f"the split flag {fields[0]!r} is neither 1 (train) nor 0 (test)")
    return fields[0] == '1'


def _box(path, line, fields):  # bounding_boxes.txt: x y w h in pixels
    try:
        x, y, w, h = map(float, fields[:4])
    except ValueError:
        x = y = w = h = math.nan
    if not (math.isfinite(x + y + w + h) and w > 0 and h > 0):
        raise _damaged(path, line, f"the box {' '.join(fields[:4])!r} is not four numbers x y w h with w, h > 0")
    return x, y, w, h


def _cub_classes(data_dir, root, images, labels):
    """Class names, index = label: from classes.txt (ids 1..K, each once) or else from the image folders. Every
    label must be a class and every class must have an image."""
    path, labels_path = os.path.join(root, 'classes.txt'), os.path.join(root, 'image_class_labels.txt')
    if os.path.exists(path):
        rows = _read_rows('cub', data_dir, root, 'classes.txt', 2)
        by_id, line_of_name = {}, {}  # class id -> (line, name); name -> line
        for line, (c, name, *_) in rows:
            if not c.isdecimal() or not 1 <= int(c) <= len(rows):
                raise _damaged(path, line, f"the class id {c!r} is not a number in 1..{len(rows)} (the file lists "
                                           f"{len(rows)} classes)")
            if int(c) in by_id:
                raise _damaged(path, line, f"class id {c} repeats line {by_id[int(c)][0]}")
            if name in line_of_name:
                raise _damaged(path, line, f"class {name} repeats line {line_of_name[name]}")
            by_id[int(c)], line_of_name[name] = (line, name), line
        classes = [by_id[c][1] for c in range(1, len(rows) + 1)]
        outside = [(line, label) for line, label in labels.values() if label >= len(classes)]
        if outside:
            raise _damaged(labels_path, outside[0][0], f"class id {outside[0][1] + 1} is not in classes.txt (ids "
                                                       f"1..{len(classes)}; {len(outside)} such row(s))")
    else:  # the class folder of each label's images, so that train and val agree
        folder = {label: images[i][1].split('/')[1] for i, (_, label) in labels.items()}
        classes = [folder.get(c) for c in range(max(folder) + 1)]
    empty = sorted(set(range(len(classes))) - {label for _, label in labels.values()})
    if empty and os.path.exists(path):
        raise _damaged(path, by_id[empty[0] + 1][0], f"class {empty[0] + 1} ({classes[empty[0]]}) has no image in "
                                                     f"image_class_labels.txt ({len(empty)} such class(es))")
    if empty:
        raise _damaged(labels_path, None, f"no image has class id {empty[0] + 1}, though the ids run to "
                                          f"{len(classes)} ({len(empty)} such id(s))")
    # each image lies in its class's folder (images/<class name>/...): a label that contradicts it is a wrong row
    for i, (line, label) in sorted(labels.items(), key=lambda kv: kv[1][0]):
        where = images[i][1].split('/')
        if len(where) > 2 and classes[label] is not None and where[1] != classes[label]:
            raise _damaged(labels_path, line, f"image id {i} has class {label + 1} ({classes[label]}), but images.txt "
                                              f"line {images[i][0]} puts it in the folder {where[1]}")
    return classes


def _list_cub(data_dir, root, split, bbox):
    """-> (paths, labels, classes, annotation files, boxes or None). 'val' is the official test split."""
    annotations = ['images.txt', 'image_class_labels.txt', 'train_test_split.txt']
    images = _by_id(data_dir, root, 'images.txt', 2, lambda path, line, fields: 'images/' + fields[0])
    line_of = {}  # image path -> its line in images.txt: one image under two ids would count twice, maybe as two classes
    for line, rel in sorted(images.values()):
        if rel in line_of:
            raise _damaged(os.path.join(root, 'images.txt'), line, f"{rel[7:]} repeats line {line_of[rel]}")
        line_of[rel] = line
    labels = _by_id(data_dir, root, 'image_class_labels.txt', 2, _class_id)
    is_train = _by_id(data_dir, root, 'train_test_split.txt', 2, _split_flag)
    boxes = _by_id(data_dir, root, 'bounding_boxes.txt', 5, _box) if bbox else None  # (x, y, w, h) per image
    for rel, rows in (('image_class_labels.txt', labels), ('train_test_split.txt', is_train),
                      ('bounding_boxes.txt', boxes)):
        if rows is not None:
            _same_ids(root, images, rel, rows)
    classes = _cub_classes(data_dir, root, images, labels)
    ids = sorted(i for i in images if is_train[i][1] == (split == 'train'))
    split_labels = [labels[i][1] for i in ids]
    if split == 'train':
        empty = sorted(set(range(len(classes))) - set(split_labels))
        if empty:  # a class the model could never learn
            raise _damaged(os.path.join(root, 'train_test_split.txt'), None,
                           f"no image of class {empty[0] + 1} ({classes[empty[0]]}) is in the train split (flag 1) "
                           f"({len(empty)} such class(es))")
    else:
        _warn_empty_classes(root, split, classes, split_labels)
    if bbox:
        annotations.append('bounding_boxes.txt')
    return ([images[i][1] for i in ids], split_labels, classes, annotations,
            None if boxes is None else [boxes[i][1] for i in ids])


def _decode_image(path, box=None):
    """One image -> uint8 (64, 64, 3): RGB, optional (x, y, w, h) box crop, short side to 64, centre crop.
    This is torchvision's Resize(64) + CenterCrop(64) on PIL images, as the paper's code did."""
    if kind := _kind(path):  # refused before opening: a fifo would block the open, a device may act on it
        raise DataError(f"{kind}, not an image file")
    # O_NONBLOCK: a fifo put there after the check still cannot block the open
    with open(path, 'rb', opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f, Image.open(f) as im:
        if im.mode in SIXTEEN_BIT:  # convert('RGB') clips these at 255 (a white image): scale 0..65535 to 0..255
            im = Image.fromarray((np.asarray(im, np.float32) / 257).round().clip(0, 255).astype(np.uint8))
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


def _fmt_duration(seconds):
    s = int(max(0, seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Progress:
    """Progress lines '  what: done/total (rate/s, eta ...)'. The rate is an exponential average over the intervals
    between lines (RATE_SMOOTHING), so that it and the ETA move smoothly where one interval's rate would swing."""

    def __init__(self, what, total, now):
        self.what, self.total, self.last, self.rate = what, total, (now, 0), None

    def line(self, done, now):
        rate = (done - self.last[1]) / max(now - self.last[0], 1e-9)
        self.rate = rate if self.rate is None else RATE_SMOOTHING * rate + (1 - RATE_SMOOTHING) * self.rate
        self.last = now, done
        eta = _fmt_duration((self.total - done) / self.rate) if self.rate > 0 else '?'
        return f"  {self.what}: {done:,}/{self.total:,} ({self.rate:,.0f} images/s, eta {eta})"


@contextlib.contextmanager
def _ticking(what):
    """While the block runs, a line '  what (N s)' every PROGRESS_EVERY seconds from a timer thread: the phases
    around the decoding (checking 100k files, reading or writing a 1.2 GB cache) can take that long on a slow disk."""
    t0, stop = time.perf_counter(), threading.Event()

    def tick():
        while not stop.wait(PROGRESS_EVERY):
            print(f"  {what} ({time.perf_counter() - t0:.0f} s)", flush=True)
    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _decode_all(root, files, boxes, what):
    """Decode every file with a thread pool (PIL releases the GIL while decoding); DataError lists all bad files.
    The main thread prints a progress line every PROGRESS_EVERY seconds by the clock, whatever the workers do."""
    out = np.empty((len(files), IMG, IMG, 3), np.uint8)
    chunks = [range(i, min(i + 256, len(files))) for i in range(0, len(files), 256)]
    done = [0] * len(chunks)  # images finished per chunk, each entry written by its one worker
    stop = threading.Event()  # set when the main thread gives up (Ctrl-C): workers end after their current image

    def work(k):
        bad = []
        for i in chunks[k]:
            if stop.is_set():
                break
            try:
                out[i] = _decode_image(os.path.join(root, files[i]), None if boxes is None else boxes[i])
            except Exception as e:
                why = e if isinstance(e, DataError) else f"{type(e).__name__}: {' '.join(str(e).split())}"
                bad.append(f"{files[i]} ({why})")
            done[k] += 1
        return bad
    t0 = time.perf_counter()
    progress = _Progress(f'decoding {what}', len(files), t0)
    pool = ThreadPoolExecutor(os.cpu_count() or 1)
    try:
        futures = [pool.submit(work, k) for k in range(len(chunks))]
        while wait(futures, timeout=PROGRESS_EVERY).not_done:  # a timer: a slow file cannot hold a line back
            print(progress.line(sum(done), time.perf_counter()), flush=True)
        bad = [b for f in futures for b in f.result()]
    finally:
        stop.set()
        pool.shutdown(cancel_futures=True)
    if bad:
        raise _bad_files(root, bad, 'unreadable')
    print(f"  decoded {len(files):,} {what} images in {_fmt_duration(time.perf_counter() - t0)}", flush=True)
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


def _temp_name(cache):
    """The temporary file a cache is written to before the rename: this machine's name and this process's id tell
    a killed run's leftover from a live writer's file (_remove_stale_temps)."""
    return f"{cache}.tmp.{socket.gethostname()}.{os.getpid()}"


def _alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _remove_stale_temps(root):
    """Delete the cache temp files a killed run left in root: only names _temp_name makes (or older versions of
    data.py made: no machine name), of this machine whose process is gone (or has this process's id, which a
    container gives again after a restart), or of any machine untouched for STALE_TEMP_S. A live writer's stays."""
    host, removed = socket.gethostname(), []
    with os.scandir(root) as entries:
        for e in entries:
            m = _TEMP.fullmatch(e.name)
            if not m or not e.is_file(follow_symlinks=False):
                continue
            pid = int(m['pid'])
            with contextlib.suppress(OSError):  # gone meanwhile, or a read-only folder
                st = e.stat(follow_symlinks=False)
                if ((m['host'] == host and (pid == os.getpid() or not _alive(pid)))
                        or time.time() - st.st_mtime > STALE_TEMP_S):
                    os.remove(e.path)
                    removed.append((e.name, st.st_size))
    if removed:
        print(f"removed {len(removed)} cache temp file(s) that killed runs left in {root} "
              f"({sum(s for _, s in removed) / 2**20:,.0f} MB): {', '.join(n for n, _ in removed)}", flush=True)


class _RecordedWrites:
    """The temp file as torch.save sees it, keeping the first OSError of a write: torch may report a failed write
    (a full disk) as an unrelated RuntimeError of its own."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        self.f.flush()


def _cache_warning(cache, error, n):
    """One line: the cache could not be written (read-only folder, full disk), what that costs and the fix."""
    fix = (f"make {os.path.dirname(cache)} writable, or copy the dataset to a writable --data_dir"
           if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else
           f"free about {max(1, round(n * 3 * IMG * IMG / 2**20)):,} MB on its disk (or use a --data_dir on another)")
    kept = ' (the previous, out-of-date cache is left as it was)' if os.path.exists(cache) else ''
    _warn(f"could not write the cache {cache} ({error.strerror}){kept}; this run goes on from memory, but every run "
          f"will decode these {n:,} images again until you {fix}")


def require(name, data_dir):
    """A one-line DataError unless dataset `name` is on disk (or needs none): for a caller that starts processes
    which would each fail on it."""
    root = os.path.join(data_dir, ARCHIVES[name]['root']) if name in ARCHIVES else None
    if root and not os.path.isdir(root):
        raise _missing(name, data_dir, f"dataset folder {root} not found")


def _load_disk_split(name, split, data_dir, bbox):
    root = os.path.join(data_dir, ARCHIVES[name]['root'])
    require(name, data_dir)
    with _ticking(f'listing and checking the {name}/{split} files'):
        listing = _list_tin(data_dir, root, split) if name == 'tin' else _list_cub(data_dir, root, split, bbox)
        files, labels, classes, annotations, boxes = listing
        if not files:
            raise _missing(name, data_dir, f"no {split} images listed under {root}")
        signature = _signature(root, annotations + files, f'{name}|{split}|{boxes is not None}')
    cache = os.path.join(root, f"cache_{split}{'_bbox' if boxes is not None else ''}.pt")
    _remove_stale_temps(root)
    if os.path.lexists(cache) and not os.path.isfile(cache):  # never read (a fifo blocks) nor replaced
        what = _kind(cache) if os.path.exists(cache) else 'a broken link'
        raise DataError(f"{cache} is {what} where data.py keeps its cache of the {split} split: move it away and try "
                        f"again")
    if os.path.isfile(cache):
        try:
            with _ticking(f'reading {cache}'):
                c = torch.load(cache, map_location='cpu', weights_only=True)
            if c['version'] == CACHE_VERSION and c['signature'] == signature:
                return Split(c['images'], c['labels'], list(c['classes']))
            print(f'{cache} is out of date, rebuilding it')
        except Exception as e:  # truncated or foreign file: rebuild rather than crash
            print(f'{cache} could not be read ({type(e).__name__}), rebuilding it')
    tmp = _temp_name(cache)
    try:  # opened before decoding, so that a folder that cannot hold the cache is known at once
        tmp_file = open(tmp, 'wb')
    except OSError as e:  # a read-only dataset folder: go on without the cache, which only saves time
        tmp_file = None
        _cache_warning(cache, e, len(files))
    try:
        print(f"decoding {len(files):,} {name}/{split} images" + (f" into {cache} (once)" if tmp_file else ""),
              flush=True)
        out = Split(_decode_all(root, files, boxes, f'{name}/{split}'), torch.tensor(labels, dtype=torch.int64),
                    list(classes))
        if tmp_file is not None:  # written whole, then renamed: never a half-written cache
            writes = _RecordedWrites(tmp_file)
            try:
                with _ticking(f'writing {cache}'):
                    torch.save(dict(version=CACHE_VERSION, signature=signature, **vars(out)), writes)  # + images, ...
                    tmp_file.close()
                os.replace(tmp, cache)
            except (OSError, RuntimeError) as e:  # a full disk: the split in memory is whole, keep going
                if not isinstance(e, OSError) and writes.error is None:
                    raise  # not a failed write: a bug
                _cache_warning(cache, writes.error or e, len(files))
    finally:
        if tmp_file is not None:
            with contextlib.suppress(OSError):  # the flush of a failed write fails again
                tmp_file.close()
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
    made, parent = [], os.path.abspath(data_dir)  # the folders this download creates: removed again if it fails
    while not os.path.lexists(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(data_dir, exist_ok=True)
        fd, archive = tempfile.mkstemp(dir=data_dir, prefix=f".{a['archive']}.", suffix='.part')
    except OSError as e:  # a file where the folder should be, a read-only folder
        raise DataError(f"cannot download into {data_dir} ({e.strerror}): choose a writable --data_dir") from None
    ok = False
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
            ok = True
    finally:
        os.remove(archive)
        for folder in made if not ok else ():  # deepest first; only empty ones (nothing of the user's is in them)
            with contextlib.suppress(OSError):
                os.rmdir(folder)


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
