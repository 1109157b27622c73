"""
Score a pre-training checkpoint the way the study and the second seed do, with a floor beside every number.

    python evaluate.py --ckpt out/pretrain/ckpt.pt                      # TIN val, + kNN on CUB when it is on disk
    python evaluate.py --ckpt out/pretrain/ckpt.pt --probe_epochs 0     # skip the linear probe

Reconstruction (val split, masks fixed by --seed, the checkpoint's mask ratio and strategy unless overridden):
PSNR and SSIM with scikit-image (SSIM with a Gaussian window, sigma 1.5, as in Wang et al. and most papers), LPIPS
(AlexNet) with the lpips package, on the image whose visible patches come from the input and masked ones from the
model, against the original; plus the masked-patch MSE (the MAE loss). Floors: the same masks filled with the mean
colour of the visible pixels, and by interpolation from the visible pixels (normalised convolution).
Representation: weighted kNN (DINO's: cosine, k=20, T=0.07) and the study's linear probe (probe.py's code), each
beside two floors computed on the same split: the run's own randomly initialised encoder (from its seed), and raw
pixels (the images at 32x32). kNN also on a transfer dataset (CUB for a TIN checkpoint) when it is on disk.
Writes <out_dir>/eval.json, eval.md (the table, also printed) and recon.png; out_dir defaults to
<checkpoint folder>/eval, and an evaluation of another checkpoint there is never overwritten.
"""
import collections
import contextlib
import io
import json
import math
import multiprocessing
import os
import signal
import socket
import time
import warnings
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import common
import data
import model as M
import probe

# -----------------------------------------------------------------------------
# config
ckpt = ''                   # the pretrain.py (or dino.py) checkpoint to score (required)
dataset = ''                # tin | cub | demo | synthetic; '' = the checkpoint's pre-training dataset
data_dir = 'data'           # where tiny-imagenet-200/ and CUB_200_2011/ live
download = False            # fetch a missing official archive into data_dir
transfer_dataset = 'auto'   # extra kNN dataset: auto (cub when evaluating tin, else none) | none | a dataset name
img_size = 0                # model input resolution; 0 = the checkpoint's (images are resized on the device)
mask = 0.0                  # mask ratio for the reconstruction metrics; 0 = the checkpoint's
masking = ''                # random | block; '' = the checkpoint's
max_images = 0              # >0: a fixed random subset of this many val images (reconstructions, kNN queries, probe)
subset = 0                  # >0: a fixed random subset of this many train images (kNN bank, probe training)
use_lpips = True            # LPIPS needs torchvision's ImageNet AlexNet weights (fetched once into torch hub's cache)
workers = 0                 # processes for scikit-image's PSNR/SSIM; 0 = one per CPU core but one (at most 15); 1 = none
knn_k = 20                  # neighbours of the weighted kNN (DINO)
knn_temperature = 0.07      # vote weight exp(cosine / T) (DINO)
pool = 'cls'                # feature for kNN and the probe: cls token | mean of the patch tokens
probe_epochs = 50           # linear probe epochs (the study's: 50); 0 = skip the probe
feature_batch = 256         # images per forward pass (reconstructions, features)
device = 'auto'             # auto (cuda if available) | cuda | cuda:N | cpu
dtype = 'bfloat16'          # autocast on CUDA for the model forwards: bfloat16 | float16 | float32; metrics in fp32
seed = 0                    # fixes the masks, the random-init floor and the probe's initialisation and order
out_dir = ''                # eval.json, eval.md, recon.png, log.jsonl; '' = <checkpoint folder>/eval
# -----------------------------------------------------------------------------

PSNR_CAP_DB = 100.0         # PSNR of an exact reconstruction is infinite; each image's PSNR is capped here
PIXEL_FLOOR_SIZE = 32       # the raw-pixel representation floor: each image area-resized to 32x32, flattened
PROBE_RECIPE = dict(warmup_epochs=2, batch_size=128, lr=1e-3, betas=(0.9, 0.95))  # the study's (Adam, no wd)
# the study's linear probe top-1 on TIN by mask ratio (ViT-Lite-7/4, random masking, 200-epoch pre-training)
PAPER_PROBE_TIN = {0.5: 31.32, 0.6: 32.03, 0.65: 32.32, 0.7: 30.58, 0.75: 32.04, 0.8: 31.66, 0.85: 29.61, 0.9: 28.14}
SECOND_SEED = dict(psnr=23.08, ssim=0.6663)  # ViT-B/16, 75% random masking, TIN, 24 epochs
KINDS = ('model', 'mean_colour_floor', 'interpolation_floor')  # the three images scored against the original
KIND_NAMES = {'model': 'model (visible patches pasted)', 'mean_colour_floor': 'floor: mean colour of the visible pixels',
              'interpolation_floor': 'floor: interpolation from the visible pixels'}
FEATURES = ('model', 'random_init_floor', 'pixel_floor')  # the three representations scored by kNN and the probe
FEATURE_NAMES = {'model': 'model', 'random_init_floor': "floor: the run's initial (random) encoder",
                 'pixel_floor': f'floor: raw pixels at {PIXEL_FLOOR_SIZE}x{PIXEL_FLOOR_SIZE}'}
SHORT = {'mean_colour_floor': 'mean colour', 'interpolation_floor': 'interpolation', 'random_init_floor': 'random init',
         'pixel_floor': 'raw pixels'}  # the floors' names in a verdict
LABEL_FONT = 14             # point size of the labels in recon.png


# -----------------------------------------------------------------------------
# image metrics


def to_hwc(x):
    """(N, 3, H, W) tensor in [0, 1] -> float32 numpy (N, H, W, 3), the layout scikit-image takes."""
    return x.detach().float().permute(0, 2, 3, 1).contiguous().cpu().numpy()


def image_metrics(pred01, target01):
    """Per-image PSNR (capped at PSNR_CAP_DB) and SSIM of (N, H, W, 3) float images in [0, 1] by scikit-image, with
    SSIM's usual convention (Gaussian window sigma 1.5, population covariance: Wang et al. 2004)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    psnr, ssim = np.empty(len(pred01)), np.empty(len(pred01))
    for i in range(len(pred01)):
        with np.errstate(divide='ignore'):  # identical images: MSE 0, PSNR inf
            psnr[i] = min(peak_signal_noise_ratio(target01[i], pred01[i], data_range=1.0), PSNR_CAP_DB)
        ssim[i] = structural_similarity(target01[i], pred01[i], data_range=1.0, channel_axis=-1,
                                        gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    return psnr, ssim


def _metrics_chunk(preds, target):
    """Pool task: {kind: (psnr sum, ssim sum)} for a chunk of images scored against the same originals."""
    return {kind: tuple(m.sum() for m in image_metrics(p, target)) for kind, p in preds.items()}


def _pool_worker_init():
    common.die_with_parent()                      # the worker ends when the evaluation process does
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


# -----------------------------------------------------------------------------
# LPIPS and the floors: the masked pixels filled without a model


def load_lpips(device):
    """-> (LPIPS AlexNet on device, None) or (None, one-line reason). Never falls back to an untrained backbone:
    lpips asks torchvision for the ImageNet AlexNet, which downloads it when it is not cached, and fails offline."""
    try:
        import lpips
    except ImportError:
        return None, "LPIPS unavailable: the lpips package is not installed (pip install lpips)"
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(data.DOWNLOAD_TIMEOUT)  # a blocked network fails in seconds instead of hanging
    try:
        quiet = io.StringIO()  # torch.hub's "Downloading ..." line and progress bar: the notice below says it all
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            warnings.simplefilter('ignore')  # torchvision's deprecation of `pretrained`
            net = lpips.LPIPS(net='alex', pretrained=True, pnet_rand=False, verbose=False)
    except Exception as e:
        why = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
        where = os.path.join(torch.hub.get_dir(), 'checkpoints', 'alexnet-owt-7be5be79.pth')
        return None, (f"LPIPS unavailable: torchvision's ImageNet AlexNet weights could not be fetched ({why}); "
                      f"put alexnet-owt-7be5be79.pth at {where} to enable it")
    finally:
        socket.setdefaulttimeout(old_timeout)
    return net.eval().requires_grad_(False).to(device), None


@torch.no_grad()
def lpips_distance(lpips_net, pred01, target01):
    """Per-image LPIPS (N,) of (N, 3, H, W) images in [0, 1], fed to the network in [-1, 1], in float32."""
    return lpips_net(pred01.float() * 2 - 1, target01.float() * 2 - 1).flatten()


def mean_colour_fill(img01, visible):
    """Masked pixels (visible == 0; visible is (N, 1, H, W)) set to the mean colour of the image's visible pixels."""
    mean = (img01 * visible).sum((2, 3), keepdim=True) / visible.sum((2, 3), keepdim=True).clamp_min(1)
    return img01 * visible + mean * (1 - visible)


def interpolation_fill(img01, visible, sigma=1.0):
    """Masked pixels interpolated from the visible ones by normalised convolution, growing inward: each pass
    blurs the known values and the known-mask with a Gaussian (sigma, radius 2 sigma) and fills every unknown
    pixel that has a known one within reach with blur(values) / blur(mask); repeated until all are filled."""
    r = max(1, math.ceil(2 * sigma))
    kernel = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32, device=img01.device) ** 2 / (2 * sigma ** 2))
    kernel, C = kernel / kernel.sum(), img01.shape[1] + 1  # C: the values and the known-mask, blurred together
    rows, cols = kernel.view(1, 1, 1, -1).repeat(C, 1, 1, 1), kernel.view(1, 1, -1, 1).repeat(C, 1, 1, 1)
    known = visible.float().clone()
    values = img01.float() * known
    for _ in range(max(img01.shape[-2:])):  # each pass reaches r pixels further into the holes
        if bool(known.all()):
            break
        # separable depthwise blur with zero padding (outside the image counts as unknown)
        blurred = F.conv2d(torch.cat([values, known], dim=1), rows, padding=(0, r), groups=C)
        blurred = F.conv2d(blurred, cols, padding=(r, 0), groups=C)
        num, den = blurred[:, :-1], blurred[:, -1:]
        grow = (known == 0) & (den > 1e-6)
        values = torch.where(grow, num / den.clamp_min(1e-6), values)
        known = torch.where(grow, torch.ones_like(known), known)
    return img01 * visible + values * (1 - visible)


# -----------------------------------------------------------------------------
# reconstruction metrics over a split


@torch.no_grad()
def reconstruction_metrics(mae, split, mask_ratio, masking_kind, cfg, run, lpips_net):
    """Averages over the split of PSNR / SSIM / LPIPS for the model and both floors, and the masked-patch MSE.
    The masks are one draw for the whole split from a generator seeded with cfg.seed, so they depend on (seed,
    image index) only, not on the batch size. scikit-image runs in a process pool while the device computes on;
    the pool's workers end with this process, however it ends."""
    device, mc, n = run.device, mae.cfg, len(split.labels)
    mae.eval()
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    noise_all = mae.masking_noise(n, mask_ratio, masking_kind, generator=g, device=device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    n_workers = cfg.workers or max(1, min(cores, 16) - 1)  # one core left for this process
    pool = (multiprocessing.get_context('spawn').Pool(n_workers, initializer=_pool_worker_init)  # spawn: CUDA-safe
            if n_workers > 1 else None)
    pending, progress = collections.deque(), common.Progress('image', n, run, 'reconstruction metrics').start()
    sums = {kind: dict(psnr=0.0, ssim=0.0, lpips=0.0) for kind in KINDS}
    mse_sum, start = torch.zeros((), device=device, dtype=torch.float64), 0

    def collect(result):
        for kind, (psnr, ssim) in (result.get() if pool else result).items():
            sums[kind]['psnr'] += psnr
            sums[kind]['ssim'] += ssim
    try:
        for x, _ in data.iterate_batches(split.images, None, cfg.feature_batch, device, img_size=mc.img_size):
            noise, start = noise_all[start:start + len(x)], start + len(x)
            with run.autocast:
                _, pred, mask = mae(x, mask_ratio, noise=noise)
            mse_sum += mae.forward_loss(x, pred, mask, on_all=False).double() * x.shape[0]
            _, pasted = mae.reconstruct(x, pred, mask)                    # normalised space, float32
            visible = 1 - mae.pixel_mask(mask)                            # (N, 1, H, W), 1 = visible
            target = data.denormalize(x).clamp(0, 1)
            images = {'model': data.denormalize(pasted).clamp(0, 1),
                      'mean_colour_floor': mean_colour_fill(target, visible),
                      'interpolation_floor': interpolation_fill(target, visible, sigma=max(1.0, mc.patch_size / 4))}
            if lpips_net is not None:
                for kind, img in images.items():
                    sums[kind]['lpips'] += lpips_distance(lpips_net, img, target).sum().item()
            # scikit-image on the CPU: chunks for the pool, at most 2 per worker waiting (bounded memory)
            target_np, preds_np = to_hwc(target), {kind: to_hwc(img) for kind, img in images.items()}
            step = math.ceil(len(target_np) / n_workers)
            for i in range(0, len(target_np), step):
                chunk = ({k: p[i:i + step] for k, p in preds_np.items()}, target_np[i:i + step])
                pending.append(pool.apply_async(_metrics_chunk, chunk) if pool else _metrics_chunk(*chunk))
                while len(pending) > 2 * n_workers:
                    collect(pending.popleft())
            progress.update(start)
        while pending:
            collect(pending.popleft())
    finally:
        progress.stop()
        if pool is not None:
            pool.terminate()  # kills the workers now, also when an error or a signal unwinds this
            pool.join()
    out = {kind: dict(psnr=_finite(s['psnr'] / n), ssim=_finite(s['ssim'] / n),
                      lpips=_finite(s['lpips'] / n) if lpips_net is not None else None) for kind, s in sums.items()}
    out['masked_mse'] = _finite(mse_sum.item() / n)
    return out


def _finite(x):
    """A float for JSON, or None where it is NaN or infinite (a diverged checkpoint)."""
    return float(x) if math.isfinite(x) else None


@torch.no_grad()
def reconstruction_grid(mae, imgs, mask_ratio, masking, seed, path, title, scale=3):
    """A PNG a person can read: one row per image, labelled columns (upscaled `scale` times, nearest) and a title line.
    imgs are normalised (N, 3, H, W) on the model's device; the masks are fixed by `seed`, so pictures of successive
    epochs show the same masks."""
    was_training = mae.training
    mae.eval()
    g = torch.Generator(device=imgs.device).manual_seed(seed)
    noise = mae.masking_noise(len(imgs), mask_ratio, masking, generator=g, device=imgs.device)
    imgs = imgs.float()
    _, pred, mask = mae(imgs, mask_ratio, noise=noise)
    recon, pasted = mae.reconstruct(imgs, pred, mask)
    pix_mask = mae.pixel_mask(mask)                                        # (N, 1, H, W), 1 = masked
    orig = data.denormalize(imgs).clamp(0, 1)
    cols = [orig * (1 - pix_mask) + 0.5 * pix_mask,                        # masked patches shown grey
            data.denormalize(recon).clamp(0, 1), data.denormalize(pasted).clamp(0, 1), orig]
    mae.train(was_training)
    grid = torch.stack(cols, dim=1)                                         # (N, 4, 3, H, W)
    N, _, _, H, W = grid.shape
    cell, pad, top = H * scale, 4, 2 * LABEL_FONT + 14
    canvas = Image.new('RGB', (4 * (cell + pad) + pad, top + N * (cell + pad) + pad), 'white')
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=LABEL_FONT)
    draw.text((pad, 2), f"{title} | mask {mask_ratio:g} {masking}", fill='black', font=font)
    pixels = (grid * 255).round().byte().permute(0, 1, 3, 4, 2).cpu().numpy()  # (N, 4, H, W, 3)
    for c, label in enumerate(('masked input', 'reconstruction', 'visible pasted', 'original')):
        draw.text((pad + c * (cell + pad), LABEL_FONT + 8), label, fill='black', font=font)
        for r in range(N):
            tile = Image.fromarray(pixels[r, c]).resize((W * scale, cell), Image.NEAREST)
            canvas.paste(tile, (pad + c * (cell + pad), top + r * (cell + pad)))
    tmp = f"{path}.tmp.{os.getpid()}.png"
    canvas.save(tmp)
    os.replace(tmp, path)
    return path


# -----------------------------------------------------------------------------
# representation metrics


@torch.no_grad()
def knn_classify(train_feats, train_labels, test_feats, test_labels, num_classes, k=20, temperature=0.07, chunk=1024):
    """DINO's weighted kNN: cosine similarity to the bank, the k nearest vote for their class with weight
    exp(sim / T), classes ranked by summed votes. -> dict(top1, top5) in percent. Chunked over the queries, so memory
    is chunk x bank. A class with no votes never counts as a hit (DINO's sort would rank such ties arbitrarily)."""
    bank, queries = F.normalize(train_feats.float(), dim=1), F.normalize(test_feats.float(), dim=1)
    train_labels, test_labels = train_labels.to(bank.device), test_labels.to(bank.device)
    k, top = min(k, bank.shape[0]), min(5, num_classes)
    hits1, hits5 = 0, 0
    for i in range(0, queries.shape[0], chunk):
        sims, idx = (queries[i:i + chunk] @ bank.T).topk(k, dim=1)      # (B, k)
        votes = torch.zeros(sims.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())  # (B, C)
        ranked_votes, ranked = votes.topk(top, dim=1)                   # (B, top)
        hit = (ranked == test_labels[i:i + chunk, None]) & (ranked_votes > 0)
        hits1 += hit[:, 0].sum().item()
        hits5 += hit.any(dim=1).sum().item()
    n = max(queries.shape[0], 1)
    return dict(top1=100.0 * hits1 / n, top5=100.0 * hits5 / n)


def knn_top1(encoder, bank, queries, run, batch_size=256):
    """kNN top-1 (%) of an encoder: `bank` (a data.Split) votes for the classes of `queries`; what pretrain.py
    and dino.py log at each checkpoint. Leaves the encoder in eval mode."""
    kw = dict(batch_size=batch_size, autocast=run.autocast, progress=run)
    bank_f, query_f = (probe.extract_features(encoder, s.images, s.labels, run.device, **kw) for s in (bank, queries))
    return knn_classify(*bank_f, *query_f, bank.num_classes)


def pixel_features(split, device, batch_size=1024):
    """The raw-pixel floor: each image area-resized to PIXEL_FLOOR_SIZE, normalised and flattened -> (N, 3*S*S)."""
    feats = [F.adaptive_avg_pool2d(x, PIXEL_FLOOR_SIZE).flatten(1)
             for x, _ in data.iterate_batches(split.images, None, batch_size, device)]
    return torch.cat(feats), split.labels.to(device)


def representation(encoder, random_encoder, splits, cfg, run, probe_epochs):
    """kNN (and the linear probe, when probe_epochs > 0) of the model and its two floors on one dataset's
    train (bank / probe training) and val (queries / probe val) splits -> {feature kind: dict(knn=..., probe=...)}."""
    out, kw = {}, dict(batch_size=cfg.feature_batch, pool=cfg.pool, autocast=run.autocast, progress=run)
    for kind in FEATURES:
        t0 = time.time()
        net = {'model': encoder, 'random_init_floor': random_encoder}.get(kind)  # None: the raw-pixel floor
        feats = {s: pixel_features(split, run.device) if net is None else
                 probe.extract_features(net, split.images, split.labels, run.device, **kw) for s, split in splits.items()}
        knn = knn_classify(*feats['train'], *feats['val'], splits['train'].num_classes, k=cfg.knn_k,
                           temperature=cfg.knn_temperature)
        run.log(dict(event='knn', features=kind, **knn), f"kNN, {FEATURE_NAMES[kind]}: top-1 {knn['top1']:.2f}% "
                f"top-5 {knn['top5']:.2f}% ({time.time() - t0:.1f}s)")
        out[kind] = dict(knn=knn, probe=None)
        if probe_epochs > 0:
            t0 = time.time()
            recipe = dict(PROBE_RECIPE, warmup_epochs=min(PROBE_RECIPE['warmup_epochs'], probe_epochs - 1))
            head = probe.train_linear_head(*feats['train'], *feats['val'], splits['train'].num_classes,
                                           epochs=probe_epochs, seed=cfg.seed, progress=run, **recipe)
            out[kind]['probe'] = dict(top1=head['top1'], top5=head['top5'], best_top1=head['best_top1'],
                                      best_epoch=head['best_epoch'], epochs=probe_epochs)
            run.log(dict(event='linear_probe', features=kind, **out[kind]['probe']),
                    f"linear probe, {FEATURE_NAMES[kind]}: top-1 {head['top1']:.2f}% top-5 {head['top5']:.2f}% "
                    f"({probe_epochs} epochs, {time.time() - t0:.1f}s)")
    return out


def load_splits(name, cfg):
    """{'train', 'val'} of a dataset, limited to --subset train and --max_images val images (fixed by the seed)."""
    return {s: data.subset(data.load_split(name, s, cfg.data_dir, download=cfg.download), n, cfg.seed)
            for s, n in (('train', cfg.subset), ('val', cfg.max_images))}


# -----------------------------------------------------------------------------
# learning curves of a training run (pretrain.py, finetune.py and dino.py draw theirs at every checkpoint)


def read_log(out_dir):
    """The records of <out_dir>/log.jsonl in order. A resumed run's records replace those of the steps it repeats
    (what a stopped run logged after its last checkpoint); a torn last line (a killed run) is skipped."""
    records = []
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get('event') == 'start' and 'start step' in record:
                    records = [r for r in records if r.get('step', 0) <= record['start step']]
                records.append(record)
    return records


def learning_curves(out_dir):
    """The learning curves of the training run in out_dir, drawn from its log.jsonl against epochs: a matplotlib
    Figure (no pyplot state) with the train loss beside the val loss, the learning rate, and what the run logs
    besides: the kNN top-1 with its floor (the initial weights) as a dashed line (pretrain.py, dino.py), the val
    top-1 and top-5 (finetune.py), the teacher's entropy beside log K, that of a uniform output (dino.py)."""
    from matplotlib.figure import Figure  # imported where it draws, so that --help and one-line errors stay fast
    records = read_log(out_dir)
    start = next((r for r in records if r.get('event') == 'start'), {})
    train, evals, checkpoints, knns = ([r for r in records if r.get('event') == event]
                                       for event in ('train', 'eval', 'checkpoint', 'knn'))

    def series(rs, key, label):
        rs = [r for r in rs if isinstance(r.get(key), (int, float)) and 'epoch' in r]
        return [r['epoch'] for r in rs], [r[key] for r in rs], label

    floor = [r['top1'] for r in knns if str(r.get('what', '')).startswith('floor')]
    log_k = [float(start['log K'])] if 'log K' in start else []
    panels = [  # (title, y label, [(epochs, values, label)], [(level, label)] drawn as dashed lines)
        ('loss', 'loss', [series(train, 'loss', 'train'), series(evals, 'loss', 'val'),
                          series(checkpoints, 'val_loss', 'val (masked patches, fixed masks)')], []),
        ('learning rate', 'lr', [series(train, 'lr', 'lr')], []),
        ('teacher entropy', 'entropy (nats)', [series(train, 'teacher_entropy', "teacher's output")],
         [(k, f"log K = {k:.2f} (a uniform output)") for k in log_k]),
        ('kNN top-1 on the val images', 'top-1 (%)', [series(checkpoints, 'knn_top1', 'kNN top-1')],
         [(floor[-1], f"floor: the initial weights ({floor[-1]:.1f}%)")] if floor else []),
        ('val accuracy', 'accuracy (%)', [series(evals, 'top1', 'top-1'), series(evals, 'top5', 'top-5')], []),
    ]
    panels = [(title, ylabel, [s for s in lines if s[0]], levels) for title, ylabel, lines, levels in panels
              if any(s[0] for s in lines)]
    if not panels:
        raise ValueError(f"{out_dir}/log.jsonl holds no train or eval record yet")
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.4 * cols, 4.0 * rows), dpi=100, layout='constrained')
    last = max(r['epoch'] for r in train + evals if 'epoch' in r) if train or evals else 0
    fig.suptitle(f"{start.get('script', 'training')}: {out_dir}, epoch {last:g}", fontsize=13)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax, (title, ylabel, lines, levels) in zip(axes, panels):
        for epochs, values, label in lines:
            ax.plot(epochs, values, label=label, marker='o' if len(epochs) <= 50 else None, markersize=3)
        for level, label in levels:
            ax.axhline(level, linestyle='--', color='grey', label=label)
        ax.set(title=title, xlabel='epoch', ylabel=ylabel)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    for ax in axes[len(panels):]:  # the empty cell of an odd number of panels
        ax.set_visible(False)
    return fig


def write_learning_curves(out_dir, run):
    """<out_dir>/curves.png from the run's log.jsonl, rendered with Agg and written atomically. A failure to draw is
    one line: a picture is never worth a run."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # (imported here: see learning_curves)
        png = io.BytesIO()
        FigureCanvasAgg(learning_curves(out_dir)).print_png(png)
        common.save_atomic(png.getvalue(), os.path.join(out_dir, 'curves.png'))
    except Exception as e:
        run.print(f"curves.png not written ({type(e).__name__}: {str(e)[:200]})")


# -----------------------------------------------------------------------------
# references and the table


def references(ck, dataset_name, mask_ratio, masking_kind):
    """The paper's and the second seed's numbers that apply to this evaluation, each with its setting."""
    if dataset_name != 'tin':
        return {}
    ck_cfg, mc, epochs, refs = ck['config'], ck['model_config'], ck.get('epoch'), {}
    if masking_kind == 'random' and round(mask_ratio, 2) in PAPER_PROBE_TIN:
        here = [ck_cfg.get('model')] if ck_cfg.get('model') != 'vit_lite' else []
        here += [f"{epochs:g} ep"] if epochs is not None and round(epochs) != 200 else []
        here += [f"SMAE alpha {ck_cfg['alpha']:g}"] if ck_cfg.get('alpha', 0) else []
        refs['linear_probe_top1'] = dict(value=PAPER_PROBE_TIN[round(mask_ratio, 2)], source=(
            f"paper: ViT-Lite-7/4, 200 ep, mask {mask_ratio:g} random" + (f"; here: {', '.join(here)}" if here else "")))
    same = (ck_cfg.get('model') == 'vit_base' and mc.get('patch_size') == 16 and abs(mask_ratio - 0.75) < 1e-9
            and masking_kind == 'random')
    source = "second seed: ViT-B/16, mask 0.75 random, 24 ep" if same else "second seed (ViT-B/16, different setting)"
    refs.update({metric: dict(value=value, source=source) for metric, value in SECOND_SEED.items()})
    return refs


def fmt(x, spec, none='unavailable'):
    return none if x is None else format(x, spec)


def verdict(metric, value, floors):
    """In words, the floors ({kind: value}) that the model's value does not beat: '**SSIM not above the floors: mean
    colour, interpolation**', or '' when it beats them all."""
    below = [SHORT[k] for k, f in floors.items() if value is not None and f is not None and value <= f]
    return f"**{metric} not above the floor{'s' if len(below) > 1 else ''}: {', '.join(below)}**" if below else ''


def markdown(res):
    refs, rec = res['references'], res['reconstruction']
    lines = [f"## evaluate.py: {res['checkpoint']}", "",
             f"{res['model']} (img {res['img_size']}, patch {res['patch_size']}), epoch {res['epoch']:g} · "
             f"{res['dataset']} val, {res['images']} images · seed {res['seed']}", ""]
    if rec.get('skipped'):
        lines += [f"Reconstruction not scored: {rec['skipped']}", ""]
    else:
        lines += [f"Reconstruction at mask {res['mask']:g} {res['masking']} (SSIM: Gaussian window, sigma 1.5; PSNR per "
                  f"image, capped at {PSNR_CAP_DB:g} dB, then averaged):", "",
                  "| reconstruction | PSNR (dB) | SSIM | LPIPS (AlexNet) | reference / verdict |", "|---|---|---|---|---|"]
        for kind in KINDS:
            m, note = rec[kind], ''
            if kind == 'model':
                note = ' '.join(filter(None, [
                    verdict('PSNR', m['psnr'], {k: rec[k]['psnr'] for k in KINDS[1:]}),
                    verdict('SSIM', m['ssim'], {k: rec[k]['ssim'] for k in KINDS[1:]}),
                    f"{refs['psnr']['value']} dB / {refs['ssim']['value']} ({refs['psnr']['source']})" if 'psnr' in refs else '']))
            lines.append(f"| {KIND_NAMES[kind]} | {fmt(m['psnr'], '.2f')} | {fmt(m['ssim'], '.4f')} | "
                         f"{fmt(m['lpips'], '.4f')} | {note} |")
        lines += ["", f"Masked-patch MSE (the MAE loss, in the training target's space): {fmt(rec['masked_mse'], '.4f')}.", ""]
    lines += ["| representation | kNN top-1 (%) | kNN top-5 (%) | linear probe top-1 (%) | reference / verdict |",
              "|---|---|---|---|---|"]
    for name, rep in res['representation'].items():
        if not rep.get('available', True):
            lines.append(f"| kNN on {name} | unavailable | | | {rep['reason']} |")
            continue
        for kind in FEATURES:
            r, note = rep[kind], ''
            if kind == 'model':
                note = verdict('kNN', r['knn']['top1'], {k: rep[k]['knn']['top1'] for k in FEATURES[1:]})
                if r['probe'] and name == res['dataset']:
                    note = ' '.join(filter(None, [note, verdict('probe', r['probe']['top1'],
                                                                {k: rep[k]['probe']['top1'] for k in FEATURES[1:]})]))
                    ref = refs.get('linear_probe_top1')
                    note += f" probe reference {ref['value']} ({ref['source']})" if ref else ''
            probe_txt = fmt(r['probe']['top1'], '.2f') if r['probe'] else ''
            lines.append(f"| {name}: {FEATURE_NAMES[kind]} | {r['knn']['top1']:.2f} | {r['knn']['top5']:.2f} | {probe_txt} | {note.strip()} |")
    lines += ["", f"kNN: weighted, k={res['knn_k']}, T={res['knn_temperature']:g}, train split as the bank, val split as "
              f"the queries. Linear probe: {res['probe_epochs']} epochs of the study's recipe. A model below a floor has "
              f"learnt less than that floor already holds."]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# the command


def main(argv=None):
    cfg, _ = common.configure(globals(), argv)
    ck = common.load_checkpoint(cfg.ckpt, kinds=('pretrain', 'dino'))  # a wrong --ckpt fails before anything is written
    mcfg = common.model_config(ck, cfg.ckpt, img_size=cfg.img_size or None)
    try:
        mcfg = replace(mcfg, mask_ratio=cfg.mask or mcfg.mask_ratio, masking=cfg.masking or mcfg.masking)
    except ValueError as e:
        raise common.UserError(str(e)) from None
    cfg.out_dir = cfg.out_dir or os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt)), 'eval')
    previous = os.path.join(cfg.out_dir, 'eval.json')
    if os.path.exists(previous):
        old = None
        with contextlib.suppress(ValueError, OSError, AttributeError):
            old = json.load(open(previous)).get('checkpoint_id')
        if old != checkpoint_id(cfg.ckpt, ck):
            raise common.UserError(f"{previous} holds an evaluation of another checkpoint ({old or 'unknown'}): choose "
                                   f"another --out_dir (by default each checkpoint is evaluated beside itself)")
    with common.Run(cfg, 'evaluate', training=False) as run:
        if run.ddp:
            raise common.UserError("evaluate.py runs in one process: start it with python, not torchrun")
        return evaluate(cfg, ck, mcfg, run)


def checkpoint_id(path, ck):
    return f"{os.path.realpath(path)} at step {ck.get('step')}"


def reconstructions(cfg, ck, mcfg, run, val, name):
    """Reconstruction metrics on the val split and recon.png, when the checkpoint makes pictures one can score ->
    (metrics or dict(skipped=why), why LPIPS is missing or None, the picture's path or None)."""
    skip = ("a dino.py checkpoint has no decoder: it does not reconstruct" if ck['kind'] == 'dino' else
            "a norm_pix_loss model predicts per-patch normalised pixels; turning them into pixels needs each masked "
            "patch's true mean and variance, which would leak the answer into PSNR/SSIM/LPIPS and make them "
            "incomparable with raw-pixel models" if mcfg.norm_pix_loss else None)
    if skip:
        run.print(f"reconstruction not scored: {skip}")
        return dict(skipped=skip), skip, None
    lpips_net, lpips_reason = load_lpips(run.device) if cfg.use_lpips else (None, "LPIPS skipped (--use_lpips false)")
    if lpips_reason:
        run.print(lpips_reason)
    mae = M.build_mae(mcfg)
    try:
        M.load_weights(mae, ck['model'], what=cfg.ckpt)
    except ValueError as e:
        raise common.UserError(str(e)) from None
    mae = mae.to(run.device).eval()
    t0 = time.time()
    rec = reconstruction_metrics(mae, val, mcfg.mask_ratio, mcfg.masking, cfg, run, lpips_net)
    m = rec['model']
    run.log(dict(event='reconstruction', images=len(val.labels), seconds=round(time.time() - t0, 1), **rec),
            f"reconstruction on {len(val.labels)} {name} val images ({time.time() - t0:.1f}s): PSNR {fmt(m['psnr'], '.2f')} dB "
            f"SSIM {fmt(m['ssim'], '.4f')} LPIPS {fmt(m['lpips'], '.4f')} masked MSE {fmt(rec['masked_mse'], '.4f')}")
    eight = data.spread(val, 8)
    x8, _ = next(data.iterate_batches(eight.images, None, len(eight.labels), run.device, img_size=mcfg.img_size))
    picture = reconstruction_grid(mae, x8, mcfg.mask_ratio, mcfg.masking, cfg.seed, os.path.join(cfg.out_dir, 'recon.png'),
                                  f"{cfg.ckpt}, epoch {ck.get('epoch', 0):g}")
    return rec, lpips_reason, picture


def evaluate(cfg, ck, mcfg, run):
    t_start, ck_cfg = time.time(), ck['config']
    encoder = common.load_encoder(cfg.ckpt, loaded=ck, img_size=mcfg.img_size)[0].to(run.device).eval()
    # the random-init floor is the run's own initial encoder (the seed it was trained with), which pretrain.py and
    # dino.py also log as their kNN floor at step 0
    torch.manual_seed(ck_cfg.get('seed', cfg.seed))
    initial = M.build_mae(mcfg) if ck['kind'] == 'pretrain' else None  # pretrain.py built the whole MAE from the seed
    random_encoder = M.VisionTransformer(replace(encoder.cfg, num_classes=0))  # dino.py: the encoder itself
    if initial is not None:
        random_encoder.load_state_dict(M.encoder_state_dict(initial.state_dict()))
    random_encoder = random_encoder.to(run.device).eval()
    name = cfg.dataset or ck_cfg.get('dataset', 'tin')
    transfer = {'auto': 'cub' if name == 'tin' else None, 'none': None}.get(cfg.transfer_dataset, cfg.transfer_dataset)
    transfer = None if transfer == name else transfer
    run.banner({'checkpoint': f"{cfg.ckpt} ({ck['kind']}, {ck_cfg.get('model')}, epoch {ck.get('epoch', 0):g})",
                'mask': 'none (no decoder)' if ck['kind'] == 'dino' else f"{mcfg.mask_ratio:g} {mcfg.masking}",
                'dataset': name, 'transfer': transfer or 'none'})
    splits = load_splits(name, cfg)
    val = splits['val']
    # 1. reconstructions and their floors on the val split
    rec, lpips_reason, picture = reconstructions(cfg, ck, mcfg, run, val, name)
    # 2. representation: kNN and the linear probe beside their floors, then kNN on the transfer dataset
    reps = {name: representation(encoder, random_encoder, splits, cfg, run, cfg.probe_epochs)}
    del splits
    if transfer:
        try:
            reps[transfer] = representation(encoder, random_encoder, load_splits(transfer, cfg), cfg, run, 0)
        except data.DataError as e:  # not on disk: say why, keep the rest of the evaluation
            reps[transfer] = dict(available=False, reason=str(e))
            run.print(f"kNN {transfer}: unavailable: {e}")
    # 3. eval.json and eval.md
    res = dict(checkpoint=cfg.ckpt, checkpoint_id=checkpoint_id(cfg.ckpt, ck), kind=ck['kind'],
               model=ck_cfg.get('model'), img_size=mcfg.img_size, patch_size=mcfg.patch_size, epoch=ck.get('epoch', 0),
               dataset=name, split='val', images=len(val.labels), mask=mcfg.mask_ratio, masking=mcfg.masking,
               seed=cfg.seed, psnr_cap_db=PSNR_CAP_DB, reconstruction=rec,
               lpips=dict(available=lpips_reason is None, reason=lpips_reason),
               representation=reps, knn_k=cfg.knn_k, knn_temperature=cfg.knn_temperature, pool=cfg.pool,
               probe_epochs=cfg.probe_epochs, references=references(ck, name, mcfg.mask_ratio, mcfg.masking),
               picture=picture, seconds=round(time.time() - t_start, 1))
    table = markdown(res)
    common.save_atomic(json.dumps(res, indent=2) + "\n", os.path.join(cfg.out_dir, 'eval.json'))
    common.save_atomic(table, os.path.join(cfg.out_dir, 'eval.md'))
    run.log(dict(event='done', seconds=res['seconds']))
    run.print("\n" + table)
    run.print(f"wrote {cfg.out_dir}/eval.json, eval.md" + (" and recon.png" if picture else "") + f" ({res['seconds']:.0f}s)")
    return 0


if __name__ == '__main__':
    common.cli(main)
