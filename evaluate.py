"""
Score a pre-training checkpoint the way the paper and the second seed do, and put the numbers beside theirs.

    python evaluate.py --ckpt out/pretrain/ckpt.pt                      # TIN val, + kNN on CUB when it is on disk
    python evaluate.py --ckpt out/pretrain/ckpt.pt --probe_epochs 0     # skip the linear probe

Reconstruction (val split, masks fixed by --seed, the checkpoint's mask ratio and strategy unless overridden):
PSNR and SSIM with scikit-image, LPIPS (AlexNet) with the lpips package, on the image whose visible patches come
from the input and masked ones from the model, against the original; plus the masked-patch MSE in normalised
pixels (the training loss, raw-pixel target). The same masks filled by two floors: the mean colour of the visible
pixels, and interpolation from the visible pixels (normalised convolution, below).
Representation: weighted kNN (DINO's: cosine, k=20, T=0.07) on the evaluated dataset and on a transfer dataset
(CUB for a TIN checkpoint) with nothing trained, and the linear probe through probe.py with the paper's recipe.
Writes <out_dir>/eval.json, eval.md (the table, also printed) and recon.png.
"""
import collections
import contextlib
import io
import json
import math
import multiprocessing
import os
import socket
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

import common
import data
import model as M
import probe

# -----------------------------------------------------------------------------
# config
ckpt = ''                   # the pretrain.py checkpoint to score (required)
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
probe_epochs = 50           # linear probe epochs (paper: 50); 0 = skip the probe
batch_size = 256            # evaluation batch
device = 'auto'             # auto (cuda if available) | cuda | cpu
dtype = 'bfloat16'          # autocast on CUDA for the model forwards: bfloat16 | float16 | float32; metrics in fp32
seed = 0                    # fixes the masks and the probe's initialisation and order
out_dir = 'out/eval'        # eval.json, eval.md, recon.png, log.jsonl
# -----------------------------------------------------------------------------

PSNR_CAP_DB = 100.0         # PSNR of an exact reconstruction is infinite; each image's PSNR is capped here
PROBE_RECIPE = dict(warmup_epochs=2, batch_size=128, lr=1e-3, betas=(0.9, 0.95))  # PAPER.md section 3 (Adam, no wd)
# PAPER.md section 1: linear probe top-1 on TIN by mask ratio (ViT-Lite-7/4, random masking, 200-epoch pre-train)
PAPER_PROBE_TIN = {0.5: 31.32, 0.6: 32.03, 0.65: 32.32, 0.7: 30.58, 0.75: 32.04, 0.8: 31.66, 0.85: 29.61, 0.9: 28.14}
SECOND_SEED = dict(psnr=23.08, ssim=0.6663)  # ViT-B/16, 75% random masking, TIN, 24 epochs
KINDS = ('model', 'mean_colour_floor', 'interpolation_floor')  # the three images scored against the original
KIND_NAMES = {'model': 'model (visible patches pasted)', 'mean_colour_floor': 'floor: mean colour of the visible pixels',
              'interpolation_floor': 'floor: interpolation from the visible pixels'}


# -----------------------------------------------------------------------------
# image metrics


def to_hwc(x):
    """(N, 3, H, W) tensor in [0, 1] -> float32 numpy (N, H, W, 3), the layout scikit-image takes."""
    return x.detach().float().permute(0, 2, 3, 1).contiguous().cpu().numpy()


def image_metrics(pred01, target01):
    """Per-image PSNR (capped at PSNR_CAP_DB) and SSIM of (N, H, W, 3) float images in [0, 1]: scikit-image's
    peak_signal_noise_ratio and structural_similarity with data_range 1, colour as channels (default 7x7 window)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    psnr, ssim = np.empty(len(pred01)), np.empty(len(pred01))
    for i in range(len(pred01)):
        with np.errstate(divide='ignore'):  # identical images: MSE 0, PSNR inf
            psnr[i] = min(peak_signal_noise_ratio(target01[i], pred01[i], data_range=1.0), PSNR_CAP_DB)
        ssim[i] = structural_similarity(target01[i], pred01[i], data_range=1.0, channel_axis=-1)
    return psnr, ssim


def _metrics_chunk(preds, target):
    """Pool task: {kind: (psnr sum, ssim sum)} for a chunk of images scored against the same originals."""
    return {kind: tuple(m.sum() for m in image_metrics(p, target)) for kind, p in preds.items()}


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


# -----------------------------------------------------------------------------
# floors: the masked pixels filled without a model


def mean_colour_fill(img01, visible):
    """Masked pixels (visible == 0; visible is (N, 1, H, W)) set to the mean colour of the image's visible pixels."""
    mean = (img01 * visible).sum((2, 3), keepdim=True) / visible.sum((2, 3), keepdim=True).clamp_min(1)
    return img01 * visible + mean * (1 - visible)


def _blur(x, kernel):
    """Separable depthwise blur with zero padding (outside the image counts as unknown)."""
    C, r = x.shape[1], kernel.numel() // 2
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).repeat(C, 1, 1, 1), padding=(0, r), groups=C)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).repeat(C, 1, 1, 1), padding=(r, 0), groups=C)


def interpolation_fill(img01, visible, sigma=1.0):
    """Masked pixels interpolated from the visible ones by normalised convolution, growing inward: each pass
    blurs the known values and the known-mask with a Gaussian (sigma, radius 2 sigma) and fills every unknown
    pixel that has a known one within reach with blur(values) / blur(mask); repeated until all are filled."""
    r = max(1, math.ceil(2 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=img01.device)
    kernel = torch.exp(-t ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    known = visible.float().clone()
    values = img01.float() * known
    for _ in range(max(img01.shape[-2:])):  # each pass reaches r pixels further into the holes
        if bool(known.all()):
            break
        blurred = _blur(torch.cat([values, known], dim=1), kernel)
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
    image index) only, not on the batch size. scikit-image runs in a process pool while the device computes on."""
    device, mc = run.device, mae.cfg
    mae.eval()
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    noise_all = mae.masking_noise(len(split.labels), mask_ratio, masking_kind, generator=g, device=device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    n_workers = cfg.workers or max(1, min(cores, 16) - 1)  # one core left for this process
    executor = (ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context('spawn'))  # spawn: CUDA-safe
                if n_workers > 1 else None)
    pending = collections.deque()
    sums = {kind: dict(psnr=0.0, ssim=0.0, lpips=0.0) for kind in KINDS}
    mse_sum, mse_count, start = torch.zeros((), device=device), torch.zeros((), device=device), 0

    def collect(future_or_result):
        result = future_or_result.result() if executor else future_or_result
        for kind, (psnr, ssim) in result.items():
            sums[kind]['psnr'] += psnr
            sums[kind]['ssim'] += ssim
    try:
        for x, _ in data.iterate_batches(split.images, None, cfg.batch_size, device, img_size=mc.img_size):
            noise = noise_all[start:start + x.shape[0]]
            start += x.shape[0]
            with run.autocast:
                _, pred, mask = mae(x, mask_ratio, noise=noise)
            recon, pasted = mae.reconstruct(x, pred, mask)                # normalised space, float32
            # masked-patch MSE against the raw (normalised) pixels, whatever the checkpoint's target was
            per_patch = ((mae.patchify(recon) - mae.patchify(x.float())) ** 2).mean(-1)  # (N, L)
            mse_sum += (per_patch * mask).sum()
            mse_count += mask.sum()
            visible = 1 - mae.pixel_mask(mask)                                # (N, 1, H, W), 1 = visible
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
                if executor is None:
                    collect(_metrics_chunk(*chunk))
                    continue
                pending.append(executor.submit(_metrics_chunk, *chunk))
                while len(pending) > 2 * n_workers:
                    collect(pending.popleft())
        while pending:
            collect(pending.popleft())
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    n = len(split.labels)
    out = {kind: dict(psnr=_finite(s['psnr'] / n), ssim=_finite(s['ssim'] / n),
                      lpips=_finite(s['lpips'] / n) if lpips_net is not None else None) for kind, s in sums.items()}
    out['masked_mse'] = _finite((mse_sum / mse_count.clamp_min(1)).item())
    return out


def _finite(x):
    """A float for JSON, or None where it is NaN or infinite (a diverged checkpoint)."""
    x = float(x)
    return x if math.isfinite(x) else None


# -----------------------------------------------------------------------------
# representation metrics


@torch.no_grad()
def knn_classify(train_feats, train_labels, test_feats, test_labels, num_classes, k=20, temperature=0.07, chunk=1024):
    """DINO's weighted kNN: cosine similarity to the bank, the k nearest vote for their class with weight
    exp(sim / T), classes ranked by summed votes. -> dict(top1, top5) in percent. Chunked over the queries, so memory
    is chunk x bank. A class with no votes never counts as a hit (DINO's sort would rank such ties arbitrarily)."""
    bank = F.normalize(train_feats.float(), dim=1)
    queries = F.normalize(test_feats.float(), dim=1)
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


def features(encoder, split, cfg, run):
    return probe.extract_features(encoder, split.images, split.labels, run.device, batch_size=cfg.batch_size,
                                  img_size=encoder.cfg.img_size, pool=cfg.pool, autocast=run.autocast)


def load_splits(name, cfg):
    """{'train', 'val'} of a dataset, limited to --subset train and --max_images val images (fixed by the seed)."""
    return {s: common.take_subset(data.load_split(name, s, cfg.data_dir, download=cfg.download), n, cfg.seed)
            for s, n in (('train', cfg.subset), ('val', cfg.max_images))}


def knn_on(encoder, name, cfg, run, splits=None):
    """kNN with the train split as the bank and the val split as the queries -> (result dict, features)."""
    t0 = time.time()
    splits = splits or load_splits(name, cfg)
    feats = {s: features(encoder, split, cfg, run) for s, split in splits.items()}
    result = knn_classify(*feats['train'], *feats['val'], splits['train'].num_classes, k=cfg.knn_k,
                          temperature=cfg.knn_temperature)
    result.update(available=True, bank=len(splits['train'].labels), queries=len(splits['val'].labels))
    run.log(dict(event='knn', dataset=name, **result, seconds=round(time.time() - t0, 1)),
            f"kNN {name}: top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% "
            f"({result['bank']} bank, {result['queries']} queries, {time.time() - t0:.1f}s)")
    return result, feats


# -----------------------------------------------------------------------------
# references and the table


def references(ck, dataset_name, mask_ratio, masking_kind):
    """The paper's and the second seed's numbers that apply to this evaluation, each with its setting."""
    ck_cfg, mc = ck['config'], ck['model_config']
    refs = {}
    epochs = ck.get('epoch')
    if dataset_name == 'tin' and masking_kind == 'random' and round(mask_ratio, 2) in PAPER_PROBE_TIN:
        here = [ck_cfg.get('model')] if ck_cfg.get('model') != 'vit_lite' else []
        here += [f"{epochs:g} ep"] if epochs is not None and round(epochs) != 200 else []
        here += [f"SMAE alpha {ck_cfg['alpha']:g}"] if ck_cfg.get('alpha', 0) else []
        refs['linear_probe_top1'] = dict(value=PAPER_PROBE_TIN[round(mask_ratio, 2)], source=(
            f"paper: ViT-Lite-7/4, 200 ep, mask {mask_ratio:g} random" + (f"; here: {', '.join(here)}" if here else "")))
    if dataset_name == 'tin':
        same = (ck_cfg.get('model') == 'vit_base' and mc.get('patch_size') == 16 and abs(mask_ratio - 0.75) < 1e-9
                and masking_kind == 'random')
        source = "second seed: ViT-B/16, mask 0.75 random, 24 ep" if same else "second seed (ViT-B/16, different setting)"
        refs['psnr'] = dict(value=SECOND_SEED['psnr'], source=source)
        refs['ssim'] = dict(value=SECOND_SEED['ssim'], source=source)
    return refs


def fmt(x, spec, none='unavailable'):
    return none if x is None else format(x, spec)


def markdown(res):
    rec, refs = res['reconstruction'], res['references']
    lines = [f"## evaluate.py: {res['checkpoint']}", "",
             f"{res['model']} (img {res['img_size']}, patch {res['patch_size']}), epoch {res['epoch']:g} · "
             f"mask {res['mask']:g} {res['masking']} · {res['dataset']} val, {res['images']} images · seed {res['seed']}", "",
             "| reconstruction | PSNR (dB) | SSIM | LPIPS (AlexNet) | reference |", "|---|---|---|---|---|"]
    for kind in KINDS:
        m = rec[kind]
        ref = ''
        if kind == 'model' and 'psnr' in refs:
            ref = f"{refs['psnr']['value']} dB / {refs['ssim']['value']} ({refs['psnr']['source']})"
        lines.append(f"| {KIND_NAMES[kind]} | {fmt(m['psnr'], '.2f')} | {fmt(m['ssim'], '.4f')} | "
                     f"{fmt(m['lpips'], '.4f')} | {ref} |")
    lines += ["", f"Masked-patch MSE (normalised pixels, raw-pixel target): {fmt(rec['masked_mse'], '.4f')}. "
              f"PSNR is the mean over images of scikit-image's PSNR, each capped at {PSNR_CAP_DB:g} dB.", "",
              "| representation | top-1 (%) | top-5 (%) | reference |", "|---|---|---|---|"]
    for name, r in res['knn'].items():
        what = f"kNN k={res['knn_k']} T={res['knn_temperature']:g}, {name}"
        if r.get('available'):
            lines.append(f"| {what} ({r['bank']} bank / {r['queries']} queries) | {r['top1']:.2f} | {r['top5']:.2f} | |")
        else:
            lines.append(f"| {what} | unavailable | | {r['reason']} |")
    lp = res['linear_probe']
    if lp is not None:
        ref = refs.get('linear_probe_top1')
        ref = f"{ref['value']} ({ref['source']})" if ref else ''
        lines.append(f"| linear probe, {lp['epochs']} ep, {res['dataset']} (best epoch top-1 {lp['best_top1']:.2f}) | "
                     f"{lp['top1']:.2f} | {lp['top5']:.2f} | {ref} |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg, _ = common.parse_config(common.script_defaults(globals()), argv)
    run = common.Run(cfg, 'evaluate')
    try:
        return evaluate(cfg, run)
    finally:
        run.close()


def evaluate(cfg, run):
    t_start = time.time()
    if run.ddp:
        raise common.UserError("evaluate.py runs in one process: start it with python, not torchrun")
    if cfg.transfer_dataset not in ('auto', 'none', '') + data.DATASETS:
        raise common.UserError(f"--transfer_dataset must be auto, none or one of {', '.join(data.DATASETS)}, "
                               f"got {cfg.transfer_dataset!r}")
    if cfg.pool not in ('cls', 'mean'):
        raise common.UserError(f"--pool must be cls or mean, got {cfg.pool!r}")
    if min(cfg.batch_size, cfg.knn_k) < 1 or min(cfg.probe_epochs, cfg.max_images, cfg.subset, cfg.workers) < 0 \
            or cfg.knn_temperature <= 0:
        raise common.UserError("--batch_size and --knn_k must be >= 1, --knn_temperature > 0, and --probe_epochs, "
                               "--max_images, --subset, --workers >= 0")
    # the checkpoint: the encoder (for kNN and the probe) and the whole MAE (for reconstructions), one load
    encoder, ck = common.load_encoder(cfg.ckpt, img_size=cfg.img_size or None)
    mcfg = replace(M.ViTConfig(**ck['model_config']), img_size=cfg.img_size or ck['model_config']['img_size'])
    mae = M.build_mae(mcfg)
    try:
        M.load_weights(mae, ck['model'], what=cfg.ckpt)
    except ValueError as e:
        raise common.UserError(str(e)) from None
    mae, encoder = mae.to(run.device).eval(), encoder.to(run.device).eval()
    ck_cfg = ck['config']
    mask_ratio = cfg.mask or ck_cfg.get('mask', 0.75)
    masking_kind = cfg.masking or ck_cfg.get('masking', 'random')
    if not 0.0 < mask_ratio < 1.0:
        raise common.UserError(f"--mask must be in (0, 1) (or 0 for the checkpoint's), got {cfg.mask}")
    if masking_kind not in ('random', 'block'):
        raise common.UserError(f"--masking must be random or block (or '' for the checkpoint's), got {cfg.masking!r}")
    name = cfg.dataset or ck_cfg.get('dataset', 'tin')
    transfer = {'auto': 'cub' if name == 'tin' else None, 'none': None, '': None}.get(cfg.transfer_dataset,
                                                                                    cfg.transfer_dataset)
    transfer = None if transfer == name else transfer
    run.banner(cfg, {'checkpoint': f"{cfg.ckpt} ({ck_cfg.get('model')}, epoch {ck.get('epoch', 0):g})",
                     'mask': f"{mask_ratio:g} {masking_kind}", 'dataset': name, 'transfer': transfer or 'none'})

    # LPIPS first: its one-line notice belongs at the top
    lpips_net, lpips_reason = (None, "LPIPS skipped (--use_lpips false)")
    if cfg.use_lpips:
        lpips_net, lpips_reason = load_lpips(run.device)
    if lpips_reason:
        run.print(lpips_reason)

    # 1-2. reconstructions and floors on the val split
    splits = load_splits(name, cfg)
    val = splits['val']
    t0 = time.time()
    rec = reconstruction_metrics(mae, val, mask_ratio, masking_kind, cfg, run, lpips_net)
    m = rec['model']
    run.log(dict(event='reconstruction', images=len(val.labels), seconds=round(time.time() - t0, 1), **rec),
            f"reconstruction on {len(val.labels)} {name} val images ({time.time() - t0:.1f}s): PSNR {fmt(m['psnr'], '.2f')} dB "
            f"SSIM {fmt(m['ssim'], '.4f')} LPIPS {fmt(m['lpips'], '.4f')} masked MSE {fmt(rec['masked_mse'], '.4f')}")
    pick = torch.linspace(0, len(val.labels) - 1, min(8, len(val.labels))).long()  # spread over the split
    x8, _ = next(data.iterate_batches(val.images[pick], None, len(pick), run.device, img_size=mcfg.img_size))
    picture = common.reconstruction_grid(mae, x8, mask_ratio, masking_kind, cfg.seed, os.path.join(cfg.out_dir, 'recon.png'))
    del mae

    # 3. representation: kNN here and on the transfer dataset, then the linear probe on the same features
    knn, (main_knn, feats) = {}, knn_on(encoder, name, cfg, run, splits)
    knn[name] = main_knn
    linear_probe = None
    if cfg.probe_epochs > 0:
        t0 = time.time()
        recipe = dict(PROBE_RECIPE, warmup_epochs=min(PROBE_RECIPE['warmup_epochs'], cfg.probe_epochs - 1))

        def log(record, line):  # every epoch in log.jsonl, every 10th on stdout
            run.log(record, line if record['epoch'] % 10 == 0 or record['epoch'] == cfg.probe_epochs else None)
        head = probe.train_linear_head(*feats['train'], *feats['val'], splits['train'].num_classes,
                                       epochs=cfg.probe_epochs, seed=cfg.seed, log=log, **recipe)
        linear_probe = dict(top1=head['top1'], top5=head['top5'], best_top1=head['best_top1'],
                            best_epoch=head['best_epoch'], epochs=cfg.probe_epochs)
        run.log(dict(event='linear_probe', **linear_probe, seconds=round(time.time() - t0, 1)),
                f"linear probe {name}, {cfg.probe_epochs} epochs ({time.time() - t0:.1f}s): top-1 {head['top1']:.2f}% "
                f"top-5 {head['top5']:.2f}% (best epoch top-1 {head['best_top1']:.2f}%)")
    del feats, splits
    if transfer:
        try:
            knn[transfer], _ = knn_on(encoder, transfer, cfg, run)
        except data.DataError as e:  # not on disk: say why, keep the rest of the evaluation
            knn[transfer] = dict(available=False, reason=str(e))
            run.print(f"kNN {transfer}: unavailable: {e}")

    # 4-5. eval.json and eval.md
    res = dict(checkpoint=cfg.ckpt, model=ck_cfg.get('model'), img_size=mcfg.img_size, patch_size=mcfg.patch_size,
               epoch=ck.get('epoch', 0), dataset=name, split='val', images=len(val.labels), mask=mask_ratio,
               masking=masking_kind, seed=cfg.seed, psnr_cap_db=PSNR_CAP_DB, reconstruction=rec,
               lpips=dict(available=lpips_net is not None, reason=lpips_reason), knn=knn, knn_k=cfg.knn_k,
               knn_temperature=cfg.knn_temperature, pool=cfg.pool, linear_probe=linear_probe,
               references=references(ck, name, mask_ratio, masking_kind), picture=picture,
               seconds=round(time.time() - t_start, 1))
    table = markdown(res)
    common.write_text_atomic(json.dumps(res, indent=2) + "\n", os.path.join(cfg.out_dir, 'eval.json'))
    common.write_text_atomic(table, os.path.join(cfg.out_dir, 'eval.md'))
    run.log(dict(event='done', seconds=res['seconds']))
    run.print("\n" + table)
    run.print(f"wrote {cfg.out_dir}/eval.json, eval.md and recon.png ({res['seconds']:.0f}s)")
    return 0


if __name__ == '__main__':
    common.cli(main)
