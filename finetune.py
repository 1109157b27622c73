"""
Fine-tuning: a classifier on tin, cub or demo, from a pre-trained MAE encoder, from scratch, or a SqueezeNet.

    python finetune.py --ckpt out/pretrain/ckpt.pt                      # the study's fine-tuning recipe on Tiny ImageNet
    python finetune.py --ckpt out/pretrain/ckpt.pt --dataset cub        # transfer to CUB (lr 5e-4, the recipe's for CUB)
    python finetune.py --out_dir out/supervised                         # ViT-Lite from scratch (the supervised baseline)
    python finetune.py --arch squeezenet --dataset tin --out_dir out/critic --epochs 200 --warmup_epochs 10 --weight_decay 0.15
    torchrun --nproc_per_node=2 finetune.py --ckpt out/pretrain/ckpt.pt # the same run on two GPUs

Every constant below can be overridden as --name value or --name=value (--help lists them). The defaults are the
study's fine-tuning recipe (its Table 6, listed in the README's recipe table). Writes <out_dir>/ckpt.pt (kind
'finetune'), log.jsonl and results.json (top-1 and top-5 on the official val split: TIN val, CUB test). The data
order depends only on (seed, epoch); the augmentation and mixup draws on (seed, epoch, step, rank, micro-step).
A pretrain.py or dino.py checkpoint (--ckpt) gives the encoder.
"""
import json
import math
import os
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F

import common
import data
import evaluate
import model as M

# -----------------------------------------------------------------------------
# config: the study's fine-tuning recipe
# data
dataset = 'tin'             # tin | cub (val: its test split) | demo | synthetic; with --ckpt: the checkpoint's
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
compile_mode = 'reduce-overhead'  # reduce-overhead = CUDA graphs (kept under torchrun and with accum_steps > 1)
seed = 0                    # seeds the head / model initialisation, the data order, the augmentation and drop path
# output
out_dir = 'out/finetune'    # ckpt.pt, log.jsonl, results.json
resume = False              # continue the run in out_dir from its ckpt.pt
tensorboard = False         # also write TensorBoard event files into out_dir (train/ and val/ scalars, as official MAE)
log_every = 50              # steps between log lines (each a host sync); also steps 1, 2, 4, 8... and every 10 s
ckpt_every = 10             # epochs between checkpoints (and always at the end)
eval_every = 1              # epochs between top-1/top-5 evaluations on the val split (and always at the end)
bench_steps = 0             # >0: benchmark mode: time this many steps after warm-up, print, exit (no files)
bench_warmup = 30           # benchmark warm-up steps (compilation, CUDA graph capture)
# -----------------------------------------------------------------------------

SQUEEZENET_MIN_SIZE = 17    # the smallest image SqueezeNet 1.1 takes (a stride-2 conv, then three 3x3 stride-2 pools)
CHECKS = [  # rules between values (each value's own rule is in common.RULES)
    (lambda c: c.arch == 'vit' or not c.ckpt, "--arch squeezenet trains from scratch (SqueezeNet has no MAE "
     "pre-training), but --ckpt {ckpt} was given: drop --ckpt, or use --arch vit to fine-tune that checkpoint"),
    (lambda c: c.arch == 'vit' or (c.layer_decay, c.drop_path, c.global_pool) == (1.0, 0.0, 'cls'),
     "--layer_decay, --drop_path and --global_pool apply to ViTs only: drop them with --arch squeezenet"),
    (lambda c: c.arch == 'vit' or not c.img_size or c.img_size >= SQUEEZENET_MIN_SIZE, "--img_size {img_size} is too "
     f"small for SqueezeNet 1.1 (its stride-2 convolution and three stride-2 max-pools leave nothing below "
     f"{SQUEEZENET_MIN_SIZE} pixels): choose --img_size {SQUEEZENET_MIN_SIZE} or more (the recipe's is 64)"),
    (lambda c: c.min_lr <= base_lr(c) * c.batch_size / 128, "--min_lr {min_lr} is above the peak lr (the base lr x "
     "--batch_size {batch_size} / 128, the base lr being --lr or, at 0, the recipe's): the cosine 'decay' would rise; "
     "choose --min_lr at most the peak lr (the recipe's is 0)"),
]
FIXED_ON_RESUME = ('arch', 'model', 'img_size', 'patch_size', 'global_pool', 'ckpt', 'dataset', 'subset', 'batch_size')
RECIPE_LR = {'cub': 5e-4}   # base lr at batch 128 when --lr is 0; 1e-3 for every other dataset
EVAL_BATCH = 512            # images per forward pass in evaluation
MIXUP_SWITCH_PROB = 0.5     # with both mixup and cutmix on: probability of cutmix for a batch (timm's default)


def base_lr(cfg):
    """The learning rate at batch 128: --lr, or the recipe's (1e-3; 5e-4 on CUB) when --lr is 0."""
    return cfg.lr if cfg.lr > 0 else RECIPE_LR.get(cfg.dataset, 1e-3)


def build(cfg, given, num_classes, ck, pre=None):
    """The classifier and its description for the checkpoint. From the fine-tuning checkpoint `ck` when resuming,
    else from the pre-training checkpoint (--ckpt), a preset (random init) or torchvision's SqueezeNet 1.1.
    `pre` is the already-loaded pre-training checkpoint (--ckpt). Returns (net, model_config dict, init description)."""
    if cfg.arch == 'squeezenet':
        net = M.build_squeezenet(num_classes)
        mconf = {'num_classes': num_classes, 'img_size': cfg.img_size or 64}
        if ck is not None:
            with common.restoring(os.path.join(cfg.out_dir, 'ckpt.pt')):
                M.load_weights(net, ck['model'], what=os.path.join(cfg.out_dir, 'ckpt.pt'))
        return net, mconf, 'squeezenet1_1 from scratch'
    if ck is not None:  # resume: the architecture and weights of this run's own checkpoint
        mcfg = common.model_config(ck, os.path.join(cfg.out_dir, 'ckpt.pt'), drop_path=cfg.drop_path)
        net = M.VisionTransformer(mcfg)
        with common.restoring(os.path.join(cfg.out_dir, 'ckpt.pt')):
            M.load_weights(net, ck['model'], what=os.path.join(cfg.out_dir, 'ckpt.pt'))
        return net, asdict(mcfg), f"resumed from {cfg.out_dir}/ckpt.pt"
    if cfg.ckpt:
        net, pre = common.load_encoder(cfg.ckpt, num_classes, expect_model=cfg.model if 'model' in given else None,
                                       loaded=pre, img_size=cfg.img_size or None, patch_size=cfg.patch_size or None,
                                       drop_path=cfg.drop_path, global_pool=cfg.global_pool)
        cfg.model = pre['config'].get('model', cfg.model)  # record the architecture actually used
        return net, asdict(net.cfg), f"encoder of {cfg.ckpt} (pre-trained {pre.get('epoch', 0):.0f} epochs)"
    net = M.build_classifier(common.preset_config(cfg, drop_path=cfg.drop_path, global_pool=cfg.global_pool),
                             num_classes)
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
    parameter's layer-wise lr scale layer_decay^(depth + 1 - layer_id); the loop multiplies the lr by it."""
    if cfg.arch != 'vit' or cfg.layer_decay == 1.0:
        return common.param_groups(net, cfg.weight_decay, no_decay=('cls_token',))
    depth = net.cfg.depth
    return common.param_groups(net, cfg.weight_decay, no_decay=('cls_token',),
                               lr_scale_of=lambda n: cfg.layer_decay ** (depth + 1 - layer_id(n, depth)))


@torch.no_grad()
def val_metrics(net, split, img_size, run):
    """top-1 / top-5 (%) and mean cross-entropy over the whole val split, in eval() mode. Under DDP each rank takes
    every world_size-th image and the counts are summed over ranks, so every rank gets the same numbers."""
    was_training = net.training
    net.eval()
    idx = torch.arange(run.rank, len(split.labels), run.world_size)
    stats = torch.zeros(4, dtype=torch.float64, device=run.device)  # correct@1, correct@5, loss sum, images
    with common.Progress('image', len(idx), run, 'val evaluation') as meter:
        batches = data.iterate_batches(split.images[idx], split.labels[idx], EVAL_BATCH, run.device, img_size=img_size)
        for i, (x, y) in enumerate(batches):
            with run.autocast:
                logits = net(x)
            logits = logits.float()
            c1, c5 = common.topk_correct(logits, y)
            stats += torch.stack([c1.double(), c5.double(), F.cross_entropy(logits, y, reduction='sum').double(),
                                  torch.tensor(float(len(y)), dtype=torch.float64, device=run.device)])
            meter.update(min((i + 1) * EVAL_BATCH, len(idx)))  # host-side count (no sync)
    net.train(was_training)
    c1, c5, loss_sum, n = (run.mean(v) * run.world_size for v in stats.tolist())
    return dict(top1=100 * c1 / max(n, 1), top5=100 * c5 / max(n, 1), loss=loss_sum / max(n, 1), images=int(n))


def main(argv=None):
    cfg, given = common.configure(globals(), argv, CHECKS)
    # the out_dir is locked before it is looked at, so no other run can change it between the checks and the writes
    # (a refused run leaves no folder behind: the lock removes the folders it created)
    with common.out_dir_locked(cfg.out_dir, 'finetune', take=cfg.bench_steps == 0):
        # resume or start fresh, and every check (model, --ckpt) before anything is written
        ck, cfg = ((None, cfg) if cfg.bench_steps else
                   common.check_out_dir(cfg, given, 'finetune', FIXED_ON_RESUME, CHECKS))
        if cfg.arch == 'vit' and not cfg.ckpt:
            common.preset_config(cfg, drop_path=cfg.drop_path, global_pool=cfg.global_pool)
        # the pre-training checkpoint (--ckpt), read once here and reused by build(); its dataset and image size are
        # the defaults (transfer is --dataset cub), and the sizes given with it must fit its model
        pre = common.load_checkpoint(cfg.ckpt, kinds=('pretrain', 'dino')) if cfg.ckpt and ck is None else None
        if pre is not None:
            common.follow_checkpoint(cfg, given, pre, cfg.ckpt)
            common.model_config(pre, cfg.ckpt, img_size=cfg.img_size or None, patch_size=cfg.patch_size or None,
                                drop_path=cfg.drop_path, global_pool=cfg.global_pool)
        if not cfg.bench_steps:  # the data is found before anything is written (train() loads the splits it uses)
            data.load_split(cfg.dataset, 'val', cfg.data_dir, download=cfg.download)
        with common.Run(cfg, 'finetune', lock=cfg.bench_steps == 0) as run:
            return train(cfg, given, ck, pre, run)


def train(cfg, given, ck, pre, run):
    device = run.device

    # data: the whole split as uint8 on the device; batches are gathered, resized, augmented and normalised there
    train_split = data.subset(data.load_split(cfg.dataset, 'train', cfg.data_dir, download=cfg.download), cfg.subset, cfg.seed)
    num_classes = train_split.num_classes
    if ck is not None and ck['model_config'].get('num_classes') != num_classes:
        raise common.UserError(f"{cfg.out_dir}/ckpt.pt has a {ck['model_config'].get('num_classes')}-way head but {cfg.dataset} "
                               f"has {num_classes} classes: choose another --out_dir")
    torch.manual_seed(cfg.seed)  # the same initial weights (the fresh head) on every rank
    net, model_config, init = build(cfg, given, num_classes, ck, pre)
    net = net.to(device)
    img_size = (cfg.img_size or 64) if cfg.arch == 'squeezenet' else net.cfg.img_size
    torch.manual_seed(data.seed_for(cfg.seed, 4, run.rank))  # drop path: its own stream on each rank
    loader = data.DeviceLoader(train_split, batch_size=cfg.batch_size, device=device, seed=cfg.seed,
                               rank=run.rank, world_size=run.world_size, accum_steps=cfg.accum_steps,
                               img_size=img_size, augment=data.finetune_augment if cfg.augment else None)
    steps_per_epoch = loader.steps_per_epoch
    total_steps = cfg.bench_warmup + cfg.bench_steps if cfg.bench_steps else cfg.epochs * steps_per_epoch
    warmup_steps = common.warmup_steps(cfg, given, steps_per_epoch, run)
    peak_lr = base_lr(cfg) * cfg.batch_size / 128

    # optimizer: AdamW with the recipe's groups (and layer-wise decay when asked), fused into one kernel on CUDA
    optimizer = torch.optim.AdamW(optimizer_groups(net, cfg), lr=peak_lr, betas=(cfg.beta1, cfg.beta2),
                                  **(dict(fused=True) if run.cuda else {}))
    step, history = 0, []
    if ck is not None:  # resume: weights (in build), optimizer, scaler, RNG (drop path), the step and the history
        path = os.path.join(cfg.out_dir, 'ckpt.pt')
        common.check_resume_step(ck, steps_per_epoch, len(train_split.labels), path)
        with common.restoring(path):  # what does not fit this run: one line
            common.load_optimizer(optimizer, ck['optimizer'])
            if ck.get('scaler') and run.scaler.is_enabled():  # an fp16 run resumed from bf16/fp32/CPU: a fresh scale
                run.scaler.load_state_dict(ck['scaler'])
            if run.rank == 0:
                common.set_rng_state(ck['rng'])  # drop path continues its random stream exactly
            else:
                torch.manual_seed(data.seed_for(cfg.seed, 4, run.rank, ck['step']))
        step, history = ck['step'], list(ck.get('history', []))
    val_split = None if cfg.bench_steps else data.load_split(cfg.dataset, 'val', cfg.data_dir, download=cfg.download)

    net.eval()  # FLOPs of one forward (no dropout draws), x3 for forward + backward
    flops = (M.forward_flops(net, torch.zeros(1, 3, img_size, img_size, device=device)) * 3 if cfg.arch == 'squeezenet'
             else M.flops_per_image(net.cfg, mask_ratio=None))
    net.train()
    run.taken(f"the recipe's for {cfg.dataset}", lr=base_lr(cfg))
    if cfg.arch == 'vit':
        run.taken("the checkpoint's" if cfg.ckpt or ck is not None else "the preset's", img_size=net.cfg.img_size,
                  patch_size=net.cfg.patch_size)
    else:
        run.taken("SqueezeNet's", img_size=img_size)
    run.banner({'arch': cfg.arch if cfg.arch == 'squeezenet' else f"{cfg.model} {img_size}px", 'init': init,
                'params': f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M", 'classes': num_classes,
                'train images': len(train_split.labels), 'val images': len(val_split.labels) if val_split else 0,
                'steps/epoch': steps_per_epoch, 'effective batch': cfg.batch_size, 'micro batch': loader.micro_batch,
                'base lr': f"{base_lr(cfg):.3g}" + (" (the recipe's for " + cfg.dataset + ")" if cfg.lr == 0 else ""),
                'peak lr': f"{peak_lr:.3g}", 'layer decay': cfg.layer_decay, 'start step': step})

    # compile the classifier; `net` stays raw for saving and evaluation. No DDP wrapper: the gradients are views of
    # one buffer, averaged over the ranks by one all-reduce after backward, outside the graph (see common.FlatGrads)
    mode = common.compile_mode(cfg, run)
    step_model = torch.compile(net, mode=mode) if mode else net
    grads = common.FlatGrads(net, run)  # under torchrun, first rank 0's weights to every rank
    cudagraphs = mode in ('reduce-overhead', 'max-autotune')
    peak = common.peak_flops(run)
    mixing = cfg.mixup > 0 or cfg.cutmix > 0

    def criterion(logits, y, soft):
        logits = logits.float()
        if soft is not None:  # mixup / cutmix: soft targets (label smoothing is already in them)
            return torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)

    def save():
        common.save_checkpoint({'kind': 'finetune', 'model': net.state_dict(), 'model_config': model_config,
                            'optimizer': optimizer.state_dict(), 'scaler': run.scaler.state_dict(),
                            'step': step, 'epoch': step / steps_per_epoch, 'config': vars(cfg),
                            'rng': common.rng_state(), 'history': history, 'classes': list(train_split.classes)}, cfg.out_dir)

    def run_eval():
        ev = val_metrics(net, val_split, img_size, run)
        rec = dict(epoch=round(step / steps_per_epoch, 4), step=step, top1=ev['top1'], top5=ev['top5'], loss=ev['loss'])
        history.append(rec)
        run.log(dict(event='eval', **rec), f"epoch {rec['epoch']:g}: val top-1 {ev['top1']:.2f}% | top-5 "
                f"{ev['top5']:.2f}% | loss {ev['loss']:.4f} ({ev['images']} images)")
        return rec

    # progress: the step, a smoothed rate and the ETA, which the run's progress thread prints whenever 10 s pass
    # without a line (also inside a step: the first one compiles on CUDA), a benchmark too
    meter = common.Progress('step', total_steps, run, done=step, per=cfg.batch_size,
                            phase='the first step' + (' (torch.compile)' if mode else '')).start()

    # the loop
    net.train()
    t_start = t_log = time.time()
    loss_sum, n_losses, step_logged = torch.zeros((), device=device), 0, step
    run.in_loop = True  # from here on, SIGTERM or Ctrl-C saves a checkpoint after the current step
    while step < total_steps:
        epoch = step // steps_per_epoch
        for _, micro_batches in loader.epoch(epoch, start_step=step % steps_per_epoch):
            if cfg.bench_steps and step == cfg.bench_warmup:  # benchmark: the timed steps start here
                t_bench = common.bench_start(run, t_start, cudagraphs)
            lr_now = common.get_lr(step, total_steps, warmup_steps, peak_lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group['lr'] = lr_now * group['lr_scale']
            for micro, (x, y) in enumerate(micro_batches):
                soft = None
                if mixing:  # per micro-batch, drawn from (seed, step, rank, micro)
                    x, soft = data.mixup_cutmix(x, y, num_classes, cfg.mixup, cfg.cutmix, MIXUP_SWITCH_PROB,
                                                cfg.label_smoothing, seed=data.seed_for(cfg.seed, 3, step, run.rank, micro))
                if cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()  # a new replay: the last step's outputs are consumed
                with run.autocast:
                    loss = criterion(step_model(x), y, soft)
                run.scaler.scale(loss / cfg.accum_steps).backward()  # adds into the gradient buffer
                loss_sum += loss.detach()  # summed on the device: no host sync per step
                n_losses += 1
            grads.all_reduce()  # under torchrun: the gradients' mean over the ranks, once per optimizer step
            if cfg.grad_clip > 0:
                run.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            run.scaler.step(optimizer)  # a plain optimizer.step() unless fp16
            run.scaler.update()
            grads.zero()  # not zero_grad(set_to_none=True): the gradients stay views of the buffer
            step += 1

            meter.update(step)  # host-side counts for the smoothed rate and the progress thread's line
            if cfg.bench_steps:
                if step == total_steps:
                    return common.bench_result(run, t_bench, cfg, flops, peak, loss_sum / n_losses,
                                               f"finetune {cfg.arch if cfg.arch == 'squeezenet' else cfg.model} {img_size}px "
                                               f"augment {cfg.augment} mixup {cfg.mixup} cutmix {cfg.cutmix}")
                if run.stop_signal:  # a benchmark has nothing to save
                    return 128 + run.stop_signal
                continue

            # log: every log_every steps, at steps 1, 2, 4, 8, ... (early feedback), at epoch ends and when stopping
            end_of_epoch = step % steps_per_epoch == 0
            log_now = (step % cfg.log_every == 0 or step & (step - 1) == 0 or end_of_epoch or step == total_steps
                       or (not run.ddp and time.time() - t_log > common.LOG_EVERY_S))  # one process: every 8 s
            # a stop signal: one process stops now; under DDP the ranks agree at log points (one all-reduce)
            stopping = run.mean(run.stop_signal) > 0 if run.ddp and log_now else not run.ddp and run.stop_signal > 0
            if log_now or stopping:
                loss_now = run.mean(loss_sum.item() / n_losses)
                if not math.isfinite(loss_now):
                    raise common.NonFiniteLoss.at(loss_now, step, cfg.out_dir)
                lr_head = max(g['lr'] for g in optimizer.param_groups)  # the head's (layer decay scales the others down)
                dt, t_log = time.time() - t_log, time.time()
                ips = (step - step_logged) * cfg.batch_size / dt  # this interval's; the line shows the smoothed rate
                ips_smooth, eta = meter.rate(), meter.eta()
                mfu = ips_smooth * flops / (peak * run.world_size) if peak else None
                run.log(dict(event='train', step=step, epoch=round(step / steps_per_epoch, 4), loss=loss_now, lr=lr_head,
                             images_per_s=round(ips_smooth, 1), interval_images_per_s=round(ips, 1), mfu=mfu,
                             eta_s=round(eta)),
                        f"epoch {step / steps_per_epoch:7.2f} | step {step}/{total_steps} | loss {loss_now:.4f} | "
                        f"lr {lr_head:.2e} | {common.fmt_rate(ips_smooth)} img/s"
                        + (f" | mfu {100 * mfu:.1f}%" if mfu else "")
                        + f" | eta {common.fmt_eta(eta)}")
                loss_sum.zero_()
                n_losses, step_logged = 0, step
            if stopping:  # SIGTERM (pre-emption) or Ctrl-C: save where we are and say how to continue
                if run.master:
                    save()
                run.print(f"stopped by signal at step {step}; checkpoint saved to {cfg.out_dir}/ckpt.pt; continue "
                          f"with: {common.resume_command('finetune', cfg.out_dir)}")
                return 128 + run.stop_signal
            if end_of_epoch and step < total_steps:  # (the last epoch's evaluation and checkpoint: at the end, below)
                done = step // steps_per_epoch
                if done % cfg.eval_every == 0:
                    run_eval()  # every rank: its share of the val set, summed
                if done % cfg.ckpt_every == 0:
                    if run.master:
                        save()
                        run.log(dict(event='checkpoint', step=step, epoch=done), f"epoch {done}: saved {cfg.out_dir}/ckpt.pt")
                        evaluate.write_learning_curves(cfg.out_dir, run)  # curves.png: losses, lr, top-1/top-5
                    if run.ddp:
                        torch.distributed.barrier()
                meter.skip()  # the rate is the training's: the evaluation and checkpoint are left out
                t_log = time.time()

    # the end of the run, where a run stopped at its last step resumes: the final evaluation, checkpoint and results
    if not history or history[-1]['step'] != step:
        run_eval()  # every rank: its share of the val set, summed
    if run.master:
        save()
        run.log(dict(event='checkpoint', step=step, epoch=step // steps_per_epoch),
                f"epoch {step // steps_per_epoch}: saved {cfg.out_dir}/ckpt.pt")
        evaluate.write_learning_curves(cfg.out_dir, run)
    if run.ddp:
        torch.distributed.barrier()
    final, best = history[-1], max(history, key=lambda r: r['top1'])
    if run.master:
        results = dict(top1=final['top1'], top5=final['top5'], loss=final['loss'], epoch=final['epoch'], step=step,
                       best_top1=best['top1'], best_epoch=best['epoch'], dataset=cfg.dataset, arch=cfg.arch,
                       model=cfg.model if cfg.arch == 'vit' else 'squeezenet1_1', ckpt=cfg.ckpt, init=init,
                       num_classes=num_classes, img_size=img_size, train_images=len(train_split.labels),
                       val_images=len(val_split.labels), peak_lr=peak_lr, wall_s=round(time.time() - t_start, 1),
                       history=history, config=vars(cfg))
        common.save_atomic(json.dumps(results, indent=1) + '\n', os.path.join(cfg.out_dir, 'results.json'))
    run.print(f"done in {time.time() - t_start:.0f}s: val top-1 {final['top1']:.2f}% top-5 {final['top5']:.2f}% (best "
              f"top-1 {best['top1']:.2f}% at epoch {best['epoch']:g}); {cfg.out_dir}/results.json, {cfg.out_dir}/ckpt.pt")
    return 0


if __name__ == '__main__':
    common.cli(main)
