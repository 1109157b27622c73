"""evaluate.py: metrics equal direct scikit-image / lpips calls, kNN equals a brute-force vote, floors behave,
LPIPS and a missing transfer dataset degrade to one line, and the whole command runs on the demo data."""
import contextlib
import errno
import json
import math
import multiprocessing
import multiprocessing.context
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from types import SimpleNamespace

import lpips
import numpy as np
import pytest
import torch
import torchvision
from PIL import ImageDraw
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import common
import data
import evaluate
import model as M
import pretrain
from conftest import ROOT, TINY
from test_reliability import one_line_error, run_cli

REAL_LPIPS = lpips.LPIPS


def random_images(n=5, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 3, size, size, generator=g)
    b = (a + 0.15 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    return a, b


def smooth_image(size=32):
    """A smooth colour image: gradients and a slow wave, so interpolation should beat a flat fill."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing='ij')
    return torch.stack([xx, yy, 0.5 + 0.4 * torch.sin(3 * xx + 2 * yy)])[None].clamp(0, 1)


def patch_mask(size=32, patch=8, seed=0, ratio=0.75):
    """(1, 1, H, W) visible-pixel mask of a random patch masking (1 = visible)."""
    g = torch.Generator().manual_seed(seed)
    grid = size // patch
    keep = torch.randperm(grid * grid, generator=g)[:int(grid * grid * (1 - ratio))]
    vis = torch.zeros(grid * grid)
    vis[keep] = 1
    return vis.view(1, 1, grid, grid).repeat_interleave(patch, 2).repeat_interleave(patch, 3)


# --- metric helpers -------------------------------------------------------------------------------------

def test_psnr_ssim_equal_direct_scikit_image_calls():
    a, b = random_images()
    pred, target = evaluate.to_hwc(b), evaluate.to_hwc(a)
    psnr, ssim = evaluate.image_metrics(pred, target)
    for i in range(len(a)):
        assert psnr[i] == peak_signal_noise_ratio(target[i], pred[i], data_range=1.0)
        assert ssim[i] == structural_similarity(target[i], pred[i], data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                                sigma=1.5, use_sample_covariance=False)  # Wang et al.'s convention
    # the pool task sums the same numbers
    sums = evaluate._metrics_chunk({'model': pred}, target)['model']
    assert sums[0] == pytest.approx(psnr.sum()) and sums[1] == pytest.approx(ssim.sum())


def test_lpips_equals_direct_lpips_call():
    torch.manual_seed(0)
    net = lpips.LPIPS(net='alex', pretrained=True, pnet_rand=True, verbose=False)  # untrained trunk: test only
    a, b = random_images(n=3, size=64)
    direct = net(b * 2 - 1, a * 2 - 1).flatten()
    ours = evaluate.lpips_distance(net, b, a)
    assert ours.shape == (3,) and torch.allclose(ours, direct, atol=1e-6)
    assert evaluate.lpips_distance(net, a, a).abs().max() < 1e-6


def test_perfect_reconstruction_and_floors():
    img = smooth_image()
    vis = patch_mask()
    psnr, ssim = evaluate.image_metrics(evaluate.to_hwc(img), evaluate.to_hwc(img))
    assert psnr[0] == evaluate.PSNR_CAP_DB == 100.0 and ssim[0] == pytest.approx(1.0)
    mean_fill = evaluate.mean_colour_fill(img, vis)
    interp = evaluate.interpolation_fill(img, vis, sigma=2.0)
    for filled in (mean_fill, interp):
        assert torch.equal(filled * vis, img * vis), "visible pixels must come from the input"
        assert torch.isfinite(filled).all() and filled.min() >= 0 and filled.max() <= 1
    # the mean colour is the visible pixels' mean, per channel
    masked = vis[0, 0] == 0
    assert torch.allclose(mean_fill[0, :, masked].mean(1), (img * vis).sum((2, 3))[0] / vis.sum(), atol=1e-6)
    p_mean, s_mean = evaluate.image_metrics(evaluate.to_hwc(mean_fill), evaluate.to_hwc(img))
    p_int, s_int = evaluate.image_metrics(evaluate.to_hwc(interp), evaluate.to_hwc(img))
    assert math.isfinite(p_mean[0]) and math.isfinite(p_int[0])
    assert p_mean[0] < p_int[0] < psnr[0], (p_mean, p_int)
    assert s_mean[0] < s_int[0] < 1.0


def test_interpolation_fills_a_single_visible_patch_everywhere():
    img = smooth_image(64)
    vis = torch.zeros(1, 1, 64, 64)
    vis[..., :4, :4] = 1  # one corner patch visible: the fill must still reach the far corner
    out = evaluate.interpolation_fill(img, vis)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0, :, -1, -1], img[0, :, :4, :4].mean((1, 2)), atol=0.05)


# --- kNN ------------------------------------------------------------------------------------------------

def brute_force_knn(train, train_y, test, test_y, num_classes, k, T):
    train = train / train.norm(dim=1, keepdim=True)
    test = test / test.norm(dim=1, keepdim=True)
    hits1 = hits5 = 0
    for q, label in zip(test, test_y):
        sims = [(float(q @ t), int(y)) for t, y in zip(train, train_y)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, y in sims[:k]:
            votes[y] += math.exp(sim / T)
        ranked = sorted(range(num_classes), key=lambda c: -votes[c])
        ranked = [c for c in ranked if votes[c] > 0]  # a class with no votes is not a prediction
        hits1 += ranked[0] == label
        hits5 += label in ranked[:5]
    return 100.0 * hits1 / len(test), 100.0 * hits5 / len(test)


def test_knn_equals_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    num_classes, dim = 8, 16
    centres = torch.randn(num_classes, dim, generator=g)
    train_y = torch.randint(0, num_classes, (300,), generator=g)
    test_y = torch.randint(0, num_classes, (45,), generator=g)
    train = centres[train_y] + 1.5 * torch.randn(300, dim, generator=g)
    test = centres[test_y] + 1.5 * torch.randn(45, dim, generator=g)
    for k, T in ((20, 0.07), (5, 0.5)):
        got = evaluate.knn_classify(train, train_y, test, test_y, num_classes, k=k, temperature=T, chunk=8)
        ref1, ref5 = brute_force_knn(train, train_y, test, test_y, num_classes, k, T)
        assert got['top1'] == pytest.approx(ref1) and got['top5'] == pytest.approx(ref5)
        assert 0 < got['top1'] < got['top5'] <= 100
    # the bank recognises itself
    assert evaluate.knn_classify(train, train_y, train, train_y, num_classes, k=1)['top1'] == 100.0


# --- the command ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp('pre')
    argv = TINY + ['--out_dir', str(root / 'pre'), '--data_dir', str(root / 'data'), '--epochs', '1']
    assert pretrain.main(argv) == 0
    return str(root / 'pre' / 'ckpt.pt')


def eval_argv(ckpt, out, *extra):
    """Demo data, 256 train images (kNN bank, probe) and 96 val images: seconds on a CPU."""
    return ['--ckpt', ckpt, '--dataset', 'demo', '--out_dir', str(out), '--feature_batch', '64', '--subset', '256',
            '--max_images', '96'] + [str(a) for a in extra]


def untrained_lpips(*args, **kwargs):  # stands in for LPIPS where the ImageNet AlexNet cannot be fetched
    torch.manual_seed(0)
    return REAL_LPIPS(net='alex', pretrained=True, pnet_rand=True, verbose=False)


def test_end_to_end_on_demo(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(lpips, 'LPIPS', untrained_lpips)
    out = tmp_path / 'eval'
    assert evaluate.main(eval_argv(ckpt, out, '--probe_epochs', 2, '--workers', 2)) == 0
    res = json.loads((out / 'eval.json').read_text())
    rec = res['reconstruction']
    assert (res['dataset'], res['mask'], res['masking'], res['images']) == ('demo', 0.75, 'random', 96)
    for kind in evaluate.KINDS:
        assert 0 < rec[kind]['psnr'] < 100 and 0 < rec[kind]['ssim'] < 1 and rec[kind]['lpips'] > 0
    assert rec['mean_colour_floor']['psnr'] < rec['interpolation_floor']['psnr']
    assert rec['masked_mse'] > 0
    rep = res['representation']['demo']
    for kind in evaluate.FEATURES:  # the model and its two floors, each by kNN and by the probe, on the same split
        assert 0 <= rep[kind]['knn']['top1'] <= rep[kind]['knn']['top5'] <= 100
        assert rep[kind]['probe']['epochs'] == 2 and 0 <= rep[kind]['probe']['top1'] <= 100
    assert res['references'] == {}  # demo: no number of the study applies
    md = (out / 'eval.md').read_text()
    assert 'floor: interpolation' in md and 'linear probe' in md and 'kNN' in md
    assert "floor: the run's initial (random) encoder" in md and 'floor: raw pixels' in md and 'Gaussian window, sigma 1.5' in md
    assert (out / 'recon.png').stat().st_size > 1000
    assert not (out / '.lock').exists()
    # the masks are fixed by the seed, not by the batch size, and the pool gives what one process gives
    ck = common.load_checkpoint(ckpt)
    mae = M.build_mae(M.ViTConfig(**ck['model_config']))
    M.load_weights(mae, ck['model'])
    val = data.subset(data.load_split('demo', 'val'), 96, 0)
    run = SimpleNamespace(device=torch.device('cpu'), autocast=contextlib.nullcontext())
    cfg = SimpleNamespace(seed=0, workers=1, feature_batch=40)
    again = evaluate.reconstruction_metrics(mae, val, 0.75, 'random', cfg, run, lpips_net=None)
    for kind in evaluate.KINDS:
        for metric in ('psnr', 'ssim'):
            assert again[kind][metric] == pytest.approx(rec[kind][metric], rel=1e-5)
    assert again['masked_mse'] == pytest.approx(rec['masked_mse'], rel=1e-5)


def test_lpips_unavailable_and_missing_transfer_dataset(ckpt, tmp_path, monkeypatch, capsys):
    asked = []

    def offline_alexnet(*args, pretrained=False, **kwargs):  # what torchvision does with no network
        asked.append(pretrained)
        print('Downloading: "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"')
        raise urllib.error.URLError('[Errno -2] Name or service not known')
    monkeypatch.setattr(torchvision.models, 'alexnet', offline_alexnet)
    out = tmp_path / 'eval'
    argv = eval_argv(ckpt, out, '--probe_epochs', 0, '--workers', 1, '--max_images', 64, '--subset', 64, '--mask', 0.5,
                     '--masking', 'block', '--transfer_dataset', 'cub', '--data_dir', tmp_path / 'nodata')
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    lpips_lines = [line for line in printed if line.startswith('LPIPS')]
    assert len(lpips_lines) == 1 and 'unavailable' in lpips_lines[0] and 'Name or service' in lpips_lines[0]
    assert asked == [True] and not any('Downloading' in line for line in printed)  # never a random backbone
    res = json.loads((out / 'eval.json').read_text())
    assert (res['mask'], res['masking'], res['images']) == (0.5, 'block', 64)
    assert res['lpips']['available'] is False
    assert all(res['reconstruction'][kind]['lpips'] is None for kind in evaluate.KINDS)
    assert res['reconstruction']['model']['psnr'] > 0
    assert res['representation']['cub']['available'] is False and 'cub' in res['representation']['cub']['reason']
    md = (out / 'eval.md').read_text()
    assert '| unavailable |' in md and md.count('unavailable') >= 4
    assert 'Linear probe: skipped (--probe_epochs 0).' in md and '0 epochs' not in md  # not "0 epochs of the recipe"
    assert md.count('| skipped |') == 3  # the model and its two floors


def test_bad_checkpoint_path_names_the_file(tmp_path):
    missing = str(tmp_path / 'nope' / 'ckpt.pt')
    with pytest.raises(common.UserError, match='nope/ckpt.pt'):
        evaluate.main(['--ckpt', missing, '--out_dir', str(tmp_path / 'eval')])
    with pytest.raises(common.UserError, match='--transfer_dataset'):
        evaluate.main(['--ckpt', missing, '--transfer_dataset', 'imagenet', '--out_dir', str(tmp_path / 'eval')])


def test_references_follow_the_setting():
    ck = dict(config=dict(model='vit_lite', alpha=0.0), model_config=dict(patch_size=4), epoch=200.0)
    refs = evaluate.references(ck, 'tin', 0.75, 'random')
    assert refs['linear_probe_top1']['value'] == 32.04 and 'here' not in refs['linear_probe_top1']['source']
    assert refs['psnr']['value'] == 23.08 and 'different setting' in refs['psnr']['source']
    base = dict(config=dict(model='vit_base'), model_config=dict(patch_size=16), epoch=24.0)
    assert 'different' not in evaluate.references(base, 'tin', 0.75, 'random')['ssim']['source']
    assert evaluate.references(ck, 'tin', 0.6, 'random')['linear_probe_top1']['value'] == 32.03
    short = dict(ck, epoch=20.0)
    assert evaluate.references(short, 'tin', 0.75, 'random')['linear_probe_top1']['source'].endswith('here: 20 ep')
    assert 'linear_probe_top1' not in evaluate.references(ck, 'tin', 0.5, 'block')
    assert evaluate.references(ck, 'demo', 0.75, 'random') == {}


def test_norm_pix_reconstructions_are_not_scored_and_the_table_says_why(tmp_path):
    """A norm_pix_loss model's pixels would need each masked patch's true mean and variance: scoring them would leak
    the answer, so evaluate.py refuses to compare them with raw-pixel models and says so."""
    argv = TINY + ['--out_dir', str(tmp_path / 'np'), '--data_dir', str(tmp_path / 'data'), '--epochs', '1',
                   '--subset', '64', '--norm_pix_loss', 'true']
    assert pretrain.main(argv) == 0
    out = tmp_path / 'eval'
    assert evaluate.main(eval_argv(str(tmp_path / 'np' / 'ckpt.pt'), out, '--probe_epochs', 0, '--workers', 1)) == 0
    res = json.loads((out / 'eval.json').read_text())
    assert 'norm_pix_loss' in res['reconstruction']['skipped'] and 'leak' in res['reconstruction']['skipped']
    assert 'model' not in res['reconstruction'] and not (out / 'recon.png').exists()
    assert 'Reconstruction not scored' in (out / 'eval.md').read_text()


def test_the_table_says_in_words_when_the_model_is_below_a_floor():
    floors = {'mean_colour_floor': 0.52, 'interpolation_floor': 0.69}
    assert evaluate.verdict('SSIM', 0.50, floors) == '**SSIM not above the floors: mean colour, interpolation**'
    assert evaluate.verdict('SSIM', 0.60, floors) == '**SSIM not above the floor: interpolation**'
    assert evaluate.verdict('SSIM', 0.70, floors) == ''
    assert evaluate.verdict('kNN', 61.2, {'random_init_floor': 71.6, 'pixel_floor': 50.3}) == \
        '**kNN not above the floor: random init**'


def test_the_random_init_floor_is_the_runs_own_initial_encoder(tmp_path):
    """evaluate.py's random-init kNN floor and the floor pretrain.py logs at step 0 are the same number (the same
    initial weights, bank and queries), so a user can read one beside the other."""
    argv = TINY + ['--out_dir', str(tmp_path / 'pre'), '--data_dir', str(tmp_path / 'data'), '--epochs', '1',
                   '--val_images', '384', '--knn_bank', '256', '--seed', '3']
    assert pretrain.main(argv) == 0
    logged = [json.loads(line) for line in open(tmp_path / 'pre' / 'log.jsonl')]
    floor = next(r for r in logged if r['event'] == 'knn' and r['what'].startswith('floor'))['top1']
    out = tmp_path / 'eval'
    assert evaluate.main(['--ckpt', str(tmp_path / 'pre' / 'ckpt.pt'), '--dataset', 'demo', '--subset', '256',
                          '--probe_epochs', '0', '--use_lpips', 'false', '--workers', '1', '--seed', '3', '--out_dir', str(out)]) == 0
    rep = json.loads((out / 'eval.json').read_text())['representation']['demo']
    assert rep['random_init_floor']['knn']['top1'] == pytest.approx(floor)


# --- the out_dir: only an empty folder or evaluate.py's own; checked under the lock -----------------------------

def files(folder):
    """{name: bytes} of every file in a folder (what a refused run must leave as it was)."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_another_runs_folder_is_refused_and_left_as_it_was(ckpt, tmp_path, capsys, monkeypatch):
    """Pointed at a pre-training run's folder (its ckpt.pt, log.jsonl, pictures), evaluate.py refuses in one line and
    changes nothing; a folder holding only another script's log.jsonl is refused too."""
    run_dir = tmp_path / 'pretrain_run'
    shutil.copytree(os.path.dirname(ckpt), run_dir)
    before = files(run_dir)
    code, err = run_cli(evaluate.main, ['--ckpt', run_dir / 'ckpt.pt', '--out_dir', run_dir], capsys, monkeypatch,
                        script='evaluate.py')
    one_line_error(code, err, f'out_dir {run_dir} holds files evaluate.py did not write (ckpt.pt, '
                   'curves.png, recon_ep0001.png and 1 more)',
                   'choose another --out_dir')
    assert code == 2 and files(run_dir) == before, "a refused evaluation changed the run's folder"
    only_log = tmp_path / 'only_log'
    only_log.mkdir()
    shutil.copy(run_dir / 'log.jsonl', only_log / 'log.jsonl')
    code, err = run_cli(evaluate.main, ['--ckpt', run_dir / 'ckpt.pt', '--out_dir', only_log], capsys, monkeypatch,
                        script='evaluate.py')
    one_line_error(code, err, "(log.jsonl (another script's log))")
    assert files(only_log) == {'log.jsonl': before['log.jsonl']}


def test_the_lock_is_taken_before_the_folder_is_checked(ckpt, tmp_path, monkeypatch):
    """No gap between the check of the folder and the lock: another run cannot slip in between."""
    order = []
    real_lock, real_check = common.lock_out_dir, evaluate.check_own_folder
    monkeypatch.setattr(common, 'lock_out_dir', lambda *a: order.append('lock') or real_lock(*a))
    monkeypatch.setattr(evaluate, 'check_own_folder', lambda *a: order.append('check') or real_check(*a))
    monkeypatch.setattr(evaluate, 'evaluate', lambda *a: 0)
    assert evaluate.main(['--ckpt', ckpt, '--out_dir', tmp_path / 'ev']) == 0
    assert order == ['lock', 'check']


def test_a_refused_run_leaves_no_folder_it_created(ckpt, tmp_path, capsys, monkeypatch):
    """Missing data is refused before anything is created; a failure after the lock removes the (empty) folders
    the run created, and only those."""
    out = tmp_path / 'kept' / 'new' / 'deeper' / 'eval'
    (tmp_path / 'kept').mkdir()
    code, err = run_cli(evaluate.main, ['--ckpt', ckpt, '--dataset', 'tin', '--data_dir', tmp_path / 'nodata',
                                        '--out_dir', out], capsys, monkeypatch, script='evaluate.py')
    one_line_error(code, err, 'dataset folder', 'not found')
    assert os.listdir(tmp_path / 'kept') == []

    def fails(*args):
        raise common.UserError("something after the lock failed")
    monkeypatch.setattr(evaluate, 'evaluate', fails)
    one_line_error(*run_cli(evaluate.main, ['--ckpt', ckpt, '--out_dir', out], capsys, monkeypatch,
                            script='evaluate.py'), 'something after the lock failed')
    assert os.listdir(tmp_path / 'kept') == [], "the refused run left the folders it created"


def test_a_moved_run_folder_is_evaluated_in_place(ckpt, tmp_path, capsys):
    """The evaluation beside a checkpoint is recognised as its own after the run folder is moved (the checkpoint's
    identity is its weights, not its path), and it is evaluated again there. A probe on fewer training images than
    its batch uses them all in one batch, with the lr scaled to that batch. The dataset is the checkpoint's."""
    run_dir = tmp_path / 'run'
    shutil.copytree(os.path.dirname(ckpt), run_dir)
    argv = ['--probe_epochs', 1, '--subset', 64, '--max_images', 32, '--workers', 1, '--use_lpips', 'false']
    assert evaluate.main(['--ckpt', str(run_dir / 'ckpt.pt')] + argv) == 0
    first = json.loads((run_dir / 'eval' / 'eval.json').read_text())
    printed = capsys.readouterr().out
    assert 'from the checkpoint: dataset demo, img_size 32' in printed  # no --dataset: the checkpoint's
    assert 'batch: 128 is more than the 64 training images, so the head trains on batches of 64' in printed
    assert first['representation']['demo']['model']['probe']['batch_size'] == 64
    os.rename(run_dir, tmp_path / 'renamed')
    assert evaluate.main(['--ckpt', str(tmp_path / 'renamed' / 'ckpt.pt')] + argv) == 0
    again = json.loads((tmp_path / 'renamed' / 'eval' / 'eval.json').read_text())
    assert again['checkpoint_id'] == first['checkpoint_id']
    assert again['checkpoint'].startswith(str(tmp_path / 'renamed'))
    logged = [json.loads(line) for line in open(tmp_path / 'renamed' / 'eval' / 'log.jsonl')]
    assert [r['script'] for r in logged if r['event'] == 'start'] == ['evaluate', 'evaluate']
    assert sorted(os.listdir(tmp_path / 'renamed' / 'eval')) == ['eval.json', 'eval.md', 'log.jsonl', 'recon.png']


# --- signals and the metric workers ---------------------------------------------------------------------------

def workers_of(pid):
    """The pids of a process's metric worker processes (multiprocessing spawn children, not its resource tracker)."""
    children = open(f'/proc/{pid}/task/{pid}/children').read().split()
    def cmdline(c):
        with contextlib.suppress(OSError):  # it ended meanwhile (importing torch runs ldconfig, for one)
            return open(f'/proc/{c}/cmdline').read()
        return ''
    return [int(c) for c in children if 'spawn_main' in cmdline(c)]


def alive(pid):
    return os.path.exists(f'/proc/{pid}') and open(f'/proc/{pid}/stat').read().split()[2] != 'Z'


def waiting_for_work(pid):
    """Whether a worker is blocked reading its next task (it has started and scores)."""
    with contextlib.suppress(OSError):
        return 'read' in open(f'/proc/{pid}/wchan').read()


@pytest.mark.parametrize('sig, when, code, line', [
    (signal.SIGTERM, 'scoring', 143, 'evaluate.py: stopped by SIGTERM'),
    (signal.SIGINT, 'starting', 130, 'evaluate.py: interrupted')],
    ids=['sigterm_while_scoring', 'ctrl_c_while_starting'])
def test_a_stop_signal_to_the_process_group_ends_evaluate_and_its_workers(sig, when, code, line, ckpt, tmp_path):
    """A signal to the whole process group (a scheduler's SIGTERM, a terminal's Ctrl-C) while scikit-image's workers
    start or score: evaluate.py exits 128 + signal with one line, its workers are gone and no result file is written.
    (With multiprocessing.Pool, the SIGTERM hung forever in Pool.terminate() once it had killed a worker waiting for
    work, and the Ctrl-C printed a traceback from each starting worker.)"""
    out = tmp_path / 'ev'
    argv = ['--ckpt', ckpt, '--workers', 2, '--feature_batch', 8, '--probe_epochs', 0, '--use_lpips', 'false',
            '--out_dir', out]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'evaluate.py')] + [str(a) for a in argv], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    try:
        t0, workers = time.time(), []
        while len(workers) < 2 and time.time() - t0 < 120 and proc.poll() is None:
            workers = workers_of(proc.pid)
            time.sleep(0.02)
        assert len(workers) == 2, "the workers never started"
        while when == 'scoring' and not any(map(waiting_for_work, workers)) and time.time() - t0 < 180:
            time.sleep(0.01)
        assert proc.poll() is None, "the evaluation ended before the signal"
        os.killpg(proc.pid, sig)
        err = proc.communicate(timeout=60)[1]
    finally:  # a hung evaluation (the bug this test is for) must not outlive the test
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == code and err.strip().splitlines() == [line], err[-2000:]
    time.sleep(0.5)
    assert not [w for w in workers if alive(w)], "a worker outlived evaluate.py"
    assert not set(os.listdir(out)) - {'log.jsonl'}, os.listdir(out)  # no result, no half-written file


def test_workers_ignore_ctrl_c_and_one_killed_on_its_own_is_one_line_and_every_worker_is_reaped():
    """A Ctrl-C reaches the whole process group: the workers, still starting or running, leave it to evaluate.py
    (which ends them). A worker that dies alone (the out-of-memory killer) is one line naming its exit code, not a
    hang or a traceback; leaving the block kills and reaps the others."""
    target = np.zeros((2, 16, 16, 3), np.float32)
    task = ({'model': target + 0.5}, target)
    with evaluate.MetricWorkers(2) as workers:
        procs = list(workers.procs)
        for proc in procs:  # while they start (importing takes seconds)
            os.kill(proc.pid, signal.SIGINT)
        workers.send(task)
        assert workers.receive(0)['model'][0] == pytest.approx(2 * 10 * math.log10(1 / 0.25))  # PSNR 6.02 dB, twice
        os.kill(procs[0].pid, signal.SIGINT)  # while they run
        for i in (1, 2):
            workers.send(task)
            assert workers.receive(i)['model'][0] == pytest.approx(12.04, abs=0.01)
        os.kill(procs[1].pid, signal.SIGKILL)
        procs[1].join(30)
        with pytest.raises(common.UserError, match=r'a scikit-image worker process ended unexpectedly \(exit code -9'):
            workers.send(task)
            workers.receive(3)
    assert not [p for p in procs if p.is_alive()]


def test_a_worker_whose_evaluation_ended_leaves_at_once_and_quietly(capfd):
    """evaluate.py killed (kill -9) while its workers still import: PR_SET_PDEATHSIG is set only once a worker runs
    its code, so a worker that finds its parent gone then, or its pipe closed later, leaves with exit 0 and no
    traceback (it printed an EOFError traceback for each worker, seconds after the kill)."""
    ctx = multiprocessing.get_context('spawn')
    mine, theirs = ctx.Pipe()
    orphan = ctx.Process(target=evaluate._metrics_worker, args=(ctx.Pipe()[1], dead_pid()))  # its parent is gone
    closed = ctx.Process(target=evaluate._metrics_worker, args=(theirs, os.getpid()))
    orphan.start()
    closed.start()
    theirs.close()
    mine.close()  # as when the evaluation process ends
    for proc in (orphan, closed):
        proc.join(60)
        assert proc.exitcode == 0
    assert 'Traceback' not in capfd.readouterr().err


def dead_pid():
    proc = subprocess.Popen(['true'])
    proc.wait()
    return proc.pid


def test_a_stop_signal_while_the_workers_start_is_raised_once_all_have_started(monkeypatch):
    """A SIGTERM that another thread receives (the run's progress thread) while the workers start waits until each
    of them has started, then stops the script as usual: never in the middle of a Process.start(), which could
    leave a starting worker that nothing ends. Every worker is reaped."""
    go, sent, started = threading.Event(), threading.Event(), []

    def sender():  # started before the workers, so it does not block the signal as the starting thread does
        go.wait()
        os.kill(os.getpid(), signal.SIGTERM)
        sent.set()
    threading.Thread(target=sender, daemon=True).start()
    real_start = multiprocessing.context.SpawnProcess.start

    def start_with_a_signal(self):
        if not go.is_set():  # the first start: the signal arrives through the other thread
            go.set()
            sent.wait()
            time.sleep(0.05)
        real_start(self)
        started.append(self.pid)
    monkeypatch.setattr(multiprocessing.context.SpawnProcess, 'start', start_with_a_signal)
    on_sigterm = signal.signal(signal.SIGTERM, common._stop)  # as common.cli sets it
    try:
        workers = evaluate.MetricWorkers(2)
        with pytest.raises(common.Stopped):
            with workers:
                pass
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)
    assert len(started) == 2 and not [p for p in workers.procs if p.is_alive()]


# --- pictures ----------------------------------------------------------------------------------------------------

def test_a_full_disk_while_writing_the_picture_is_one_line_and_keeps_the_previous_one(ckpt, tmp_path, capsys,
                                                                                      monkeypatch):
    out = tmp_path / 'ev'
    argv = eval_argv(ckpt, out, '--probe_epochs', 0, '--workers', 1, '--use_lpips', 'false', '--max_images', 32)
    assert evaluate.main(argv) == 0
    before = files(out)
    real_fsync = os.fsync

    def disk_full_for_pictures(fd):
        if '.png' in os.readlink(f'/proc/self/fd/{fd}'):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)
    monkeypatch.setattr(os, 'fsync', disk_full_for_pictures)
    code, err = run_cli(evaluate.main, argv, capsys, monkeypatch, script='evaluate.py')
    one_line_error(code, err, f'could not write {out}/recon.png (No space left on device); the previous recon.png is '
                              f'intact')
    assert code == 2
    after = files(out)
    assert {k: v for k, v in after.items() if k != 'log.jsonl'} == {k: v for k, v in before.items() if k != 'log.jsonl'}
    assert after['log.jsonl'].startswith(before['log.jsonl'])  # the log only grew: no half-written or lost file


def test_the_picture_shows_trainings_images_and_masks_with_figures_and_says_why_the_raw_output_is_noise(
        tmp_path, monkeypatch):
    """evaluate.py's recon.png shows the images and masks of pretrain.py's pictures (same tensors, mask ratio,
    strategy and seed, even when --seed and --max_images differ), with each row's PSNR / SSIM beside its floors and
    the split's figures; the raw output's column and a note say that MAE never trains the visible patches."""
    calls, texts = [], []
    real_grid, real_text = evaluate.reconstruction_grid, ImageDraw.ImageDraw.text
    monkeypatch.setattr(evaluate, 'reconstruction_grid', lambda mae, imgs, *a, **k: calls.append(
        (imgs.clone(), a[:3], k.get('caption', ''))) or real_grid(mae, imgs, *a, **k))
    monkeypatch.setattr(ImageDraw.ImageDraw, 'text', lambda self, xy, text, *a, **k: texts.append(text) or
                        real_text(self, xy, text, *a, **k))
    argv = TINY + ['--out_dir', str(tmp_path / 'pre'), '--data_dir', str(tmp_path / 'data'), '--epochs', '1',
                   '--subset', '64', '--seed', '3']
    assert pretrain.main(argv) == 0
    training_texts, texts[:] = list(texts), []
    assert evaluate.main(['--ckpt', str(tmp_path / 'pre' / 'ckpt.pt'), '--subset', 64, '--max_images', 40,
                          '--probe_epochs', 0, '--workers', 1, '--use_lpips', 'false', '--seed', 0]) == 0
    (train_imgs, train_args, _), (eval_imgs, eval_args, caption) = calls
    assert torch.equal(train_imgs, eval_imgs) and len(eval_imgs) == 8 and train_args == eval_args == (0.75, 'random', 3)
    rec = json.loads((tmp_path / 'pre' / 'eval' / 'eval.json').read_text())['reconstruction']
    for kind in evaluate.KINDS:  # the split's figures
        assert f"{evaluate.SHORT.get(kind, kind)} {rec[kind]['psnr']:.2f} / {rec[kind]['ssim']:.3f}" in caption
    for drawn in (training_texts, texts):  # (wrapped lines, drawn one after another)
        words = ' '.join(drawn)
        assert 'raw output (visible patches: never trained)' in words
        assert "MAE's loss covers only the masked patches, so the model is never trained to reproduce" in words
        for name in ('model', 'mean colour', 'interpolation'):  # each row: PSNR / SSIM of the image, and its floors
            rows = [t for t in drawn if re.fullmatch(rf'{name} \d+\.\d\d / -?[01]\.\d\d\d', t)]
            assert len(rows) == 8, (name, drawn)
