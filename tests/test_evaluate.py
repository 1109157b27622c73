"""evaluate.py: metrics equal direct scikit-image / lpips calls, kNN equals a brute-force vote, floors behave,
LPIPS and a missing transfer dataset degrade to one line, and the whole command runs on the demo data."""
import contextlib
import json
import math
import urllib.error
from types import SimpleNamespace

import lpips
import pytest
import torch
import torchvision
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import common
import data
import evaluate
import model as M
import pretrain
from conftest import TINY

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
                   '--val_images', '384', '--seed', '3']
    assert pretrain.main(argv) == 0
    logged = [json.loads(line) for line in open(tmp_path / 'pre' / 'log.jsonl')]
    floor = next(r for r in logged if r['event'] == 'knn' and r['what'].startswith('floor'))['top1']
    out = tmp_path / 'eval'
    assert evaluate.main(['--ckpt', str(tmp_path / 'pre' / 'ckpt.pt'), '--dataset', 'demo', '--subset', '256',
                          '--probe_epochs', '0', '--use_lpips', 'false', '--workers', '1', '--seed', '3', '--out_dir', str(out)]) == 0
    rep = json.loads((out / 'eval.json').read_text())['representation']['demo']
    assert rep['random_init_floor']['knn']['top1'] == pytest.approx(floor)
