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
The dataset and image size are the checkpoint's unless given. recon.png shows the images and masks of the run's
training pictures, with their figures. Writes <out_dir>/eval.json, eval.md (the table, also printed), recon.png and
log.jsonl; out_dir defaults to <checkpoint folder>/eval, and evaluate.py writes only into an empty folder or one
holding its own earlier evaluation of the same checkpoint (recognised by its weights, wherever the file now lies).
"""
import collections
import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import multiprocessing.resource_tracker
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
PROBE_RECIPE = dict(warmup_epochs=2, batch_size=128, lr=1e-3, betas=(0.9, 0.95))  # the study's (Adam, no wd; lr at 128)
PRETRAIN_VAL_IMAGES = 1024  # pretrain.py's val_images, for a checkpoint that does not record it (the pictures' images)
OWN_FILES = ('eval.json', 'eval.md', 'recon.png', 'log.jsonl')  # all that evaluate.py writes into its out_dir
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
         'pixel_floor': 'raw pixels'}  # the floors' names in a verdict and in recon.png
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
    """A worker's task: {kind: (psnr sum, ssim sum)} for a chunk of images scored against the same originals."""
    return {kind: tuple(m.sum() for m in image_metrics(p, target)) for kind, p in preds.items()}


def _metrics_worker(conn, parent):
    common.die_with_parent()                         # SIGKILL when the evaluation process ends, however it ends
    if os.getppid() != parent:                       # it ended while this worker was still importing: nothing to do
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the parent's to handle (one held back is dropped)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])  # SIGTERM as usual (held back since the worker started)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the parent closed its end: it is gone or done
            os._exit(0)
        conn.send(_metrics_chunk(*task))


class MetricWorkers:
    """scikit-image's PSNR/SSIM in n spawned processes (spawn: CUDA-safe), each fed through a pipe of its own, used as
    `with MetricWorkers(n) as workers`; leaving the block kills and reaps them, which cannot block. (The standard
    multiprocessing.Pool is not used: its terminate() waits forever for a queue lock that a worker killed while
    waiting for work never releases, e.g. after a SIGTERM sent to the whole process group.) Tasks go to the workers
    in turn and their results come back in the same order."""

    def __init__(self, n):
        self.n, self.procs, self.pipes, self.sent = n, [], [], 0

    def __enter__(self):
        ctx = multiprocessing.get_context('spawn')
        multiprocessing.resource_tracker.ensure_running()  # (its start would unblock the signals blocked below)
        # Ctrl-C and SIGTERM wait until the workers have started: this thread blocks them, and each worker inherits
        # that mask until it is ready (a Ctrl-C reaches the whole process group, and must stop this process alone,
        # which ends the workers, not print a traceback from each worker still importing); one that another thread
        # receives meanwhile is held, not raised in the middle of a Process.start(), and raised once they are started
        held, stops = [], (signal.SIGINT, signal.SIGTERM)
        handlers = {sig: signal.signal(sig, lambda signum, frame: held.append(signum)) for sig in stops}
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            try:
                for _ in range(self.n):
                    mine, theirs = ctx.Pipe()
                    self.procs.append(ctx.Process(target=_metrics_worker, args=(theirs, os.getpid())))
                    self.pipes.append(mine)
                    self.procs[-1].start()
                    theirs.close()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
                if held:
                    signal.raise_signal(held[0])  # the script's own handler acts on it now
        except BaseException:
            self.__exit__()  # (the with statement does not call it when __enter__ fails)
            raise
        return self

    def send(self, task):
        try:
            self.pipes[self.sent % self.n].send(task)
        except (BrokenPipeError, ConnectionResetError):
            self._died(self.sent)
        self.sent += 1

    def receive(self, i):
        """The result of the i-th task sent (results are received in the order the tasks were sent)."""
        try:
            return self.pipes[i % self.n].recv()
        except (EOFError, ConnectionResetError):
            self._died(i)

    def _died(self, i):
        """A worker ended on its own: killed alone (the OOM killer, a kill of its pid), or a bug (traceback above)."""
        proc = self.procs[i % self.n]
        proc.join(5)
        raise common.UserError(f"a scikit-image worker process ended unexpectedly (exit code {proc.exitcode}); no "
                               f"result was written: run again, with fewer --workers if memory is short") from None

    def __exit__(self, *exc):
        started = [proc for proc in self.procs if proc.pid is not None]
        for proc in started:
            proc.kill()
        for proc in started:
            proc.join()
        for pipe in self.pipes:
            pipe.close()


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


def scored_images(pasted01, target01, visible, patch_size):
    """{kind: image} of the three images scored against the original target01: the model's (visible patches pasted)
    and the two floors for the same masks (visible is (N, 1, H, W), 1 = visible)."""
    return {'model': pasted01, 'mean_colour_floor': mean_colour_fill(target01, visible),
            'interpolation_floor': interpolation_fill(target01, visible, sigma=max(1.0, patch_size / 4))}


@torch.no_grad()
def reconstruction_metrics(mae, split, mask_ratio, masking_kind, cfg, run, lpips_net):
    """Averages over the split of PSNR / SSIM / LPIPS for the model and both floors, and the masked-patch MSE.
    The masks are one draw for the whole split from a generator seeded with cfg.seed, so they depend on (seed,
    image index) only, not on the batch size. scikit-image runs in worker processes while the device computes on;
    the workers end with this function, however it ends."""
    device, mc, n = run.device, mae.cfg, len(split.labels)
    mae.eval()
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    noise_all = mae.masking_noise(n, mask_ratio, masking_kind, generator=g, device=device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    n_workers = cfg.workers or max(1, min(cores, 16) - 1)  # one core left for this process
    pending, progress = collections.deque(), common.Progress('image', n, run, 'reconstruction metrics')
    sums = {kind: dict(psnr=0.0, ssim=0.0, lpips=0.0) for kind in KINDS}
    mse_sum, start = torch.zeros((), device=device, dtype=torch.float64), 0

    def collect(result):
        for kind, (psnr, ssim) in (workers.receive(result) if workers else result).items():
            sums[kind]['psnr'] += psnr
            sums[kind]['ssim'] += ssim
    with MetricWorkers(n_workers) if n_workers > 1 else contextlib.nullcontext() as workers, progress:
        for x, _ in data.iterate_batches(split.images, None, cfg.feature_batch, device, img_size=mc.img_size):
            noise, start = noise_all[start:start + len(x)], start + len(x)
            with run.autocast:
                _, pred, mask = mae(x, mask_ratio, noise=noise)
            mse_sum += mae.forward_loss(x, pred, mask, on_all=False).double() * x.shape[0]
            _, pasted = mae.reconstruct(x, pred, mask)                    # normalised space, float32
            target = data.denormalize(x).clamp(0, 1)
            visible = 1 - mae.pixel_mask(mask)                            # (N, 1, H, W), 1 = visible
            images = scored_images(data.denormalize(pasted).clamp(0, 1), target, visible, mc.patch_size)
            if lpips_net is not None:
                for kind, img in images.items():
                    sums[kind]['lpips'] += lpips_distance(lpips_net, img, target).sum().item()
            # scikit-image on the CPU: a chunk per worker, at most 2 per worker waiting (bounded memory)
            target_np, preds_np = to_hwc(target), {kind: to_hwc(img) for kind, img in images.items()}
            step = math.ceil(len(target_np) / n_workers)
            for i in range(0, len(target_np), step):
                chunk = ({k: p[i:i + step] for k, p in preds_np.items()}, target_np[i:i + step])
                if workers:
                    pending.append(workers.sent)  # the index of the task, whose result comes back in order
                    workers.send(chunk)
                else:
                    pending.append(_metrics_chunk(*chunk))
                while len(pending) > 2 * n_workers:
                    collect(pending.popleft())
            progress.update(start)
        while pending:
            collect(pending.popleft())
    out = {kind: dict(psnr=_finite(s['psnr'] / n), ssim=_finite(s['ssim'] / n),
                      lpips=_finite(s['lpips'] / n) if lpips_net is not None else None) for kind, s in sums.items()}
    out['masked_mse'] = _finite(mse_sum.item() / n)
    return out


def _finite(x):
    """A float for JSON, or None where it is NaN or infinite (a diverged checkpoint)."""
    return float(x) if math.isfinite(x) else None


def _wrap(draw, text, font, width):
    """The words of text in lines no wider than width pixels (a longer word gets a line of its own)."""
    lines = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


@torch.no_grad()
def reconstruction_grid(mae, imgs, mask_ratio, masking, seed, path, title, scale=3, caption=''):
    """A PNG a person can read: one row per image in labelled columns (upscaled `scale` times, nearest), beside each
    row that image's PSNR / SSIM and those of the two floors, a title, an optional caption (evaluate.py: the split's
    figures) and, for MAE, a note on why the raw output's visible patches are noise. imgs are normalised (N, 3, H, W)
    on the model's device; the masks are fixed by `seed`, so pictures of successive epochs show the same masks.
    Written atomically: a full disk is one line, and the previous picture is kept."""
    was_training = mae.training
    mae.eval()
    g = torch.Generator(device=imgs.device).manual_seed(seed)
    noise = mae.masking_noise(len(imgs), mask_ratio, masking, generator=g, device=imgs.device)
    imgs = imgs.float()
    _, pred, mask = mae(imgs, mask_ratio, noise=noise)
    mae.train(was_training)
    recon, pasted = mae.reconstruct(imgs, pred, mask)
    pix_mask = mae.pixel_mask(mask)                                        # (N, 1, H, W), 1 = masked
    orig, pasted = data.denormalize(imgs).clamp(0, 1), data.denormalize(pasted).clamp(0, 1)
    cols = [orig * (1 - pix_mask) + 0.5 * pix_mask,                        # masked patches shown grey
            data.denormalize(recon).clamp(0, 1), pasted, orig]
    if mae.cfg.norm_pix_loss:  # its pixels need each patch's true mean and variance: not scored (see markdown())
        row_text = [['not scored:', 'norm_pix_loss']] * len(imgs)
    else:
        scores = {kind: image_metrics(to_hwc(img), to_hwc(orig))
                  for kind, img in scored_images(pasted, orig, 1 - pix_mask, mae.cfg.patch_size).items()}
        row_text = [[f"{SHORT.get(kind, kind)} {scores[kind][0][r]:.2f} / {scores[kind][1][r]:.3f}" for kind in KINDS]
                    for r in range(len(imgs))]
    trained = mae.cfg.loss_on_all  # SMAE's pixel loss covers every patch; MAE's only the masked ones
    labels = ['masked input', 'raw output' + ('' if trained else ' (visible patches: never trained)'),
              'visible patches pasted', 'original', 'this image: PSNR (dB) / SSIM']
    note = '' if trained else ("The raw output's visible patches are noise by design: MAE's loss covers only the "
                               "masked patches, so the model is never trained to reproduce the visible ones. The next "
                               "column pastes the input's visible patches in; that image is the one scored.")
    # layout: title and caption, column labels, the rows (tiles, then the figures), the note
    N, _, H, W = orig.shape
    font, cell, pad, line = ImageFont.load_default(size=LABEL_FONT), W * scale, 4, LABEL_FONT + 4
    measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    text_w = max(measure.textlength(t, font=font) for rows in row_text + [labels[-1:]] for t in rows)
    width = 4 * (cell + pad) + int(text_w) + 3 * pad
    head = _wrap(measure, f"{title} | mask {mask_ratio:g} {masking}", font, width - 2 * pad)
    head += _wrap(measure, caption, font, width - 2 * pad)
    col_labels = [_wrap(measure, label, font, cell) for label in labels[:4]] + [labels[-1:]]
    foot = _wrap(measure, note, font, width - 2 * pad)
    top = 2 * pad + (len(head) + max(map(len, col_labels))) * line
    canvas = Image.new('RGB', (width, top + N * (cell + pad) + len(foot) * line + pad), 'white')
    draw = ImageDraw.Draw(canvas)

    def lines(texts, x, y):
        for j, text in enumerate(texts):
            draw.text((x, y + j * line), text, fill='black', font=font)
    lines(head, pad, pad)
    for c, label in enumerate(col_labels):
        lines(label, pad + c * (cell + pad), 2 * pad + len(head) * line)
    pixels = (torch.stack(cols, dim=1) * 255).round().byte().permute(0, 1, 3, 4, 2).cpu().numpy()  # (N, 4, H, W, 3)
    for r in range(N):
        y = top + r * (cell + pad)
        for c in range(4):
            tile = Image.fromarray(pixels[r, c]).resize((cell, H * scale), Image.NEAREST)
            canvas.paste(tile, (pad + c * (cell + pad), y))
        lines(row_text[r], pad + 4 * (cell + pad), y)
    lines(foot, pad, top + N * (cell + pad))
    png = io.BytesIO()
    canvas.save(png, format='PNG')
    common.save_atomic(png.getvalue(), path)
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
    if probe_epochs > 0:
        n_train = len(splits['train'].labels)
        batch, lr, note = probe.batch_and_lr(n_train, PROBE_RECIPE['batch_size'], PROBE_RECIPE['lr'])
        recipe = dict(PROBE_RECIPE, batch_size=batch, lr=lr,
                      warmup_epochs=min(PROBE_RECIPE['warmup_epochs'], probe_epochs - 1))
        if note:
            run.print(f"linear probe {note}")
    for kind in FEATURES:
        t0 = time.time()
        net = {'model': encoder, 'random_init_floor': random_encoder}.get(kind)  # None: the raw-pixel floor
        feats = {s: pixel_features(splits[s], run.device) if net is None else
                 probe.extract_features(net, splits[s].images, splits[s].labels, run.device, **kw)
                 for s in ('train', 'val')}
        knn = knn_classify(*feats['train'], *feats['val'], splits['train'].num_classes, k=cfg.knn_k,
                           temperature=cfg.knn_temperature)
        run.log(dict(event='knn', features=kind, **knn), f"kNN, {FEATURE_NAMES[kind]}: top-1 {knn['top1']:.2f}% "
                f"top-5 {knn['top5']:.2f}% ({time.time() - t0:.1f}s)")
        out[kind] = dict(knn=knn, probe=None)
        if probe_epochs > 0:
            t0 = time.time()
            head = probe.train_linear_head(*feats['train'], *feats['val'], splits['train'].num_classes,
                                           epochs=probe_epochs, seed=cfg.seed, progress=run, **recipe)
            out[kind]['probe'] = dict(top1=head['top1'], top5=head['top5'], best_top1=head['best_top1'],
                                      best_epoch=head['best_epoch'], epochs=probe_epochs, batch_size=batch)
            run.log(dict(event='linear_probe', features=kind, **out[kind]['probe']),
                    f"linear probe, {FEATURE_NAMES[kind]}: top-1 {head['top1']:.2f}% top-5 {head['top5']:.2f}% "
                    f"({probe_epochs} epochs, {time.time() - t0:.1f}s)")
    return out


def load_splits(name, cfg):
    """{'train', 'val'} of a dataset, limited to --subset train and --max_images val images (fixed by the seed), and
    'whole_val', the whole val split (the pictures' images are chosen from it as pretrain.py chooses them)."""
    train, val = (data.load_split(name, s, cfg.data_dir, download=cfg.download) for s in ('train', 'val'))
    return dict(train=data.subset(train, cfg.subset, cfg.seed), val=data.subset(val, cfg.max_images, cfg.seed),
                whole_val=val)


def picture_images(val, ck_cfg):
    """The uint8 images of pretrain.py's pictures (recon_epNNNN.png): the val split spread over the run's
    val_images, then every (len // 8)-th of those, 8 of them, as pretrain.py takes them."""
    n = ck_cfg.get('val_images')
    shown = data.spread(val, n if type(n) is int and n >= 1 else PRETRAIN_VAL_IMAGES)
    return shown.images[::max(1, len(shown.labels) // 8)][:8]


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
            skipped = name == res['dataset'] and not res['probe_epochs']
            probe_txt = fmt(r['probe']['top1'], '.2f') if r['probe'] else 'skipped' if skipped else ''
            lines.append(f"| {name}: {FEATURE_NAMES[kind]} | {r['knn']['top1']:.2f} | {r['knn']['top5']:.2f} | {probe_txt} | {note.strip()} |")
    probe_txt = (f"{res['probe_epochs']} epochs of the study's recipe" if res['probe_epochs'] else
                 "skipped (--probe_epochs 0)")
    lines += ["", f"kNN: weighted, k={res['knn_k']}, T={res['knn_temperature']:g}, train split as the bank, val split as "
              f"the queries. Linear probe: {probe_txt}. A model below a floor has learnt less than that floor already "
              f"holds."]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# the command


def main(argv=None):
    # every check, the weights and the data before anything is written
    cfg, given = common.configure(globals(), argv)
    if int(os.environ.get('RANK', -1)) != -1:
        raise common.UserError("evaluate.py runs in one process: start it with python, not torchrun")
    ck = common.load_checkpoint(cfg.ckpt, kinds=('pretrain', 'dino'))
    common.follow_checkpoint(cfg, given, ck, cfg.ckpt)
    cfg.dataset = cfg.dataset or 'tin'  # (a checkpoint that does not record its dataset)
    mcfg = common.model_config(ck, cfg.ckpt, img_size=cfg.img_size or None)
    try:
        mcfg = replace(mcfg, mask_ratio=cfg.mask or mcfg.mask_ratio, masking=cfg.masking or mcfg.masking)
    except ValueError as e:
        raise common.UserError(str(e)) from None
    encoder = common.load_encoder(cfg.ckpt, loaded=ck, img_size=mcfg.img_size)[0].eval()
    skip = ("a dino.py checkpoint has no decoder: it does not reconstruct" if ck['kind'] == 'dino' else
            "a norm_pix_loss model predicts per-patch normalised pixels; turning them into pixels needs each masked "
            "patch's true mean and variance, which would leak the answer into PSNR/SSIM/LPIPS and make them "
            "incomparable with raw-pixel models" if mcfg.norm_pix_loss else None)
    mae = None if skip else M.build_mae(mcfg).eval()
    if mae is not None:
        try:
            M.load_weights(mae, ck['model'], what=cfg.ckpt)
        except ValueError as e:
            raise common.UserError(str(e)) from None
    splits = load_splits(cfg.dataset, cfg)
    # the out_dir: locked first, then checked (no other run can change it between the check and the writes)
    cfg.out_dir = cfg.out_dir or os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt)), 'eval')
    # (a refused run leaves no folder behind: the lock removes the folders it created, if they are still empty)
    ck_id = checkpoint_id(ck)
    with common.Run(cfg, 'evaluate', training=False) as run:
        check_own_folder(cfg.out_dir, cfg.ckpt, ck, ck_id)
        return evaluate(cfg, ck, ck_id, mcfg, encoder, mae, skip, splits, run)


def checkpoint_id(ck):
    """The checkpoint's identity wherever its file lies (a run folder may be moved or renamed): kind, step and a hash
    of its weights."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(ck['model'].items()):
        digest.update(name.encode())
        digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy())
    return f"{ck['kind']} step {ck.get('step')} weights {digest.hexdigest()}"


def check_own_folder(out_dir, ck_path, ck, ck_id):
    """evaluate.py writes only into an empty folder or one that holds its own earlier evaluation of this checkpoint:
    anything else is a UserError, before anything is written. Called with out_dir locked."""
    names, log = set(os.listdir(out_dir)), os.path.join(out_dir, 'log.jsonl')

    def refuse(foreign):
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ''
        raise common.UserError(f"out_dir {out_dir} holds files evaluate.py did not write ({', '.join(foreign[:3])}"
                               f"{more}): it writes only into an empty folder or its own earlier evaluation; choose "
                               f"another --out_dir (by default each checkpoint is evaluated in <its folder>/eval)")
    if names - set(OWN_FILES):
        refuse(sorted(names - set(OWN_FILES)))
    previous = os.path.join(out_dir, 'eval.json')
    if os.path.exists(previous):
        old = None
        with contextlib.suppress(ValueError, OSError, AttributeError):
            old = json.load(open(previous)).get('checkpoint_id')
        earlier_form = f"{os.path.realpath(ck_path)} at step {ck.get('step')}"  # the form earlier versions wrote
        if old not in (ck_id, earlier_form):
            raise common.UserError(f"{previous} holds an evaluation of another checkpoint ({old or 'unknown'}): choose "
                                   f"another --out_dir (by default each checkpoint is evaluated beside itself)")
    # files of evaluate.py's names are its own only beside its own log (each run's first record names its script)
    if names and not os.path.isfile(log):
        refuse([f"{', '.join(sorted(names))} without evaluate.py's log.jsonl"])
    if names and common.log_scripts(log) != {'evaluate'}:
        refuse(["log.jsonl (another script's log)"])


def reconstructions(cfg, ck, mcfg, mae, skip, run, splits):
    """Reconstruction metrics on the val split and recon.png, when the checkpoint makes pictures one can score ->
    (metrics or dict(skipped=why), why LPIPS is missing or None, the picture's path or None)."""
    if skip:
        run.print(f"reconstruction not scored: {skip}")
        return dict(skipped=skip), skip, None
    lpips_net, lpips_reason = load_lpips(run.device) if cfg.use_lpips else (None, "LPIPS skipped (--use_lpips false)")
    if lpips_reason:
        run.print(lpips_reason)
    mae, val, t0 = mae.to(run.device), splits['val'], time.time()
    rec = reconstruction_metrics(mae, val, mcfg.mask_ratio, mcfg.masking, cfg, run, lpips_net)
    m = rec['model']
    run.log(dict(event='reconstruction', images=len(val.labels), seconds=round(time.time() - t0, 1), **rec),
            f"reconstruction on {len(val.labels)} {cfg.dataset} val images ({time.time() - t0:.1f}s): PSNR "
            f"{fmt(m['psnr'], '.2f')} dB SSIM {fmt(m['ssim'], '.4f')} LPIPS {fmt(m['lpips'], '.4f')} masked MSE "
            f"{fmt(rec['masked_mse'], '.4f')}")
    # the picture: the images and masks of pretrain.py's pictures (the run's seed), the split's figures in its caption
    shown = picture_images(splits['whole_val'], ck['config'])
    x8, _ = next(data.iterate_batches(shown, None, len(shown), run.device, img_size=mcfg.img_size))
    seed = ck['config'].get('seed', cfg.seed)
    figures = ', '.join(f"{SHORT.get(k, k)} {fmt(rec[k]['psnr'], '.2f')} / {fmt(rec[k]['ssim'], '.3f')}" for k in KINDS)
    caption = (f"{cfg.dataset} val, {len(val.labels)} images (masks of seed {cfg.seed}), PSNR (dB) / SSIM: {figures}. "
               f"Rows: the images and masks (seed {seed}) of the run's training pictures.")
    picture = reconstruction_grid(mae, x8, mcfg.mask_ratio, mcfg.masking, seed, os.path.join(cfg.out_dir, 'recon.png'),
                                  f"{cfg.ckpt}, epoch {ck.get('epoch', 0):g}", caption=caption)
    return rec, lpips_reason, picture


def evaluate(cfg, ck, ck_id, mcfg, encoder, mae, skip, splits, run):
    t_start, ck_cfg, name = time.time(), ck['config'], cfg.dataset
    encoder = encoder.to(run.device)
    # the random-init floor is the run's own initial encoder (the seed it was trained with), which pretrain.py and
    # dino.py also log as their kNN floor at step 0
    random_encoder = probe.initial_encoder(ck, encoder.cfg).to(run.device)
    transfer = {'auto': 'cub' if name == 'tin' else None, 'none': None}.get(cfg.transfer_dataset, cfg.transfer_dataset)
    transfer = None if transfer == name else transfer
    run.taken("the checkpoint's", img_size=mcfg.img_size,
              **(dict(mask=mcfg.mask_ratio, masking=mcfg.masking) if ck['kind'] == 'pretrain' else {}))
    run.banner({'checkpoint': f"{cfg.ckpt} ({ck['kind']}, {ck_cfg.get('model')}, epoch {ck.get('epoch', 0):g})",
                'mask': 'none (no decoder)' if ck['kind'] == 'dino' else f"{mcfg.mask_ratio:g} {mcfg.masking}",
                'dataset': name, 'transfer': transfer or 'none'})
    val = splits['val']
    # 1. reconstructions and their floors on the val split
    rec, lpips_reason, picture = reconstructions(cfg, ck, mcfg, mae, skip, run, splits)
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
    res = dict(checkpoint=cfg.ckpt, checkpoint_id=ck_id, kind=ck['kind'],
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
