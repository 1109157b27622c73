"""Damaged datasets, odd files and the cache's edges: each defect of an annotation file is one line naming the file and
the line (DataError; exit 2 through the scripts, nothing written), a class missing from val is a warning with a count,
fifos, folders and devices are refused without being opened, 16-bit PNGs decode, a read-only folder or a full disk
costs only the cache, a killed run's temp file is removed (and nothing else), and decoding reports progress by the
clock. Fixtures are test_data.py's tiny official layouts."""
import ctypes
import errno
import hashlib
import io
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import common
import data
import pretrain
from conftest import ROOT
from data import DataError
from test_data import make_cub, make_tin, save_image


def tree(top):
    """{path: md5 of a file, or its kind} of everything under top: equal before and after means nothing changed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            mode = os.lstat(p).st_mode
            out[p] = hashlib.md5(open(p, 'rb').read()).hexdigest() if stat.S_ISREG(mode) else stat.S_IFMT(mode)
    return out


def edit(path, old, new):
    path.write_text(path.read_text().replace(old, new, 1))


def append(path, text):
    path.write_text(path.read_text() + text)


def rename_first(folder, name):
    """Rename the first file in folder to `name` (bytes: a name that need not be UTF-8)."""
    first = sorted(os.listdir(folder))[0]
    os.rename(os.path.join(os.fsencode(folder), os.fsencode(first)), os.path.join(os.fsencode(folder), name))


def empty_folder(path):
    for p in path.iterdir():
        p.unlink()

# -----------------------------------------------------------------------------
# annotation files that contradict themselves or cannot be read: one line naming the file (and the line)

# (dataset, split, damage(root), what the line must say); {root} is the dataset folder. The fixtures: TIN wnids.txt
# lists n02 n00 n01, val_annotations.txt lists val_6 .. val_0 on lines 1..7; CUB has 9 images, ids 1..9 on lines
# 1..9 of each file, classes 1 2 3 1 2 3 1 2 3, ids 1..6 train, 7..9 test, and classes.txt lists 3 classes.
DEFECTS = {
    'tin wnid repeated': ('tin', 'train', lambda r: append(r / 'wnids.txt', 'n00\n'),
                          ['{root}/wnids.txt line 4', 'wnid n00 repeats line 2']),
    'tin wnids empty': ('tin', 'train', lambda r: (r / 'wnids.txt').write_text('\n  \n'),
                        ['{root}/wnids.txt', 'the file is empty']),
    'tin wnids not UTF-8': ('tin', 'val', lambda r: (r / 'wnids.txt').write_bytes(b'n02\nn0\xe90\nn01\n'),
                            ['{root}/wnids.txt line 2', 'byte 6 (0xe9) is not UTF-8']),
    'tin class without train images': ('tin', 'train', lambda r: empty_folder(r / 'train' / 'n01' / 'images'),
                                       ['{root}/train/n01/images', 'no images', 'wnids.txt line 3 lists class n01']),
    'tin val file repeated': ('tin', 'val', lambda r: append(r / 'val' / 'val_annotations.txt', 'val_3.JPEG\tn00\n'),
                              ['{root}/val/val_annotations.txt line 8', 'image val_3.JPEG repeats line 4']),
    'tin val wnid unknown': ('tin', 'val', lambda r: edit(r / 'val' / 'val_annotations.txt', 'val_5.JPEG\tn01',
                                                          'val_5.JPEG\tn99'),
                             ['{root}/val/val_annotations.txt line 2', 'wnid n99 is not in wnids.txt']),
    'tin val row too short': ('tin', 'val', lambda r: edit(r / 'val' / 'val_annotations.txt',
                                                           'val_4.JPEG\tn00\t0\t0\t63\t63', 'val_4.JPEG'),
                              ['{root}/val/val_annotations.txt line 3', 'fewer than 2 fields']),
    'tin val annotations not UTF-8': ('tin', 'val', lambda r: (r / 'val' / 'val_annotations.txt').write_bytes(
        b'val_0.JPEG\tn02\nval_\xff1.JPEG\tn00\n'), ['{root}/val/val_annotations.txt line 2', 'byte 19 (0xff)']),
    'tin val annotations empty': ('tin', 'val', lambda r: (r / 'val' / 'val_annotations.txt').write_bytes(b''),
                                  ['{root}/val/val_annotations.txt', 'the file is empty']),
    'tin val annotations a fifo': ('tin', 'val', lambda r: ((r / 'val' / 'val_annotations.txt').unlink(),
                                                            os.mkfifo(r / 'val' / 'val_annotations.txt')),
                                   ['{root}/val/val_annotations.txt', 'a named pipe (fifo), not a text file']),
    'cub image id repeated': ('cub', 'train', lambda r: append(r / 'images.txt', '3 001.Albatross/x.jpg\n'),
                              ['{root}/images.txt line 10', 'image id 3 repeats line 3']),
    'cub image id not a number': ('cub', 'val', lambda r: edit(r / 'images.txt', '4 ', 'four '),
                                  ['{root}/images.txt line 4', "image id 'four' is not a number"]),
    'cub images.txt row too short': ('cub', 'train', lambda r: edit(r / 'images.txt', '5 002.Auklet/002.Auklet_5.jpg',
                                                                    '5'),
                                     ['{root}/images.txt line 5', 'fewer than 2 fields']),
    'cub images.txt empty': ('cub', 'train', lambda r: (r / 'images.txt').write_text(''),
                             ['{root}/images.txt', 'the file is empty']),
    'cub label repeated': ('cub', 'train', lambda r: append(r / 'image_class_labels.txt', '2 3\n'),
                           ['{root}/image_class_labels.txt line 10', 'image id 2 repeats line 2']),
    'cub label not a number': ('cub', 'train', lambda r: edit(r / 'image_class_labels.txt', '6 3', '6 three'),
                               ['{root}/image_class_labels.txt line 6', "class id 'three' is not a number >= 1"]),
    'cub label zero': ('cub', 'val', lambda r: edit(r / 'image_class_labels.txt', '7 1', '7 0'),
                       ['{root}/image_class_labels.txt line 7', "class id '0' is not a number >= 1"]),
    'cub label out of range': ('cub', 'val', lambda r: edit(r / 'image_class_labels.txt', '8 2', '8 7'),
                               ['{root}/image_class_labels.txt line 8', 'class id 7 is not in classes.txt (ids 1..3']),
    'cub id missing from labels': ('cub', 'train', lambda r: edit(r / 'image_class_labels.txt', '5 2\n', ''),
                                   ['{root}/image_class_labels.txt', 'no row for image id 5 of images.txt line 5']),
    'cub id missing from images': ('cub', 'train', lambda r: append(r / 'train_test_split.txt', '10 1\n'),
                                   ['{root}/train_test_split.txt line 10', 'image id 10 is not in images.txt']),
    'cub split flag not 0/1': ('cub', 'train', lambda r: edit(r / 'train_test_split.txt', '2 1', '2 2'),
                               ['{root}/train_test_split.txt line 2', "split flag '2' is neither 1 (train) nor 0"]),
    'cub class without train images': ('cub', 'train', lambda r: [edit(r / 'train_test_split.txt', f'{i} 1', f'{i} 0')
                                                                  for i in (3, 6)],
                                       ['{root}/train_test_split.txt', 'no image of class 3 (003.Cormorant) is in '
                                                                       'the train split']),
    'cub box missing': ('cub', 'bbox', lambda r: edit(r / 'bounding_boxes.txt', '9 10.0', '99 10.0'),
                        ['{root}/bounding_boxes.txt line 9', 'image id 99 is not in images.txt']),
    'cub box not numbers': ('cub', 'bbox', lambda r: edit(r / 'bounding_boxes.txt', '4 10.0', '4 ten'),
                            ['{root}/bounding_boxes.txt line 4', "the box 'ten 8.0 40.0 30.0' is not four numbers"]),
    'cub box without area': ('cub', 'bbox', lambda r: edit(r / 'bounding_boxes.txt', '4 10.0 8.0 40.0', '4 10 8 0'),
                             ['{root}/bounding_boxes.txt line 4', 'with w, h > 0']),
    'cub class id repeated': ('cub', 'train', lambda r: append(r / 'classes.txt', '2 004.Loon\n'),
                              ['{root}/classes.txt line 4', 'class id 2 repeats line 2']),
    'cub class name repeated': ('cub', 'train', lambda r: edit(r / 'classes.txt', '3 003.Cormorant', '3 001.Albatross'),
                                ['{root}/classes.txt line 3', 'class 001.Albatross repeats line 1']),
    'cub class without images': ('cub', 'val', lambda r: append(r / 'classes.txt', '4 004.Loon\n'),
                                 ['{root}/classes.txt line 4', 'class 4 (004.Loon) has no image']),
    'cub classes not UTF-8': ('cub', 'train', lambda r: (r / 'classes.txt').write_bytes(b'1 a\n2 b\xc3\n3 c\n'),
                              ['{root}/classes.txt line 2', 'byte 7 (0xc3) is not UTF-8']),
    'tin train file name not UTF-8': ('tin', 'train', lambda r: rename_first(r / 'train' / 'n00' / 'images',
                                                                             b'n00_\xff.JPEG'),
                                      ['{root}/train/n00/images', "file name b'n00_\\xff.JPEG' is not UTF-8"]),
    'cub image listed twice': ('cub', 'train', lambda r: edit(r / 'images.txt', '5 002.Auklet/002.Auklet_5.jpg',
                                                              '5 002.Auklet/002.Auklet_2.jpg'),
                               ['{root}/images.txt line 5', '002.Auklet/002.Auklet_2.jpg repeats line 2']),
    'cub label contradicts the folder': ('cub', 'train', lambda r: edit(r / 'image_class_labels.txt', '5 2', '5 1'),
                                         ['{root}/image_class_labels.txt line 5', 'image id 5 has class 1 '
                                          '(001.Albatross), but images.txt line 5 puts it in the folder 002.Auklet']),
    'cub label gap without classes.txt': ('cub', 'train', lambda r: ((r / 'classes.txt').unlink(), [
        edit(r / 'image_class_labels.txt', f'{i} 2', f'{i} 3') for i in (2, 5, 8)]),
        ['{root}/image_class_labels.txt', 'no image has class id 2, though the ids run to 3']),
}


def load(dataset, split, data_dir):
    return data.load_split(dataset, 'train' if split == 'bbox' else split, str(data_dir), cub_bbox=split == 'bbox')


@pytest.mark.parametrize('defect', DEFECTS)
def test_damaged_annotations_are_one_line_naming_the_file_and_line(defect, tmp_path):
    dataset, split, damage, needles = DEFECTS[defect]
    root = (make_tin if dataset == 'tin' else make_cub)(tmp_path)
    damage(root)
    before = tree(tmp_path)
    with pytest.raises(DataError) as e:
        load(dataset, split, tmp_path)
    message = str(e.value)
    assert '\n' not in message and '--download true' in message
    for needle in needles:
        assert needle.format(root=root) in message, message
    assert tree(tmp_path) == before


def run_cli(argv, capsys, monkeypatch, script='pretrain.py', main=pretrain.main):
    """A script's main run as `python script.py ...` runs it -> (exit code, stdout, stderr lines)."""
    monkeypatch.setattr(sys, 'argv', [script] + [str(a) for a in argv])
    with pytest.raises(SystemExit) as exit_info:
        common.cli(main)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err.strip().splitlines()


@pytest.mark.parametrize('defect', ['tin wnid repeated', 'cub label out of range', 'cub id missing from labels'])
def test_damaged_dataset_through_pretrain_is_exit_2_and_nothing_written(defect, tmp_path, capsys, monkeypatch):
    dataset, _, damage, needles = DEFECTS[defect]
    root = (make_tin if dataset == 'tin' else make_cub)(tmp_path / 'data')
    damage(root)
    before = tree(tmp_path / 'data')
    code, _, err = run_cli(['--dataset', dataset, '--data_dir', tmp_path / 'data', '--out_dir', tmp_path / 'run',
                            '--batch_size', 2, '--epochs', 1], capsys, monkeypatch)
    assert code == 2 and len(err) == 1 and err[0].startswith('pretrain.py: error: '), err
    assert all(n.format(root=root) in err[0] for n in needles), err[0]
    assert tree(tmp_path / 'data') == before
    assert not [f for _, _, files in os.walk(tmp_path / 'run') for f in files], "a refused run wrote a file"

# -----------------------------------------------------------------------------
# warnings: a val split without some class goes on, and says how many


@pytest.mark.parametrize('dataset', ['tin', 'cub'])
def test_val_without_a_class_is_a_warning_with_the_count(dataset, tmp_path, capsys):
    if dataset == 'tin':
        make_tin(tmp_path, val_labels=(0, 1, 0, 1))  # no val image of n01
        missing, n_val = 'n01', 4
    else:
        edit(make_cub(tmp_path) / 'train_test_split.txt', '8 0', '8 1')  # the only test image of class 2
        missing, n_val = '002.Auklet', 2
    val = data.load_split(dataset, 'val', str(tmp_path))
    assert len(val.labels) == n_val and val.num_classes == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('warning: 1 of 3 classes have no val image') and missing in err[0]
    assert 'cover the other 2' in err[0]

# -----------------------------------------------------------------------------
# image files: odd kinds are refused before any open, odd modes decode


def never_opened(paths):
    """A watchdog for fifos: while active, a reader that opened one (and may be blocked on it) is noticed and
    released with an end of file, so that a broken implementation fails the test instead of hanging it."""
    opened, stop = [], threading.Event()

    def watch():
        while not stop.wait(0.05):
            for path in paths:
                try:  # a non-blocking open for writing succeeds only while some process holds the fifo for reading
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                    opened.append(path)
                except OSError:
                    pass
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return opened, lambda: (stop.set(), thread.join())


@pytest.mark.parametrize('kind, make', [
    ('a named pipe (fifo)', os.mkfifo),
    ('a directory', os.mkdir),
    ('a character device', lambda p: os.symlink('/dev/zero', p)),  # a link to a device: any user can make one
])
def test_fifo_folder_or_device_for_an_image_is_listed_unreadable_without_opening(kind, make, tmp_path):
    root = make_tin(tmp_path)
    images = [root / 'train' / name[:3] / 'images' / name for name in ('n00_1.JPEG', 'n02_2.JPEG')]
    for image in images:
        image.unlink()
        make(image)
    opened, stop = never_opened(images) if kind.endswith('(fifo)') else ([], lambda: None)
    before = tree(tmp_path)
    try:
        with pytest.raises(DataError) as e:
            data.load_split('tin', 'train', str(tmp_path))
    finally:
        stop()
    assert not opened, "the fifo was opened"
    message = str(e.value)
    assert message.startswith(f'2 unreadable image file(s) under {root}') and '\n' not in message
    for name in ('train/n00/images/n00_1.JPEG', 'train/n02/images/n02_2.JPEG'):
        assert f'{name} ({kind}, not an image file)' in message
    assert tree(tmp_path) == before  # no cache, no temp file


def odd_image(mode, value, fmt):
    im = Image.new(mode, (64, 64), value)
    buffer = io.BytesIO()
    im.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize('mode, value, fmt, expected', [
    ('I;16', 1000, 'PNG', 4),        # 16-bit grayscale: 1000 / 257; a plain convert('RGB') made it 255, white
    ('I;16', 65535, 'PNG', 255),
    ('I;16B', 40000, 'TIFF', 156),
    ('I', 1000, 'TIFF', 4),          # how Pillow < 10 opens a 16-bit PNG
    ('1', 1, 'PNG', None),           # None: what PIL's own convert('RGB') gives
    ('L', 77, 'PNG', None),
    ('P', 5, 'PNG', None),
    ('LA', (77, 128), 'PNG', None),
    ('PA', (5, 128), 'TIFF', None),
    ('RGBA', (200, 30, 30, 100), 'PNG', None),
    ('CMYK', (0, 200, 200, 0), 'TIFF', None),
    ('YCbCr', (100, 100, 200), 'TIFF', None),
    ('LAB', (50, 100, 100), 'TIFF', None),
])
def test_odd_image_modes_decode(mode, value, fmt, expected, tmp_path):
    root = make_tin(tmp_path)
    image = root / 'train' / 'n00' / 'images' / 'n00_0.JPEG'  # PIL reads the content, whatever the name says
    image.write_bytes(odd_image(mode, value, fmt))
    with Image.open(image) as im:
        reference = np.asarray(im.convert('RGB'))[0, 0]
    train = data.load_split('tin', 'train', str(tmp_path))
    decoded = train.images[train.labels == 1][0].permute(1, 2, 0).reshape(-1, 3)  # n00_0, the first file of n00
    wanted = torch.tensor([expected] * 3 if expected is not None else reference)
    assert (decoded.int() - wanted).abs().max() <= 1, (mode, decoded.unique(dim=0))

# -----------------------------------------------------------------------------
# the cache: a read-only folder, a full disk, a killed run's temp file


def without_file_permission_override():
    """In a child process run by root: drop the capabilities that let root write into a read-only folder, so that
    the folder is read-only for it too (prctl PR_CAPBSET_DROP; the bounding set applies from the exec on)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), 'prctl(PR_CAPBSET_DROP)')


def test_read_only_dataset_decodes_in_memory_with_one_warning(tmp_path):
    root = make_tin(tmp_path)
    before = tree(tmp_path)
    load = (f"import sys; sys.path.insert(0, {ROOT!r}); import data; "
            f"print(len(data.load_split('tin', 'train', {str(tmp_path)!r}).labels), 'images')")
    os.chmod(root, 0o555)
    try:
        done = subprocess.run([sys.executable, '-c', load], capture_output=True, text=True, timeout=300,
                              preexec_fn=without_file_permission_override if os.geteuid() == 0 else None)
    finally:
        os.chmod(root, 0o755)
    assert done.returncode == 0 and '10 images' in done.stdout, done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f'warning: could not write the cache {root}/cache_train.pt (Permission denied)')
    assert 'every run will decode these 10 images again' in err[0] and f'make {root} writable' in err[0]
    assert tree(tmp_path) == before


class FullDisk(io.FileIO):
    """A file on a disk that fills up after its first 4 kB: later writes fail with ENOSPC, as the OS does."""

    def write(self, b):
        room = 4096 - self.tell()
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(bytes(b)[:room])


@pytest.mark.parametrize('previous', ['no cache', 'an out-of-date cache'])
def test_full_disk_while_caching_keeps_the_previous_cache_and_leaves_no_temp_file(previous, tmp_path, monkeypatch,
                                                                                   capsys):
    root = make_tin(tmp_path)
    if previous == 'an out-of-date cache':
        data.load_split('tin', 'val', str(tmp_path))
    save_image(root / 'val' / 'images' / 'val_0.JPEG', (250, 250, 250))  # makes a cache out of date
    os.utime(root / 'val' / 'images' / 'val_0.JPEG', ns=(time.time_ns() + 10**9,) * 2)
    capsys.readouterr()
    before = tree(tmp_path)
    real_open = open
    monkeypatch.setattr(data, 'open', lambda path, mode='r', *a, **kw: io.BufferedWriter(FullDisk(path, 'w'))
                        if '.tmp.' in str(path) else real_open(path, mode, *a, **kw), raising=False)
    val = data.load_split('tin', 'val', str(tmp_path))
    assert val.images[0].float().mean() > 240  # the new pixels, decoded in memory
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'warning: could not write the cache {root}/cache_val.pt (No space '
                                               f'left on device)'), err
    assert 'this run goes on from memory' in err[0] and 'free about 1 MB on its disk' in err[0]
    assert ('previous, out-of-date cache is left as it was' in err[0]) == (previous != 'no cache')
    assert tree(tmp_path) == before  # the previous cache as it was, no temp file


def test_stale_cache_temp_files_are_removed_and_nothing_else(tmp_path, capsys):
    root = make_tin(tmp_path)
    ended = subprocess.Popen([sys.executable, '-c', ''])  # a process id that is gone once it has ended
    ended.wait()
    host, hour_ago = socket.gethostname(), time.time() - 2 * data.STALE_TEMP_S
    files = {  # name: (removed?, older than STALE_TEMP_S?)
        f'cache_train.pt.tmp.{host}.{ended.pid}': (True, False),       # a killed run of this machine
        f'cache_val_bbox.pt.tmp.{host}.{os.getpid()}': (True, False),  # a killed run with our pid (a container's)
        f'cache_val.pt.tmp.other-machine.{ended.pid}': (False, False),  # maybe alive elsewhere
        f'cache_val.pt.tmp.other-machine.{ended.pid + 1}': (True, True),  # nothing wrote it for two hours
        f'cache_train.pt.tmp.{ended.pid}': (False, False),               # older data.py, no machine: by age only
        f'cache_val.pt.tmp.{ended.pid + 2}': (True, True),
        f'cache_train.pt.tmp.{host}.{os.getppid()}': (False, False),   # a live writer on this machine
        f'cache_train.pt.tmp.{host}.{ended.pid}.bak': (False, True),   # names data.py never writes
        f'my_cache_train.pt.tmp.{host}.{ended.pid}': (False, True),
        f'cache_test.pt.tmp.{host}.{ended.pid}': (False, True),
        'cache_train.pt.tmp.notes': (False, True),
    }
    for name, (_, old) in files.items():
        (root / name).write_bytes(name.encode())
        if old:
            os.utime(root / name, (hour_ago, hour_ago))
    data.load_split('tin', 'val', str(tmp_path))
    left = set(os.listdir(root))
    assert {n for n, (removed, _) in files.items() if not removed} <= left
    assert not {n for n, (removed, _) in files.items() if removed} & left
    assert all((root / n).read_bytes() == n.encode() for n in files if n in left)
    assert re.search(rf'removed 4 cache temp file\(s\) that killed runs left in {re.escape(str(root))}',
                     capsys.readouterr().out)

# -----------------------------------------------------------------------------
# progress while a split decodes: by the clock, with a smoothed rate


@pytest.fixture
def printed(monkeypatch):
    """The lines data.py prints, as they come (its progress comes from other threads), with PROGRESS_EVERY 0.05 s."""
    lines, real_print = [], print

    def record(*args, **kwargs):
        lines.append(' '.join(map(str, args)))
        real_print(*args, **kwargs)
    monkeypatch.setattr(data, 'print', record, raising=False)
    monkeypatch.setattr(data, 'PROGRESS_EVERY', 0.05)
    return lines


def wait_for_lines(lines, needle, n, deadline):
    """Hold the caller (a decoding worker, a write) until n lines with needle are out: only a timer can print them."""
    while sum(needle in line for line in lines) < n:
        assert time.monotonic() < deadline, f'fewer than {n} lines with {needle!r} while the work was held'
        time.sleep(0.01)


def test_progress_lines_come_by_the_clock_while_no_image_finishes(tmp_path, monkeypatch, printed):
    make_tin(tmp_path)
    real_decode, deadline = data._decode_image, time.monotonic() + 30

    def held(path, box=None):
        wait_for_lines(printed, 'decoding tin/train:', 3, deadline)
        return real_decode(path, box)
    monkeypatch.setattr(data, '_decode_image', held)
    assert len(data.load_split('tin', 'train', str(tmp_path)).labels) == 10
    progress = [line for line in printed if 'decoding tin/train:' in line]
    assert len(progress) >= 3
    assert all(re.fullmatch(r'  decoding tin/train: \d+/10 \([\d,]+ images/s, eta (\?|\d+m\d\ds|\d+h\d\dm)\)', line)
               for line in progress), progress
    assert progress[0].startswith('  decoding tin/train: 0/10')


def test_a_slow_cache_write_prints_lines_by_the_clock(tmp_path, monkeypatch, printed):
    root, deadline = make_tin(tmp_path), time.monotonic() + 30
    writing = f'  writing {root}/cache_val.pt ('

    class SlowDisk(io.FileIO):
        def write(self, b):
            wait_for_lines(printed, writing, 2, deadline)
            return super().write(b)
    real_open = open
    monkeypatch.setattr(data, 'open', lambda path, mode='r', *a, **kw: io.BufferedWriter(SlowDisk(path, 'w'))
                        if '.tmp.' in str(path) else real_open(path, mode, *a, **kw), raising=False)
    data.load_split('tin', 'val', str(tmp_path))
    assert sum(line.startswith(writing) and line.endswith(' s)') for line in printed) >= 2
    assert torch.equal(data.load_split('tin', 'val', str(tmp_path)).labels, torch.tensor([0, 1, 2, 0, 1, 2, 2]))
    assert (root / 'cache_val.pt').exists()


def test_progress_rate_and_eta_are_smoothed_over_bursts():
    """Images that finish in bursts (a chunk at a time) at a steady 200 images/s on average: neither the rate nor
    the ETA may swing by 2x between consecutive lines (the last interval's rate alone swings by 3x here)."""
    progress, done, rates, etas = data._Progress('decoding x', 100_000, 0.0), 0, [], []
    for k in range(1, 30):
        done += 3000 if k % 2 else 1000  # 10 s between lines
        m = re.search(r'\(([\d,]+) images/s, eta (\d+)m(\d\d)s\)', progress.line(done, 10.0 * k))
        rates.append(int(m[1].replace(',', '')))
        etas.append(60 * int(m[2]) + int(m[3]))
    assert all(max(a, b) / min(a, b) < 1.5 for a, b in zip(rates, rates[1:])), rates
    assert all(max(a, b) / min(a, b) < 2 for a, b in zip(etas, etas[1:]) if min(a, b) > 60), etas
    assert abs(rates[-1] / 200 - 1) < 0.3
