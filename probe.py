"""
Linear probing of a frozen pre-trained encoder (the official MAE protocol: BatchNorm without affine parameters,
then a Linear layer, on the encoder's cls feature).

    python probe.py --ckpt out/pretrain/ckpt.pt                         # the study's probe, on the checkpoint's data
    python probe.py --ckpt out/pretrain/ckpt.pt --dataset cub --out_dir out/probe_cub

There is no augmentation, so the frozen features of the train and val splits are extracted once (eval mode,
autocast, no gradients) and kept on the device; the head then trains on those tensors with on-device shuffling
drawn from (seed, epoch). The dataset and image size are the checkpoint's unless --dataset / --img_size are given.
Beside the top-1 stands its floor: the same probe on the run's initial (random) encoder (its features and head
again, so about twice the time; --floor false skips it). A 50-epoch probe on TIN takes seconds on a GPU. Writes
<out_dir>/results.json, ckpt.pt (kind 'probe': the head's weights) and log.jsonl.

Under torchrun only rank 0 probes (feature extraction is cheap); the other ranks exit at once. --resume true with
more --epochs reruns an unfinished or shorter probe in its own out_dir from the start (it takes seconds, so there is
nothing worth continuing); a finished probe is never rewritten, and an out_dir holding any other checkpoint is refused.

The functions extract_features, train_linear_head and accuracy are public: evaluate.py calls them.
"""
import contextlib
import json
import os
import time
from dataclasses import asdict, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
import model as M

# -----------------------------------------------------------------------------
# config: the study's linear-probe recipe (its Table 6, listed in the README's recipe table)
# data
dataset = 'tin'             # tin | cub (val: its test split) | demo | synthetic; the checkpoint's unless given
data_dir = 'data'           # where tiny-imagenet-200/ and CUB_200_2011/ live (and their decoded caches)
download = False            # fetch the official archive into data_dir if it is missing
subset = 0                  # >0: train the head on a fixed random subset of this many images (val is always whole)
# model
ckpt = ''                   # pretrain.py or dino.py checkpoint whose frozen encoder is probed (required)
model = 'vit_lite'          # the checkpoint's architecture is used; a given --model is checked against it
img_size = 0                # input resolution; the checkpoint's unless given
pool = 'cls'                # feature: cls token (official) | mean of the patch tokens
# optimisation
epochs = 50                 # probe epochs
warmup_epochs = 2           # linear warmup, then cosine decay to 0
batch_size = 128            # batch of features per step (at most the training images; the lr follows the batch used)
lr = 1e-3                   # Adam learning rate at batch 128; scaled linearly: lr * batch / 128 (as everywhere)
beta1 = 0.9                 # Adam beta1
beta2 = 0.95                # Adam beta2 (no weight decay)
# system
device = 'auto'             # auto (cuda if available) | cuda | cuda:N | cpu
dtype = 'bfloat16'          # autocast of the feature extraction on CUDA: bfloat16 | float16 | float32; the head trains in float32
seed = 0                    # seeds the head's initialisation and the order of the features
feature_batch = 512         # images per encoder forward pass when extracting features
floor = True                # also probe the run's initial (random) encoder: the floor beside the top-1 (2x the time)
# output
out_dir = 'out/probe'       # results.json, ckpt.pt, log.jsonl
resume = False              # rerun the probe (with more --epochs) in an out_dir that holds a probe.py run
log_every = 1               # epochs between printed lines (every epoch is in log.jsonl)
# -----------------------------------------------------------------------------

CHECKS = [(lambda c: c.ckpt, "probe.py needs --ckpt: the pretrain.py checkpoint whose frozen encoder is probed "
                            "(a pre-training run writes <out_dir>/ckpt.pt)")]


@torch.no_grad()
def extract_features(encoder, images_uint8, labels, device, batch_size=512, img_size=None, pool='cls',
                     autocast=contextlib.nullcontext(), progress=None):
    """Frozen features (eval() mode) of uint8 images (N, 3, 64, 64) -> (float32 (N, D), int64 labels or None), on
    device; img_size None = encoder.cfg.img_size; progress: a common.Run to print progress on in long extractions."""
    encoder.eval()
    feats, ys = [], []
    with common.Progress('image', len(images_uint8), progress, 'features') as meter:
        size = img_size or encoder.cfg.img_size
        for x, y in data.iterate_batches(images_uint8, labels, batch_size, device, img_size=size):
            with autocast:
                feats.append(encoder.forward_features(x, pool=pool).float())
            ys.append(y)
            meter.update(sum(len(f) for f in feats))
    if not feats:
        raise ValueError("extract_features got no images")
    return torch.cat(feats), (None if labels is None else torch.cat(ys))


def accuracy(logits, labels, topk=(1, 5)):
    """Top-k accuracies in percent, one float per k (k is capped at the number of classes)."""
    return [100.0 * c.item() / len(labels) for c in common.topk_correct(logits, labels, topk)]


def make_head(dim, num_classes, seed=0):
    """BatchNorm1d(affine=False, eps=1e-6) + Linear (official MAE linear probe; Linear weight trunc_normal std 0.01)."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01, generator=torch.Generator().manual_seed(data.seed_for(seed, 5)))
    nn.init.zeros_(head[1].bias)
    return head


@torch.no_grad()
def _eval_head(head, feats, labels, chunk=8192, **record):
    """record + top1, top5 and val_loss of the head (put in eval mode) on the val features."""
    head.eval()
    logits = torch.cat([head(feats[i:i + chunk]) for i in range(0, len(feats), chunk)])
    top1, top5 = accuracy(logits, labels)
    return dict(record, top1=top1, top5=top5, val_loss=F.cross_entropy(logits, labels).item())


def train_linear_head(train_feats, train_labels, val_feats, val_labels, num_classes, *, epochs=50, warmup_epochs=2,
                      batch_size=128, lr=1e-3, betas=(0.9, 0.95), seed=0, log=None, progress=None):
    """Train BatchNorm + Linear on fixed features with Adam (no weight decay), per-step warmup + cosine, in float32 on
    the features' device. lr is the peak learning rate as given (callers apply the batch scaling rule). Batches are
    drawn without replacement from a permutation seeded by (seed, epoch); the last partial batch is dropped (as in
    training), unless the features are fewer than one batch. Evaluates on the val features after every epoch.
    log: optional callable(record, line) called once per epoch; progress: a common.Run to print progress on (a line
    at least every 10 s). -> dict(top1, top5 (% after the last epoch), best_top1, best_epoch, history=[dict(epoch, loss,
    lr, top1, top5, val_loss)], head=the trained head in eval mode)."""
    (n, dim), device = train_feats.shape, train_feats.device
    head = make_head(dim, num_classes, seed).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, betas=betas)
    steps_per_epoch = max(1, n // batch_size)
    total_steps, warmup_steps = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    gen, history, step = torch.Generator(device=device), [], 0
    meter = common.Progress('step', total_steps, progress, 'linear probe', per=batch_size).start()
    for epoch in range(epochs):
        head.train()
        perm = torch.randperm(n, generator=gen.manual_seed(data.seed_for(seed, epoch)), device=device)
        loss_sum = torch.zeros((), device=device)
        for i in range(steps_per_epoch):
            optimizer.param_groups[0]['lr'] = lr_now = common.get_lr(step, total_steps, warmup_steps, lr)
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(head(train_feats[idx]), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            step += 1
            meter.update(step)
        rec = _eval_head(head, val_feats, val_labels, epoch=epoch + 1, loss=loss_sum.item() / steps_per_epoch, lr=lr_now)
        history.append(rec)
        if log is not None:
            log(dict(event='probe', **rec), f"epoch {epoch + 1:4d}/{epochs} | loss {rec['loss']:.4f} | lr {lr_now:.2e} | "
                f"val top-1 {rec['top1']:.2f}% | top-5 {rec['top5']:.2f}% | val loss {rec['val_loss']:.4f}")
    meter.stop()
    history = history or [_eval_head(head, val_feats, val_labels, epoch=0, loss=None, lr=0.0)]  # epochs 0: untrained
    last, best = history[-1], max(history, key=lambda r: r['top1'])
    return dict(top1=last['top1'], top5=last['top5'], best_top1=best['top1'], best_epoch=best['epoch'], history=history,
                head=head)


def batch_and_lr(n, batch_size, lr):
    """(batch, peak lr, note) of a head trained on n features: the batch is capped at n (a --subset smaller than the
    batch), and lr, given at batch 128, scales linearly with the batch actually used; note says so when capped."""
    batch = min(batch_size, n)
    note = (f"batch: {batch_size} is more than the {n} training images, so the head trains on batches of {batch}, with "
            f"the lr scaled to that batch ({lr:g} x {batch}/128)" if batch < batch_size else None)
    return batch, lr * batch / 128, note


def initial_encoder(pre, encoder_cfg):
    """The run's own initial (random) encoder at encoder_cfg: what pretrain.py or dino.py built from the run's seed
    before training. A probe or kNN figure is read beside it (pretrain.py and dino.py log its kNN top-1 at step 0)."""
    torch.manual_seed(pre['config'].get('seed', 0))
    initial = M.build_mae(encoder_cfg) if pre['kind'] == 'pretrain' else None  # pretrain.py built the whole MAE
    encoder = M.VisionTransformer(replace(encoder_cfg, num_classes=0))        # dino.py: the encoder itself
    if initial is not None:
        encoder.load_state_dict(M.encoder_state_dict(initial.state_dict()))
    return encoder.eval().requires_grad_(False)


def main(argv=None):
    cfg, given = common.configure(globals(), argv, CHECKS)
    # the out_dir is locked before it is looked at, so no other run can change it between the checks and the writes
    # (a refused run leaves no folder behind: the lock removes the folders it created)
    with common.out_dir_locked(cfg.out_dir, 'probe'):
        resumed, cfg = common.check_out_dir(cfg, given, 'probe', (), CHECKS)  # refuses another run's folder, a finished probe
        # a wrong --ckpt, or an --img_size it cannot take, fails before anything is written
        pre = common.load_checkpoint(cfg.ckpt, kinds=('pretrain', 'dino'))
        if resumed is None:  # (a resumed probe keeps its stored dataset)
            common.follow_checkpoint(cfg, given, pre, cfg.ckpt)
        common.model_config(pre, cfg.ckpt, img_size=cfg.img_size or None)
        encoder = common.load_encoder(cfg.ckpt, expect_model=cfg.model if 'model' in given else None, loaded=pre,
                                      img_size=cfg.img_size or None)[0].requires_grad_(False)
        cfg.model = pre['config'].get('model', cfg.model)  # record the architecture actually probed
        master = int(os.environ.get('RANK', 0)) == 0
        splits = None
        if master:  # the data is found before anything is written
            train, val = (data.load_split(cfg.dataset, s, cfg.data_dir, download=cfg.download) for s in ('train', 'val'))
            splits = data.subset(train, cfg.subset, cfg.seed), val
        with common.Run(cfg, 'probe', lock=master, training=False) as run:
            if not run.master:
                return 0  # rank 0 does the whole probe: the features take seconds to extract
            return probe(cfg, given, pre, encoder, splits, run)


def probe(cfg, given, pre, encoder, splits, run):
    t_start, device, (train_split, val_split) = time.time(), run.device, splits
    encoder = encoder.to(device)
    num_classes = train_split.num_classes
    batch, peak_lr, batch_note = batch_and_lr(len(train_split.labels), cfg.batch_size, cfg.lr)
    warmup = common.warmup_steps(cfg, given, 1, run, unit='epoch')  # (in epochs: one 'step' per epoch)
    run.taken("the checkpoint's", img_size=encoder.cfg.img_size)
    run.banner({'encoder': f"{cfg.model} {encoder.cfg.img_size}px from {cfg.ckpt} (pre-trained {pre.get('epoch', 0):.0f} epochs)",
                'params': f"{sum(p.numel() for p in encoder.parameters()) / 1e6:.2f}M (frozen)", 'classes': num_classes,
                'train images': len(train_split.labels), 'val images': len(val_split.labels), 'batch': batch,
                'peak lr': f"{peak_lr:.3g}", 'floor': "the run's initial (random) encoder" if cfg.floor else 'none'})
    if batch_note:
        run.print(batch_note)
    kw = dict(batch_size=cfg.feature_batch, pool=cfg.pool, autocast=run.autocast, progress=run)
    recipe = dict(epochs=cfg.epochs, warmup_epochs=warmup, batch_size=batch, lr=peak_lr, betas=(cfg.beta1, cfg.beta2),
                  seed=cfg.seed)
    t0 = time.time()
    (train_f, train_y), (val_f, val_y) = (extract_features(encoder, s.images, s.labels, device, **kw)
                                          for s in (train_split, val_split))
    feature_s = time.time() - t0  # (extract_features' .float() results are read back below: no sync needed here)
    run.log(dict(event='features', train=len(train_f), val=len(val_f), dim=train_f.shape[1], seconds=feature_s),
            f"features: {len(train_f)} train + {len(val_f)} val of dim {train_f.shape[1]} ({cfg.pool}) in {feature_s:.1f}s")

    def log(record, line):
        run.log(record, line if record['epoch'] % cfg.log_every == 0 or record['epoch'] == cfg.epochs else None)
    t0 = time.time()
    out = train_linear_head(train_f, train_y, val_f, val_y, num_classes, log=log, progress=run, **recipe)
    head_s = time.time() - t0
    floor = None
    if cfg.floor:  # the same probe on the run's initial (random) encoder: what pre-training added is the difference
        t0 = time.time()
        random_encoder = initial_encoder(pre, encoder.cfg).to(device)
        feats = [extract_features(random_encoder, s.images, s.labels, device, **kw) for s in (train_split, val_split)]
        head = train_linear_head(*feats[0], *feats[1], num_classes, progress=run, **recipe)
        floor = dict(features="the run's initial (random) encoder", top1=head['top1'], top5=head['top5'],
                     seconds=round(time.time() - t0, 1))
        run.log(dict(event='floor', **floor), f"floor, the same probe on the run's initial (random) encoder: top-1 "
                f"{floor['top1']:.2f}% top-5 {floor['top5']:.2f}% ({floor['seconds']:.1f}s)")
    wall_s = time.time() - t_start
    common.save_checkpoint({'kind': 'probe', 'model': out['head'].state_dict(), 'model_config': asdict(encoder.cfg),
                        'config': vars(cfg), 'encoder_ckpt': cfg.ckpt, 'pool': cfg.pool, 'num_classes': num_classes,
                        'step': cfg.epochs, 'epoch': cfg.epochs, 'top1': out['top1'], 'top5': out['top5'],
                        'classes': list(train_split.classes)}, cfg.out_dir)
    results = dict({k: out[k] for k in ('top1', 'top5', 'best_top1', 'best_epoch')}, floor=floor, epoch=cfg.epochs,
                   dataset=cfg.dataset, model=cfg.model, ckpt=cfg.ckpt, pool=cfg.pool, num_classes=num_classes,
                   train_images=len(train_f), val_images=len(val_f), batch_size=batch, peak_lr=peak_lr,
                   feature_s=round(feature_s, 2), head_s=round(head_s, 2), floor_s=floor and floor['seconds'],
                   wall_s=round(wall_s, 1), history=out['history'], config=vars(cfg))
    common.save_atomic(json.dumps(results, indent=1) + '\n', os.path.join(cfg.out_dir, 'results.json'))
    beside = (f"; floor (the run's initial random encoder) top-1 {floor['top1']:.2f}%" if floor else
              " (no floor: --floor false)")
    run.print(f"done in {wall_s:.1f}s (features {feature_s:.1f}s, head {head_s:.1f}s"
              + (f", floor {floor['seconds']:.1f}s" if floor else "") + f"): linear probe val top-1 {out['top1']:.2f}% "
              f"top-5 {out['top5']:.2f}% (best top-1 {out['best_top1']:.2f}% at epoch {out['best_epoch']}){beside}; "
              f"{cfg.out_dir}/results.json")
    return 0


if __name__ == '__main__':
    common.cli(main)
