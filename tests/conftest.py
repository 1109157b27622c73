"""Shared test settings: tiny runs on the embedded demo data so every script runs end to end on a CPU."""
import contextlib
import os
import shutil
import sys

# One thread per process: the tests run small ops, where a second OpenMP thread mostly spins, and on a busy
# 2-core machine it makes them many times slower. Subprocesses (torchrun, kill tests) inherit this.
os.environ['OMP_NUM_THREADS'] = '1'

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# vit_lite on 32x32 crops with 8x8 patches (16 tokens), 256 training images in batches of 32: 8 steps/epoch; a
# kNN bank of 64 images
TINY = ['--dataset', 'demo', '--img_size', '32', '--patch_size', '8', '--subset', '256', '--batch_size', '32',
        '--log_every', '1', '--val_images', '64', '--knn_bank', '64', '--warmup_epochs', '0']


@pytest.fixture
def tiny(tmp_path):
    """TINY plus a fresh out_dir and data_dir under tmp_path: tiny('--epochs', '1') -> argv."""
    def make(*extra, out='run'):
        return TINY + ['--out_dir', str(tmp_path / out), '--data_dir', str(tmp_path / 'data')] + [str(a) for a in extra]
    return make


def script_argv(script, argv):
    """An argv (pairs of --name value) without the names `script` does not have (e.g. pretrain's val_images)."""
    import common
    known = common.defaults(vars(script))
    pairs = list(zip(argv[::2], argv[1::2]))
    return [a for name, value in pairs if name[2:] in known for a in (name, value)]


@pytest.fixture(scope='session')
def pre(tmp_path_factory):
    """A tiny pre-training checkpoint (vit_lite, 32 px, patch 8, one epoch on 64 demo images), made once for the
    whole session. Tests that change it work on a copy."""
    import pretrain
    root = tmp_path_factory.mktemp('pre')
    assert pretrain.main(TINY + ['--out_dir', str(root / 'pre'), '--data_dir', str(root / 'data'),
                                 '--epochs', '1', '--subset', '64', '--val_images', '32']) == 0
    return str(root / 'pre' / 'ckpt.pt')


@contextlib.contextmanager
def keep_first_checkpoint(dest):
    """While active, the first ckpt.pt a run writes is also copied to `dest`: a mid-run checkpoint to resume from,
    for comparing a resumed run with the uninterrupted one."""
    import common
    real_save = common.save_atomic

    def save_and_keep(obj, path):
        real_save(obj, path)
        if str(path).endswith('ckpt.pt') and not os.path.exists(dest):
            shutil.copy(path, dest)
    common.save_atomic = save_and_keep
    try:
        yield dest
    finally:
        common.save_atomic = real_save


def signal_as_the_loop_starts(monkeypatch, signum):
    """Deliver `signum` to the run's handler the moment its training loop starts (Run.in_loop set): as if it arrived
    during the first step. (Before that, a signal unwinds at once: there is nothing to save yet.)"""
    import common

    def set_in_loop(self, value):
        self.__dict__['in_loop'] = value
        if value:
            self._on_signal(signum, None)
    monkeypatch.setattr(common.Run, 'in_loop', property(lambda self: self.__dict__.get('in_loop', False), set_in_loop),
                        raising=False)


# The README's command runs the suite with `-n 3 --dist loadscope` (on 2 cores: one worker computes while another
# waits on a subprocess or a signal): each test file runs whole on one worker, so that its module fixtures (a
# reference run, a checkpoint) are made once, not once per worker. The slowest files go first, so that at the end
# the small ones fill in while the other workers finish.
SLOW_FILES_FIRST = ['test_reliability.py', 'test_ddp.py', 'test_bench.py', 'test_readme.py', 'test_evaluate.py',
                    'test_dino.py']


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_runtest_logreport(report):
    """With GPU_CHECK_OUT set (gpu_check.sh), one JSON line per test as it finishes, so a cut-short check keeps its
    results."""
    out = os.environ.get('GPU_CHECK_OUT')
    if out and (report.when == 'call' or report.outcome != 'passed'):
        import json
        line = dict(test=report.nodeid, when=report.when, outcome=report.outcome, seconds=round(report.duration, 1),
                    message=str(report.longrepr).strip().splitlines()[-1][:300] if report.longrepr else None)
        with open(os.path.join(out, 'tests.jsonl'), 'a') as f:
            f.write(json.dumps(line) + '\n')
