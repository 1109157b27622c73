"""
Fine-tuning: a classifier on tin, cub or demo, from a pre-trained MAE encoder, from scratch, or a SqueezeNet.

    python finetune.py --ckpt out/pretrain/ckpt.pt                      # the paper's fine-tuning recipe on Tiny ImageNet
    python finetune.py --ckpt out/pretrain/ckpt.pt --dataset cub        # transfer to CUB (lr 5e-4, the recipe's for CUB)
    python finetune.py --out_dir out/supervised                         # ViT-Lite from scratch (the supervised baseline)
    python finetune.py --arch squeezenet --dataset tin --out_dir out/critic --epochs 200 --warmup_epochs 10 --weight_decay 0.15
    torchrun --nproc_per_node=2 finetune.py --ckpt out/pretrain/ckpt.pt # the same run on two GPUs

Every constant below can be overridden as --name value or --name=value. Defaults are the paper's fine-tuning
recipe (PAPER.md section 3). Writes <out_dir>/ckpt.pt (kind 'finetune'), log.jsonl and results.json (top-1 and
top-5 on the official val split: TIN val, CUB test). The data order depends only on (seed, epoch); the
augmentation and mixup draws on (seed, epoch, step, rank, micro-step).
"""
import json
from dataclasses import asdict
import os
import time

import torch
import torch.nn.functional as F

import common
import data
import model as M

# -----------------------------------------------------------------------------
# config: the paper's fine-tuning recipe
# data
dataset = 'tin'             # tin | cub (val = the official test split) | demo (embedded, no download) | synthetic
data_dir = 'data'           # where tiny-imagenet-200/ and CUB_200_2011/ live (and their decoded caches)
download = False            # fetch the official archive into data_dir if it is missing
augment = True              # RandomResizedCrop + flip + RandAugment(2, 9) on the device (the paper's recipe)
subset = 0                  # >0: train on a fixed random subset of this many images (quick experiments, tests)
# model
ckpt = ''                   # pretrain.py checkpoint whose encoder starts the classifier; '' = random init (supervised baseline)
arch = 'vit'                # vit | squeezenet (torchvision SqueezeNet 1.1 from scratch: the SMAE critic, a CNN baseline)
model = 'vit_lite'          # preset in model.PRESETS for random init; with --ckpt the checkpoint's (a given --model is checked)
img_size = 0                # input resolution; 0 = the checkpoint's / the preset's (64 for squeezenet)
patch_size = 0              # patch side; 0 = the checkpoint's / the preset's
global_pool = 'cls'         # classifier feature: cls token | mean of the patch tokens
drop_path = 0.0             # stochastic depth rate at the last block (official MAE fine-tuning option)
# regularisation (official MAE fine-tuning options, off in the paper)
label_smoothing = 0.0       # label smoothing of the cross-entropy targets
mixup = 0.0                 # mixup alpha; >0 turns mixup on (soft-target cross-entropy)
cutmix = 0.0                # cutmix alpha; >0 turns cutmix on (with mixup too: one of the two per batch, 50/50)
# optimisation
epochs = 100                # fine-tuning epochs
warmup_epochs = 5           # linear warmup, then cosine decay to min_lr
batch_size = 128            # global batch per optimizer step (all GPUs, all accumulation steps)
accum_steps = 1             # gradient accumulation micro-steps per optimizer step
lr = 0.0                    # learning rate at batch 128, scaled linearly: lr * batch_size / 128; 0 = the recipe's: 1e-3, or 5e-4 for cub
min_lr = 0.0                # final learning rate of the cosine schedule
weight_decay = 0.05         # AdamW weight decay (not on biases and norms)
beta1 = 0.9                 # AdamW beta1
beta2 = 0.999               # AdamW beta2
layer_decay = 1.0           # layer-wise lr decay (official MAE): lr x layer_decay^(depth + 1 - layer); 1.0 = off
grad_clip = 0.0             # clip the gradient norm at this value; 0 = off (as in the paper)
# system
device = 'auto'             # auto (cuda if available) | cuda | cpu
dtype = 'bfloat16'          # autocast on CUDA: bfloat16 | float16 (with GradScaler) | float32; CPU runs float32
compile = True              # torch.compile the model on CUDA (CPU runs eager)
compile_mode = 'reduce-overhead'  # torch.compile mode; reduce-overhead = CUDA graphs (under DDP: default)
seed = 0                    # seeds the head / model initialisation, the data order, the augmentation and drop path
# output
out_dir = 'out/finetune'    # ckpt.pt, log.jsonl, results.json
resume = False              # continue the run in out_dir from its ckpt.pt
log_every = 50              # steps between log lines (each costs one host sync)
ckpt_every = 10             # epochs between checkpoints (and always at the end)
eval_every = 1              # epochs between top-1/top-5 evaluations on the val split (and always at the end)
bench_steps = 0             # >0: benchmark mode: time this many steps after warm-up, print, exit (no files)
bench_warmup = 30           # benchmark warm-up steps (compilation, CUDA graph capture)
# -----------------------------------------------------------------------------

ARCH_KEYS = ('arch', 'model', 'img_size', 'patch_size', 'global_pool', 'ckpt', 'dataset')  # may not change on resume
RECIPE_LR = {'cub': 5e-4}   # base lr at batch 128 when --lr is 0; 1e-3 for every other dataset
EVAL_BATCH = 512            # images per forward pass in evaluation
MIXUP_SWITCH_PROB = 0.5     # with both mixup and cutmix on: probability of cutmix for a batch (timm's default)


def base_lr(cfg):
    """The learning rate at batch 128: --lr, or the recipe's (1e-3; 5e-4 on CUB) when --lr is 0."""
    return cfg.lr if cfg.lr > 0 else RECIPE_LR.get(cfg.dataset, 1e-3)


def check_config(cfg, run):
    """Validate the options that need no file or data; every mistake becomes a one-line UserError."""
    if cfg.arch not in ('vit', 'squeezenet'):
        raise common.UserError(f"--arch must be vit or squeezenet, got {cfg.arch!r}")
    if cfg.arch == 'squeezenet':
        if cfg.ckpt:
            raise common.UserError(f"--arch squeezenet trains from scratch (SqueezeNet has no MAE pre-training), but --ckpt "
                                   f"{cfg.ckpt} was given: drop --ckpt, or use --arch vit to fine-tune that checkpoint")
        for name, off in (('layer_decay', 1.0), ('drop_path', 0.0), ('global_pool', 'cls')):
            if getattr(cfg, name) != off:
                raise common.UserError(f"--{name} applies to ViTs only; --arch squeezenet takes --{name} {off}")
    if not 0.0 < cfg.layer_decay <= 1.0:
        raise common.UserError(f"--layer_decay must be in (0, 1], got {cfg.layer_decay}: 1.0 is off, official MAE uses 0.65-0.75")
    if not 0.0 <= cfg.drop_path < 1.0:
        raise common.UserError(f"--drop_path must be in [0, 1), got {cfg.drop_path}")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise common.UserError(f"--label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if cfg.mixup < 0 or cfg.cutmix < 0:
        raise common.UserError(f"--mixup and --cutmix are Beta alphas >= 0 (0 = off), got {cfg.mixup} and {cfg.cutmix}")
    if cfg.global_pool not in ('cls', 'mean'):
        raise common.UserError(f"--global_pool must be cls or mean, got {cfg.global_pool!r}")
    if cfg.lr < 0:
        raise common.UserError(f"--lr must be >= 0 (0 = the recipe's), got {cfg.lr}")
    if cfg.eval_every < 1:
        raise common.UserError(f"--eval_every must be >= 1, got {cfg.eval_every}")
    if cfg.batch_size % (run.world_size * cfg.accum_steps):
        raise common.UserError(f"--batch_size {cfg.batch_size} is not divisible by world_size x accum_steps = "
                               f"{run.world_size} x {cfg.accum_steps}: choose a multiple")


def build(cfg, given, num_classes, ck, pre=None):
    """The classifier and its description for the checkpoint. From the fine-tuning checkpoint `ck` when resuming,
    else from the pre-training checkpoint (--ckpt), a preset (random init) or torchvision's SqueezeNet 1.1.
    `pre` is the already-loaded pre-training checkpoint (--ckpt). Returns (net, model_config dict, init description)."""
    if cfg.arch == 'squeezenet':
        net = M.build_squeezenet(num_classes)
        mconf = {'num_classes': num_classes, 'img_size': cfg.img_size or 64}
        if ck is not None:
            M.load_weights(net, ck['model'], what=os.path.join(cfg.out_dir, 'ckpt.pt'))
        return net, mconf, 'squeezenet1_1 from scratch'
    if ck is not None:  # resume: the architecture and weights of this run's own checkpoint
        from dataclasses import replace
        mcfg = replace(M.ViTConfig(**ck['model_config']), drop_path=cfg.drop_path)
        net = M.VisionTransformer(mcfg)
        M.load_weights(net, ck['model'], what=os.path.join(cfg.out_dir, 'ckpt.pt'))
        return net, asdict(mcfg), f"resumed from {cfg.out_dir}/ckpt.pt"
    if cfg.ckpt:
        net, pre = common.load_encoder(cfg.ckpt, num_classes, expect_model=cfg.model if 'model' in given else None,
                                       loaded=pre, img_size=cfg.img_size or None, patch_size=cfg.patch_size or None,
                                       drop_path=cfg.drop_path, global_pool=cfg.global_pool)
        cfg.model = pre['config'].get('model', cfg.model)  # record the architecture actually used
        return net, asdict(net.cfg), f"encoder of {cfg.ckpt} (pre-trained {pre.get('epoch', 0):.0f} epochs)"
    try:
        mcfg = M.make_config(cfg.model, img_size=cfg.img_size or None, patch_size=cfg.patch_size or None,
                             drop_path=cfg.drop_path, global_pool=cfg.global_pool)
    except ValueError as e:
        raise common.UserError(str(e)) from None
    net = M.build_classifier(mcfg, num_classes)
    return net, asdict(net.cfg), 'random (supervised from scratch)'


def layer_id(name, depth):
    """Official MAE (util/lr_decay.py): patch_embed, cls_token and pos_embed are layer 0, blocks.i is layer i + 1,
    everything after the blocks (norm, head) is layer depth + 1."""
    if name.startswith(('patch_embed', 'cls_token', 'pos_embed')):
        return 0
    if name.startswith('blocks.'):
        return int(name.split('.')[1]) + 1
    return depth + 1


def optimizer_groups(net, cfg):
    """AdamW groups (no decay on biases, norms and the cls token, as in official MAE fine-tuning) with each
    parameter's layer-wise lr scale layer_decay^(depth + 1 - layer_id); common.set_lr multiplies the lr by it."""
    if cfg.arch != 'vit' or cfg.layer_decay == 1.0:
        return common.param_groups(net, cfg.weight_decay, no_decay=('cls_token',))
    depth = net.cfg.depth
    return common.param_groups(net, cfg.weight_decay, no_decay=('cls_token',),
                               lr_scale_of=lambda n: cfg.layer_decay ** (depth + 1 - layer_id(n, depth)))


@torch.no_grad()
def evaluate(net, split, img_size, run):
    """top-1 / top-5 (%) and mean cross-entropy over the whole val split, in eval() mode. Under DDP each rank takes
    every world_size-th image and the counts are summed over ranks, so every rank gets the same numbers."""
    was_training = net.training
    net.eval()
    idx = torch.arange(run.rank, len(split.labels), run.world_size)
    stats = torch.zeros(4, dtype=torch.float64, device=run.device)  # correct@1, correct@5, loss sum, images
    for x, y in data.iterate_batches(split.images[idx], split.labels[idx], EVAL_BATCH, run.device, img_size=img_size):
        with run.autocast:
            logits = net(x)
        logits = logits.float()
        c1, c5 = common.topk_correct(logits, y)
        stats += torch.stack([c1.double(), c5.double(), F.cross_entropy(logits, y, reduction='sum').double(),
                              torch.tensor(float(len(y)), dtype=torch.float64, device=run.device)])
    net.train(was_training)
    c1, c5, loss_sum, n = (run.mean(v) * run.world_size for v in stats.tolist())
    return dict(top1=100 * c1 / max(n, 1), top5=100 * c5 / max(n, 1), loss=loss_sum / max(n, 1), images=int(n))


def main(argv=None):
    cfg, given = common.parse_config(common.script_defaults(globals()), argv)
    run = common.Run(cfg, 'finetune', lock=cfg.bench_steps == 0)
    try:
        return train(cfg, given, run)
    finally:
        run.close()


def train(cfg, given, run):
    ck = None
    if cfg.bench_steps == 0:
        ck, cfg = common.check_out_dir(run, cfg, given, 'finetune', ARCH_KEYS)
    check_config(cfg, run)
    # a wrong --ckpt fails now, before any data is decoded; the loaded checkpoint is reused by build()
    pre = common.load_checkpoint(cfg.ckpt, kinds=('pretrain',)) if (cfg.ckpt and ck is None) else None
    device = run.device

    # data: the whole split as uint8 on the device; batches are gathered, resized, augmented and normalised there
    train_split = common.take_subset(data.load_split(cfg.dataset, 'train', cfg.data_dir, download=cfg.download),
                                     cfg.subset, cfg.seed)
    num_classes = train_split.num_classes
    if ck is not None and ck['model_config']['num_classes'] != num_classes:
        raise common.UserError(f"{cfg.out_dir}/ckpt.pt has a {ck['model_config']['num_classes']}-way head but {cfg.dataset} has "
                               f"{num_classes} classes: choose another --out_dir")

    torch.manual_seed(cfg.seed)  # same initial weights (the fresh head) on every rank
    net, model_config, init = build(cfg, given, num_classes, ck, pre)
    net = net.to(device)
    img_size = (cfg.img_size or 64) if cfg.arch == 'squeezenet' else net.cfg.img_size
    torch.manual_seed(data.seed_for(cfg.seed, 4, run.rank))  # drop path: its own stream on each rank

    loader = data.DeviceLoader(train_split, batch_size=cfg.batch_size, device=device, seed=cfg.seed,
                               rank=run.rank, world_size=run.world_size, accum_steps=cfg.accum_steps,
                               img_size=img_size, augment=data.finetune_augment if cfg.augment else None)
    steps_per_epoch = loader.steps_per_epoch
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    if cfg.bench_steps:
        total_steps = cfg.bench_warmup + cfg.bench_steps
    peak_lr = base_lr(cfg) * cfg.batch_size / 128

    optimizer = common.make_optimizer(optimizer_groups(net, cfg), peak_lr, (cfg.beta1, cfg.beta2), device)
    step, history = 0, []
    if ck is not None:
        optimizer.load_state_dict(ck['optimizer'])
        run.scaler.load_state_dict(ck['scaler'])
        if run.rank == 0:
            common.set_rng_state(ck['rng'])  # drop path continues its random stream exactly
        else:
            torch.manual_seed(data.seed_for(cfg.seed, 4, run.rank, ck['step']))
        step, history = ck['step'], list(ck.get('history', []))

    if cfg.bench_steps == 0:
        val_split = data.load_split(cfg.dataset, 'val', cfg.data_dir, download=cfg.download)

    net.eval()  # FLOPs of one forward (no dropout draws), x3 for forward + backward
    flops = (M.conv_flops(net, (1, 3, img_size, img_size)) * 3 if cfg.arch == 'squeezenet'
             else M.flops_per_image(net.cfg, mask_ratio=None))
    net.train()
    n_params = sum(p.numel() for p in net.parameters())
    run.banner(cfg, {'arch': cfg.arch if cfg.arch == 'squeezenet' else f"{cfg.model} {img_size}px",
                     'init': init, 'params': f"{n_params / 1e6:.2f}M", 'classes': num_classes,
                     'train images': len(train_split.labels),
                     'val images': len(val_split.labels) if cfg.bench_steps == 0 else 0,
                     'steps/epoch': steps_per_epoch, 'effective batch': cfg.batch_size,
                     'micro batch': cfg.batch_size // (run.world_size * cfg.accum_steps),
                     'base lr': f"{base_lr(cfg):.3g}" + (" (the recipe's for " + cfg.dataset + ")" if cfg.lr == 0 else ""),
                     'peak lr': f"{peak_lr:.3g}", 'layer decay': cfg.layer_decay, 'start step': step})

    step_model, cudagraphs = common.compile_and_wrap(net, cfg, run)  # `net` stays unwrapped for saving and eval
    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    mix_gen = torch.Generator(device=device)
    meter = common.Throughput(run, flops, total_steps, start_step=step)
    losses = common.LossMeter(run, cfg.out_dir)
    name = 'squeezenet' if cfg.arch == 'squeezenet' else cfg.model
    bench = common.Benchmark(run, cfg, flops, f"finetune {name} {img_size}px augment {cfg.augment} mixup {cfg.mixup} "
                             f"cutmix {cfg.cutmix}", arch=cfg.arch, model=cfg.model, img_size=img_size, augment=cfg.augment)
    stop = common.StopSignal()  # restored when the run closes (run.close)
    run.on_close(stop.restore)

    def criterion(logits, y, soft):
        logits = logits.float()
        if soft is not None:  # mixup / cutmix: soft targets (label smoothing is already in them)
            return torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)

    def save():
        common.save_atomic({'kind': 'finetune', 'model': net.state_dict(), 'model_config': model_config,
                            'optimizer': optimizer.state_dict(), 'scaler': run.scaler.state_dict(),
                            'step': step, 'epoch': step / steps_per_epoch, 'config': vars(cfg),
                            'rng': common.rng_state(), 'history': history, 'classes': list(train_split.classes)},
                           os.path.join(cfg.out_dir, 'ckpt.pt'))

    def run_eval():
        ev = evaluate(net, val_split, img_size, run)
        rec = dict(epoch=round(step / steps_per_epoch, 4), step=step, top1=ev['top1'], top5=ev['top5'], loss=ev['loss'])
        history.append(rec)
        run.log(dict(event='eval', **rec),
                f"epoch {rec['epoch']:g}: val top-1 {ev['top1']:.2f}% | top-5 {ev['top5']:.2f}% | loss {ev['loss']:.4f} "
                f"({ev['images']} images)")
        return rec

    net.train()
    t_start = time.time()
    while step < total_steps:
        epoch = step // steps_per_epoch
        for _, micro_batches in loader.epoch(epoch, start_step=step % steps_per_epoch):
            common.set_lr(optimizer, common.get_lr(step, total_steps, warmup_steps, peak_lr, cfg.min_lr))
            for micro, (x, y) in enumerate(micro_batches):
                soft = None
                if mixing:  # per micro-batch, drawn from (seed, step, rank, micro)
                    mix_gen.manual_seed(data.seed_for(cfg.seed, 3, step, run.rank, micro))
                    x, soft = data.mixup_cutmix(x, y, num_classes, cfg.mixup, cfg.cutmix, MIXUP_SWITCH_PROB,
                                                cfg.label_smoothing, mix_gen)
                with common.micro_batch(run, step_model, micro, cfg.accum_steps, cudagraphs):
                    with run.autocast:
                        loss = criterion(step_model(x), y, soft)
                    run.scaler.scale(loss / cfg.accum_steps).backward()
                losses.add(loss, x.shape[0])
            common.optimizer_step(run, optimizer, net.parameters(), cfg.grad_clip)
            step += 1

            if cfg.bench_steps:
                result = bench.after_step(step, losses)
                if result:
                    return result
                continue

            stopping = common.stop_requested(run, stop, step, cfg.log_every)
            end_of_epoch = step % steps_per_epoch == 0
            if step % max(1, cfg.log_every) == 0 or step == total_steps or stopping or end_of_epoch:
                lr_now = max(g['lr'] for g in optimizer.param_groups)  # the head's (layer decay scales the others down)
                common.log_train(run, losses, meter, step, steps_per_epoch, total_steps, lr_now)
            if stopping:
                return common.preempt(run, cfg.out_dir, step, save)
            if end_of_epoch:
                done = step // steps_per_epoch
                last = step == total_steps
                if done % cfg.eval_every == 0 or last:
                    run_eval()  # every rank: its share of the val set, summed
                if done % cfg.ckpt_every == 0 or last:
                    if run.master:
                        save()
                        run.log(dict(event='checkpoint', step=step, epoch=done), f"epoch {done}: saved {cfg.out_dir}/ckpt.pt")
                    run.barrier()

    final = history[-1] if history and history[-1]['step'] == step else run_eval()  # (a resumed finished run: evaluate)
    best = max(history, key=lambda r: r['top1'])
    if run.master:
        results = dict(top1=final['top1'], top5=final['top5'], loss=final['loss'], epoch=final['epoch'], step=step,
                       best_top1=best['top1'], best_epoch=best['epoch'], dataset=cfg.dataset, arch=cfg.arch,
                       model=cfg.model if cfg.arch == 'vit' else 'squeezenet1_1', ckpt=cfg.ckpt, init=init,
                       num_classes=num_classes, img_size=img_size, train_images=len(train_split.labels),
                       val_images=len(val_split.labels), peak_lr=peak_lr, wall_s=round(time.time() - t_start, 1),
                       history=history, config=vars(cfg))
        common.write_text_atomic(json.dumps(results, indent=1) + '\n', os.path.join(cfg.out_dir, 'results.json'))
    run.print(f"done: val top-1 {final['top1']:.2f}% top-5 {final['top5']:.2f}% (best top-1 {best['top1']:.2f}% at epoch {best['epoch']:g}); "
              f"{cfg.out_dir}/results.json, {cfg.out_dir}/ckpt.pt")
    return 0


if __name__ == '__main__':
    common.cli(main)
