"""
MAE / SMAE pre-training, in one process or under torchrun.

    python pretrain.py --dataset demo --epochs 4 --warmup_epochs 1     # a few minutes on a laptop CPU
    python pretrain.py                                                  # the paper's recipe on Tiny ImageNet
    torchrun --nproc_per_node=2 pretrain.py                             # the same run on two GPUs

Every constant below can be overridden as --name value or --name=value. Defaults are the paper's
pre-training recipe (PAPER.md section 3). The training step is the same whatever the number of processes or
accumulation steps: the global batch, its order and its masks depend only on (seed, step).
"""
import json
from dataclasses import asdict
import os
import time

import torch

import common
import data
import model as M

# -----------------------------------------------------------------------------
# config: the paper's pre-training recipe
# data
dataset = 'tin'             # tin | cub | demo (embedded, no download) | synthetic (random, for benchmarks)
data_dir = 'data'           # where tiny-imagenet-200/ and CUB_200_2011/ live (and their decoded caches)
download = False            # fetch the official archive into data_dir if it is missing
augment = False             # random resized crop + flip (official MAE); the paper used none
subset = 0                  # >0: train on a fixed random subset of this many images (quick experiments, tests)
# model
model = 'vit_lite'          # preset in model.PRESETS: vit_lite (paper), vit_tiny, vit_small, vit_base (second seed)
img_size = 0                # input resolution; 0 = the preset's (64; 224 for vit_base). Images are resized on the GPU
patch_size = 0              # patch side; 0 = the preset's (4 for vit_lite)
mask = 0.75                 # mask ratio: the fraction of patches hidden from the encoder
masking = 'random'          # random (official MAE) | block (BEiT-style blocks, the paper's ablation)
norm_pix_loss = False       # per-patch normalised pixel target (MAE paper); raw pixels were better here
# SMAE (PAPER.md section 4): L = (1 - alpha) * L_pixel + alpha * c * L_percep; alpha = 0 is plain MAE
alpha = 0.0                 # weight of the perceptual loss; the paper's SMAE uses 0.5
critic = ''                 # SqueezeNet critic checkpoint from finetune.py --arch squeezenet (or 'alexnet')
critic_sigmoid = True       # sigmoid on critic features before the MSE, as the paper's code did
calib_batches = 10          # batches whose mean loss ratio fixes c before training starts
weighting = 'fixed'         # fixed (paper) | uncertainty (learned log-variances, Kendall et al.)
# optimisation
epochs = 400                # pre-training epochs
warmup_epochs = 20          # linear warmup, then cosine decay to min_lr
batch_size = 128            # global batch per optimizer step (all GPUs, all accumulation steps)
accum_steps = 1             # gradient accumulation micro-steps per optimizer step
lr = 5e-4                   # learning rate at batch 128; scaled linearly: lr * batch_size / 128
min_lr = 0.0                # final learning rate of the cosine schedule
weight_decay = 0.15         # AdamW weight decay (not on biases and norms)
beta1 = 0.9                 # AdamW beta1
beta2 = 0.95                # AdamW beta2
grad_clip = 0.0             # clip the gradient norm at this value; 0 = off (as in the paper)
# system
device = 'auto'             # auto (cuda if available) | cuda | cpu
dtype = 'bfloat16'          # autocast on CUDA: bfloat16 | float16 (with GradScaler) | float32; CPU runs float32
compile = True              # torch.compile the model on CUDA (CPU runs eager)
compile_mode = 'reduce-overhead'  # torch.compile mode; reduce-overhead = CUDA graphs (under DDP: default)
seed = 0                    # seeds the initialisation, the data order and the masks
# output
out_dir = 'out/pretrain'    # ckpt.pt, log.jsonl, recon_*.png
resume = False              # continue the run in out_dir from its ckpt.pt
log_every = 50              # steps between log lines (each costs one host sync)
ckpt_every = 20             # epochs between checkpoints (and always at the end)
picture_every = 20          # epochs between reconstruction grids (and always at the end)
val_images = 1024           # val images for the masked-patch val loss at each checkpoint
bench_steps = 0             # >0: benchmark mode: time this many steps after warm-up, print, exit (no files)
bench_warmup = 30           # benchmark warm-up steps (compilation, CUDA graph capture)
# -----------------------------------------------------------------------------

ARCH_KEYS = ('model', 'img_size', 'patch_size', 'norm_pix_loss', 'alpha', 'critic')  # may not change on resume


def build(cfg, run):
    """Validate the config and build the model; every mistake becomes a one-line UserError."""
    if not 0.0 < cfg.mask < 1.0:
        raise common.UserError(f"--mask must be in (0, 1), got {cfg.mask}: it is the fraction of patches hidden")
    if cfg.masking not in ('random', 'block'):
        raise common.UserError(f"--masking must be random or block, got {cfg.masking!r}")
    if cfg.batch_size % (run.world_size * cfg.accum_steps):
        raise common.UserError(f"--batch_size {cfg.batch_size} is not divisible by world_size x accum_steps = "
                               f"{run.world_size} x {cfg.accum_steps}: choose a multiple")
    try:
        mcfg = M.make_config(cfg.model, img_size=cfg.img_size or None, patch_size=cfg.patch_size or None,
                             norm_pix_loss=cfg.norm_pix_loss, masking=cfg.masking, mask_ratio=cfg.mask,
                             loss_on_all=cfg.alpha > 0)
    except ValueError as e:
        raise common.UserError(str(e)) from None
    return mcfg


CRITIC_HOWTO = ("train one with: python finetune.py --arch squeezenet --dataset tin --out_dir out/critic "
                "--epochs 200 --warmup_epochs 10 --weight_decay 0.15, then pass --critic out/critic/ckpt.pt")


def make_objective(mae, cfg, run):
    """The loss module: plain MAE, or SMAE with a frozen critic. Every problem with the critic is found here,
    before any data is loaded or step taken."""
    if not 0.0 <= cfg.alpha <= 1.0:
        raise common.UserError(f"--alpha must be in [0, 1], got {cfg.alpha}: 0 is MAE, 0.5 the paper's SMAE, 1 perceptual only")
    if cfg.weighting not in ('fixed', 'uncertainty'):
        raise common.UserError(f"--weighting must be fixed or uncertainty, got {cfg.weighting!r}")
    critic = None
    if cfg.alpha > 0:
        if not cfg.critic:
            raise common.UserError(f"--alpha {cfg.alpha} needs a perceptual critic (--critic): {CRITIC_HOWTO}")
        if cfg.critic == 'alexnet':
            critic = alexnet_critic()
        else:
            ck = common.load_checkpoint(cfg.critic, kinds=('finetune',))
            arch = ck['config'].get('arch')
            if arch != 'squeezenet':
                raise common.UserError(f"--critic {cfg.critic} holds a {arch} classifier, not a SqueezeNet critic: {CRITIC_HOWTO}")
            net = M.build_squeezenet(ck['model_config']['num_classes'])
            try:
                M.load_weights(net, ck['model'], what=cfg.critic)
            except ValueError as e:
                raise common.UserError(f"{e}; {CRITIC_HOWTO}") from None
            critic = net.features[:5]  # up to and including the second Fire module: 128 x 15 x 15 at 64 px
    objective = M.MAEObjective(mae, critic, cfg.alpha, cfg.critic_sigmoid, cfg.weighting)
    return objective.to(run.device)


def alexnet_critic():
    """torchvision's ImageNet AlexNet up to conv2 + ReLU (an option beyond the paper); needs its weights."""
    import torchvision
    try:
        net = torchvision.models.alexnet(weights=torchvision.models.AlexNet_Weights.IMAGENET1K_V1)
    except Exception as e:
        raise common.UserError(f"the ImageNet AlexNet weights could not be fetched ({type(e).__name__}): connect to the "
                               f"network once, or put alexnet-owt-7be5be79.pth into {torch.hub.get_dir()}/checkpoints/, "
                               f"or use a SqueezeNet critic: {CRITIC_HOWTO}") from None
    return net.features[:5]


@torch.no_grad()
def calibrate(objective, loader, cfg, run):
    """c = mean over the first calib_batches batches of L_pixel / L_percep, measured before any update, so the two
    terms start equal. All ranks agree on it; it is stored in the checkpoint so a resumed run keeps it."""
    gen = torch.Generator(device=run.device).manual_seed(data.seed_for(cfg.seed, 2))
    ratios = []
    for step, micro_batches in loader.epoch(0):
        if step >= cfg.calib_batches:
            break
        x = micro_batches[0][0]
        noise = objective.mae.masking_noise(x.shape[0], cfg.mask, cfg.masking, generator=gen, device=run.device)
        with run.autocast:
            pixel, percep, _, _ = objective.loss_terms(x, cfg.mask, noise)
        ratios.append(pixel.float() / percep.float())
    c = run.mean(torch.stack(ratios).mean().item())
    objective.c.fill_(c)
    run.log(dict(event='calibration', c=c, batches=len(ratios)),
            f"SMAE calibration: c = {c:.4g} (pixel / perceptual loss over {len(ratios)} batches)")


def main(argv=None):
    cfg, given = common.parse_config(common.script_defaults(globals()), argv)
    run = common.Run(cfg, 'pretrain', lock=cfg.bench_steps == 0)
    try:
        return train(cfg, given, run)
    finally:
        run.close()


def train(cfg, given, run):
    ck = None
    if cfg.bench_steps == 0:
        ck, cfg = common.check_out_dir(run, cfg, given, 'pretrain', ARCH_KEYS)
    mcfg = build(cfg, run)
    device = run.device
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    mae = M.build_mae(mcfg).to(device)
    objective = make_objective(mae, cfg, run)  # MAE loss, or SMAE with its critic (checked before any data loads)

    # data: the whole split as uint8 on the device; batches are gathered, resized and normalised there
    train_split = common.take_subset(data.load_split(cfg.dataset, 'train', cfg.data_dir, download=cfg.download),
                                     cfg.subset, cfg.seed)
    loader = data.DeviceLoader(train_split, batch_size=cfg.batch_size, device=device, seed=cfg.seed,
                               rank=run.rank, world_size=run.world_size, accum_steps=cfg.accum_steps,
                               img_size=mcfg.img_size, augment=data.pretrain_augment if cfg.augment else None)
    steps_per_epoch = loader.steps_per_epoch
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    if cfg.bench_steps:
        total_steps = cfg.bench_warmup + cfg.bench_steps
    peak_lr = cfg.lr * cfg.batch_size / 128

    optimizer = common.make_optimizer(common.param_groups(objective, cfg.weight_decay), peak_lr,
                                      (cfg.beta1, cfg.beta2), device)
    step = 0
    if ck is not None:
        M.load_weights(mae, ck['model'], what=os.path.join(cfg.out_dir, 'ckpt.pt'))
        objective.load_extra_state(ck.get('objective', {}))
        optimizer.load_state_dict(ck['optimizer'])
        run.scaler.load_state_dict(ck['scaler'])
        common.set_rng_state(ck['rng'])
        step = ck['step']
    elif cfg.alpha > 0:
        calibrate(objective, loader, cfg, run)  # fixes c before optimisation (stored in the checkpoint)

    # fixed val images and masks for pictures and the val loss
    if cfg.bench_steps == 0:
        val_split = data.load_split(cfg.dataset, 'val', cfg.data_dir, download=cfg.download)
        pick = torch.linspace(0, len(val_split.labels) - 1, min(cfg.val_images, len(val_split.labels))).long()
        val_x, _ = next(data.iterate_batches(val_split.images[pick], val_split.labels[pick], len(pick), device,
                                             img_size=mcfg.img_size))  # spread over the split (all classes)

    n_params = sum(p.numel() for p in mae.parameters())
    n_enc = sum(p.numel() for n, p in mae.named_parameters() if not (n.startswith('decoder') or n == 'mask_token'))
    run.banner(cfg, {'params': f"{n_params / 1e6:.2f}M ({n_enc / 1e6:.2f}M encoder)",
                     'train images': len(train_split.labels), 'steps/epoch': steps_per_epoch,
                     'effective batch': cfg.batch_size, 'micro batch': cfg.batch_size // (run.world_size * cfg.accum_steps),
                     'peak lr': f"{peak_lr:.3g}", 'start step': step})

    # compile the objective (model + loss, + critic for SMAE); keep `mae` raw for saving and pictures
    step_model, cudagraphs = common.compile_and_wrap(objective, cfg, run)
    flops = M.flops_per_image(mcfg, cfg.mask) + objective.extra_flops_per_image()
    meter = common.Throughput(run, flops, total_steps, start_step=step)
    losses = common.LossMeter(run, cfg.out_dir)
    bench = common.Benchmark(run, cfg, flops, f"pretrain {cfg.model} mask {cfg.mask} {cfg.masking} alpha {cfg.alpha}",
                             model=cfg.model, mask=cfg.mask, masking=cfg.masking, alpha=cfg.alpha)
    stop = common.StopSignal()  # restored when the run closes (run.close)
    run.on_close(stop.restore)
    mask_gen = torch.Generator(device=device)

    def save(val_loss=None):
        common.save_atomic({'kind': 'pretrain', 'model': mae.state_dict(), 'model_config': asdict(mcfg),
                            'optimizer': optimizer.state_dict(), 'scaler': run.scaler.state_dict(),
                            'objective': objective.extra_state(), 'step': step, 'epoch': step / steps_per_epoch,
                            'config': vars(cfg), 'rng': common.rng_state(), 'val_loss': val_loss},
                           os.path.join(cfg.out_dir, 'ckpt.pt'))

    @torch.no_grad()
    def val_loss():
        mae.eval()
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        total, n = 0.0, 0
        for i in range(0, val_x.shape[0], 256):
            x = val_x[i:i + 256]
            noise = mae.masking_noise(x.shape[0], cfg.mask, cfg.masking, generator=g, device=device)
            with run.autocast:
                _, pred, m = mae(x, cfg.mask, noise=noise)
            per_patch = ((pred.float() - mae.pixel_target(x).float()) ** 2).mean(-1)
            total += ((per_patch * m).sum() / m.sum()).item() * x.shape[0]  # masked-patch MSE, whatever the loss mode
            n += x.shape[0]
        mae.train()
        return total / max(n, 1)

    mae.train()
    t_start, loss_now, vl = time.time(), float('nan'), None
    while step < total_steps:
        epoch = step // steps_per_epoch
        for _, micro_batches in loader.epoch(epoch, start_step=step % steps_per_epoch):
            common.set_lr(optimizer, common.get_lr(step, total_steps, warmup_steps, peak_lr, cfg.min_lr))
            # the masks of the whole global batch are a function of (seed, step): each rank takes its rows
            mask_gen.manual_seed(data.seed_for(cfg.seed, 1, step))
            noise = mae.masking_noise(cfg.batch_size, cfg.mask, cfg.masking, generator=mask_gen, device=device)
            for micro, (x, _) in enumerate(micro_batches):
                with common.micro_batch(run, step_model, micro, cfg.accum_steps, cudagraphs):
                    with run.autocast:
                        loss = step_model(x, cfg.mask, noise[loader.rows(micro)])
                    run.scaler.scale(loss / cfg.accum_steps).backward()
                losses.add(loss, x.shape[0])
            common.optimizer_step(run, optimizer, objective.parameters(), cfg.grad_clip)
            step += 1

            if cfg.bench_steps:
                result = bench.after_step(step, losses)
                if result:
                    return result
                continue

            stopping = common.stop_requested(run, stop, step, cfg.log_every)
            end_of_epoch = step % steps_per_epoch == 0
            if step % max(1, cfg.log_every) == 0 or step == total_steps or stopping or end_of_epoch:
                loss_now = common.log_train(run, losses, meter, step, steps_per_epoch, total_steps,
                                            optimizer.param_groups[0]['lr'])
            if stopping:
                return common.preempt(run, cfg.out_dir, step, save)
            if end_of_epoch:
                done = step // steps_per_epoch
                last = step == total_steps
                if run.master and (done % cfg.picture_every == 0 or last):
                    common.reconstruction_grid(mae, val_x[::max(1, len(val_x) // 8)][:8], cfg.mask, cfg.masking, cfg.seed,
                                               os.path.join(cfg.out_dir, f"recon_ep{done:04d}.png"))
                if done % cfg.ckpt_every == 0 or last:
                    vl = val_loss() if run.master else None
                    if run.master:
                        save(vl)
                        run.log(dict(event='checkpoint', step=step, epoch=done, val_loss=vl),
                                f"epoch {done}: val masked-patch loss {vl:.4f}; saved {cfg.out_dir}/ckpt.pt")
                    run.barrier()
    if run.master:  # the run's summary; its presence also marks the run as finished (reproduce.sh skips it)
        summary = dict(script='pretrain', model=cfg.model, dataset=cfg.dataset, mask=cfg.mask, masking=cfg.masking,
                       alpha=cfg.alpha, epochs=cfg.epochs, steps=step, final_loss=loss_now,
                       val_loss=vl, wall_s=round(time.time() - t_start, 1), config=vars(cfg))
        common.write_text_atomic(json.dumps(summary, indent=1), os.path.join(cfg.out_dir, 'results.json'))
    run.print(f"done: {cfg.out_dir}/ckpt.pt")
    return 0


if __name__ == '__main__':
    common.cli(main)
