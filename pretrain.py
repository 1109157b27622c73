"""
MAE / SMAE pre-training, in one process or under torchrun.

    python pretrain.py --dataset demo --img_size 32 --batch_size 64 --lr 1.5e-3 --epochs 30 --warmup_epochs 2
                                                                        # the first run: about 4 minutes on 2 CPU cores
    python pretrain.py                                                  # the study's recipe on Tiny ImageNet
    torchrun --nproc_per_node=2 pretrain.py                             # the same run on two GPUs

Every constant below can be overridden as --name value or --name=value (--help lists them). The defaults are the
study's pre-training recipe (its Table 6, listed in the README's recipe table). The training step is the same
whatever the number of processes or accumulation steps: the global batch, its order and its masks depend only on
(seed, step).
"""
import json
import math
import os
import time
from dataclasses import asdict

import torch

import common
import data
import evaluate
import model as M

# -----------------------------------------------------------------------------
# config: the study's pre-training recipe
# data
dataset = 'tin'             # tin | cub | demo (embedded, no download) | synthetic (random, for benchmarks)
data_dir = 'data'           # where tiny-imagenet-200/ and CUB_200_2011/ live (and their decoded caches)
download = False            # fetch the official archive into data_dir if it is missing
augment = False             # random resized crop + flip (official MAE); the study used none
subset = 0                  # >0: train on a fixed random subset of this many images (quick experiments, tests)
# model
model = 'vit_lite'          # preset in model.PRESETS: vit_lite (the study's), vit_tiny, vit_small, vit_base (second seed)
img_size = 0                # input resolution; 0 = the preset's (64; 224 for vit_base). Images are resized on the device
patch_size = 0              # patch side; 0 = the preset's (4 for vit_lite)
mask = 0.75                 # mask ratio: the fraction of patches hidden from the encoder
masking = 'random'          # random (official MAE) | block (BEiT-style blocks, the study's ablation)
norm_pix_loss = False       # per-patch normalised pixel target (MAE paper); raw pixels were better here
# SMAE: L = (1 - alpha) * L_pixel + alpha * c * L_percep; alpha = 0 is plain MAE
alpha = 0.0                 # weight of the perceptual loss; the study's SMAE uses 0.5
critic = ''                 # SqueezeNet critic checkpoint from finetune.py --arch squeezenet (or 'alexnet')
critic_sigmoid = True       # sigmoid on critic features before the MSE, as the study's code did
calib_batches = 10          # batches whose mean loss ratio fixes c before training starts
weighting = 'fixed'         # fixed (the study's) | uncertainty (learned log-variances, Kendall et al.)
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
grad_clip = 0.0             # clip the gradient norm at this value; 0 = off (as in the study)
# system
device = 'auto'             # auto (cuda if available) | cuda | cuda:N | cpu
dtype = 'bfloat16'          # autocast on CUDA: bfloat16 | float16 (with GradScaler) | float32; the CPU runs float32
compile = True              # torch.compile the training step on CUDA (the CPU runs eager)
compile_mode = 'reduce-overhead'  # reduce-overhead = CUDA graphs (kept under torchrun and with accum_steps > 1)
seed = 0                    # seeds the initialisation, the data order and the masks
# output
out_dir = 'out/pretrain'    # ckpt.pt, log.jsonl, results.json, recon_*.png
resume = False              # continue the run in out_dir from its ckpt.pt
tensorboard = False         # also write TensorBoard event files into out_dir (train/ and val/ scalars, as official MAE)
log_every = 50              # steps between log lines (each a host sync); also steps 1, 2, 4, 8... and every 10 s
ckpt_every = 20             # epochs between checkpoints, val loss and kNN (and always at the end)
picture_every = 20          # epochs between reconstruction grids (and always at the end)
val_images = 1024           # val images for the val loss, the kNN queries and the pictures
knn_bank = 10000            # train images (a fixed subset) in the kNN bank logged at each checkpoint; 0 = no kNN
bench_steps = 0             # >0: benchmark mode: time this many steps after warm-up, print, exit (no files)
bench_warmup = 30           # benchmark warm-up steps (compilation, CUDA graph capture)
# -----------------------------------------------------------------------------
CHECKS = [  # rules between values (each value's own rule is in common.RULES)
    (lambda c: c.alpha == 0 or c.critic, "--alpha {alpha} needs a perceptual critic (--critic): train one with: python "
     "finetune.py --arch squeezenet --dataset tin --out_dir out/critic --epochs 200 --warmup_epochs 10 "
     "--weight_decay 0.15, then pass --critic out/critic/ckpt.pt"),
    (lambda c: c.weighting == 'fixed' or c.alpha > 0, "--weighting {weighting} mixes the pixel and the perceptual "
     "loss, but --alpha 0 has no perceptual loss: set --alpha > 0 and --critic, or drop --weighting"),
    (lambda c: c.alpha > 0 or not c.critic, "--critic {critic} is unused with --alpha 0 (plain MAE has no perceptual "
     "loss): set --alpha > 0 for SMAE (the study's is 0.5), or drop --critic"),
    (lambda c: c.min_lr <= c.lr * c.batch_size / 128, "--min_lr {min_lr} is above the peak lr (--lr {lr} x "
     "--batch_size {batch_size} / 128): the cosine 'decay' would rise; choose --min_lr at most the peak lr (the "
     "recipe's is 0)"),
]
FIXED_ON_RESUME = ('model', 'img_size', 'patch_size', 'norm_pix_loss', 'alpha', 'critic', 'dataset', 'subset',
                   'batch_size')  # the weights and the step count depend on these
CRITIC_HOWTO = CHECKS[0][1].split(': ', 1)[1]
CRITIC_MIN_SIZE = 5         # the critic (SqueezeNet up to its second Fire module) needs images of at least 5 pixels


def load_critic(cfg):
    """SMAE's frozen critic (None for plain MAE). Every problem with it is found here, before anything is written."""
    critic = None
    if cfg.alpha > 0 and cfg.critic == 'alexnet':  # torchvision's ImageNet AlexNet up to conv2 + ReLU (beyond the study)
        import torchvision  # here, not at the top: only this critic needs it, and it adds 1.5 s to every start
        try:
            critic = torchvision.models.alexnet(weights=torchvision.models.AlexNet_Weights.IMAGENET1K_V1).features[:5]
        except Exception as e:
            raise common.UserError(f"the ImageNet AlexNet weights could not be fetched ({type(e).__name__}): connect "
                                   f"to the network once, or put alexnet-owt-7be5be79.pth into {torch.hub.get_dir()}"
                                   f"/checkpoints/, or use a SqueezeNet critic: {CRITIC_HOWTO}") from None
    elif cfg.alpha > 0:
        try:
            ck = common.load_checkpoint(cfg.critic, kinds=('finetune',))
        except common.UserError as e:  # the line is about the file; say it is the critic, and where one comes from
            raise common.UserError(f"--critic: {str(e).split(': check the path')[0]}; {CRITIC_HOWTO}") from None
        if ck['config'].get('arch') != 'squeezenet':
            raise common.UserError(f"--critic {cfg.critic} holds a {ck['config'].get('arch')} classifier, not a SqueezeNet critic: {CRITIC_HOWTO}")
        net = M.build_squeezenet(ck['model_config']['num_classes'])
        try:
            M.load_weights(net, ck['model'], what=cfg.critic)
        except ValueError as e:
            raise common.UserError(f"{e}; {CRITIC_HOWTO}") from None
        critic = net.features[:5]  # up to and including the second Fire module: 128 x 15 x 15 at 64 px
    return critic


@torch.no_grad()
def calibrate(objective, loader, cfg, run):
    """c = mean over the first calib_batches batches of L_pixel / L_percep, measured before any update, so the two
    terms start equal. Each batch's masks are drawn for the whole global batch from (seed, step) and its two losses
    are averaged over all its micro-batches and ranks before the ratio: the same c whatever the number of ranks and
    accumulation steps. It is stored in the checkpoint so a resumed run keeps it."""
    gen, ratios = torch.Generator(device=run.device), []
    for step, micro_batches in loader.epoch(0):
        if step >= cfg.calib_batches:
            break
        gen.manual_seed(data.seed_for(cfg.seed, 2, step))
        noise = objective.mae.masking_noise(cfg.batch_size, cfg.mask, cfg.masking, generator=gen, device=run.device)
        terms = torch.zeros(2, device=run.device)  # (pixel, perceptual) summed over the micro-batches
        for micro, (x, _) in enumerate(micro_batches):
            with run.autocast:
                pixel, percep, _, _ = objective.loss_terms(x, cfg.mask, noise[loader.rows(micro)])
            terms += torch.stack([pixel.float(), percep.float()])
        ratios.append(run.mean(terms[0].item()) / run.mean(terms[1].item()))  # a ratio of global-batch means
    c = sum(ratios) / len(ratios)
    objective.c.fill_(c)
    run.log(dict(event='calibration', c=c, batches=len(ratios)),
            f"SMAE calibration: c = {c:.4g} (pixel / perceptual loss over {len(ratios)} batches)")


def main(argv=None):
    cfg, given = common.configure(globals(), argv, CHECKS)
    # the out_dir is locked before it is looked at, so no other run can change it between the checks and the writes
    with common.out_dir_locked(cfg.out_dir, 'pretrain', take=cfg.bench_steps == 0):
        # resume or start fresh, and every check (model, critic) before anything is written
        ck, cfg = ((None, cfg) if cfg.bench_steps else
                   common.check_out_dir(cfg, given, 'pretrain', FIXED_ON_RESUME, CHECKS))
        mcfg = common.preset_config(cfg, norm_pix_loss=cfg.norm_pix_loss, masking=cfg.masking, mask_ratio=cfg.mask,
                                    loss_on_all=cfg.alpha > 0)
        if cfg.alpha > 0 and mcfg.img_size < CRITIC_MIN_SIZE:
            raise common.UserError(f"img_size {mcfg.img_size} is too small for the SMAE critic (SqueezeNet's first "
                                   f"layers need {CRITIC_MIN_SIZE} pixels): choose --img_size {CRITIC_MIN_SIZE} or "
                                   f"more")
        critic = load_critic(cfg)
        with common.Run(cfg, 'pretrain', lock=cfg.bench_steps == 0) as run:
            return train(cfg, given, ck, mcfg, critic, run)


def train(cfg, given, ck, mcfg, critic, run):
    device = run.device
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    mae = M.build_mae(mcfg).to(device)
    # the loss as one module (model, losses, critic), so that one torch.compile covers it: MAE, or SMAE with its critic
    objective = M.MAEObjective(mae, critic, cfg.alpha, cfg.critic_sigmoid, cfg.weighting).to(device)

    # data: the whole split as uint8 on the device; batches are gathered, resized and normalised there
    train_split = data.subset(data.load_split(cfg.dataset, 'train', cfg.data_dir, download=cfg.download), cfg.subset, cfg.seed)
    loader = data.DeviceLoader(train_split, batch_size=cfg.batch_size, device=device, seed=cfg.seed,
                               rank=run.rank, world_size=run.world_size, accum_steps=cfg.accum_steps,
                               img_size=mcfg.img_size, augment=data.pretrain_augment if cfg.augment else None)
    steps_per_epoch = loader.steps_per_epoch
    total_steps = cfg.bench_warmup + cfg.bench_steps if cfg.bench_steps else cfg.epochs * steps_per_epoch
    warmup_steps = common.warmup_steps(cfg, given, steps_per_epoch, run)
    peak_lr = cfg.lr * cfg.batch_size / 128

    # optimizer: AdamW, no weight decay on biases and norms, fused into one kernel on CUDA
    optimizer = torch.optim.AdamW(common.param_groups(objective, cfg.weight_decay), lr=peak_lr,
                                  betas=(cfg.beta1, cfg.beta2), **(dict(fused=True) if run.cuda else {}))
    step = 0
    if ck is not None:  # resume: weights, optimizer, scaler, RNG, SMAE's c and the step (what does not fit: one line)
        path = os.path.join(cfg.out_dir, 'ckpt.pt')
        common.check_resume_step(ck, steps_per_epoch, len(train_split.labels), path)
        with common.restoring(path):
            M.load_weights(mae, ck['model'], what=path)
            objective.load_extra_state(ck.get('objective', {}))
            common.load_optimizer(optimizer, ck['optimizer'])
            if ck.get('scaler') and run.scaler.is_enabled():  # an fp16 run resumed from bf16/fp32/CPU starts a fresh scale
                run.scaler.load_state_dict(ck['scaler'])
            common.set_rng_state(ck['rng'])
        step = ck['step']
    elif cfg.alpha > 0:
        calibrate(objective, loader, cfg, run)  # fixes c before optimisation (stored in the checkpoint)

    # fixed val images (spread over the split, all classes) for pictures, the val loss and the kNN queries
    if not cfg.bench_steps:
        val_split = data.spread(data.load_split(cfg.dataset, 'val', cfg.data_dir, download=cfg.download), cfg.val_images)
        val_x = next(data.iterate_batches(val_split.images, None, len(val_split.labels), device, img_size=mcfg.img_size))[0]
        knn_split = data.subset(train_split, cfg.knn_bank, cfg.seed)

    n_params = sum(p.numel() for p in mae.parameters())
    n_enc = sum(p.numel() for p in M.encoder_state_dict(dict(mae.named_parameters())).values())
    run.taken("the preset's", img_size=mcfg.img_size, patch_size=mcfg.patch_size)
    run.banner({'params': f"{n_params / 1e6:.2f}M ({n_enc / 1e6:.2f}M encoder)", 'train images': len(train_split.labels),
                'steps/epoch': steps_per_epoch, 'effective batch': cfg.batch_size,
                'micro batch': loader.micro_batch, 'peak lr': f"{peak_lr:.3g}", 'start step': step})

    # compile the objective (model + loss, + critic for SMAE); `mae` stays raw for saving. No DDP wrapper: every
    # gradient is a view of one buffer that one all-reduce averages over the ranks after backward, outside the
    # compiled step, so CUDA graphs stay on under torchrun as in one process (see common.FlatGrads)
    mode = common.compile_mode(cfg, run)
    step_model = torch.compile(objective, mode=mode) if mode else objective
    grads = common.FlatGrads(objective, run)  # under torchrun, first rank 0's weights to every rank
    cudagraphs = mode in ('reduce-overhead', 'max-autotune')
    flops = M.flops_per_image(mcfg, cfg.mask) + objective.extra_flops_per_image()
    peak = common.peak_flops(run)
    mask_gen = torch.Generator(device=device)

    def save(val_loss=None):
        common.save_checkpoint({'kind': 'pretrain', 'model': mae.state_dict(), 'model_config': asdict(mcfg),
                            'optimizer': optimizer.state_dict(), 'scaler': run.scaler.state_dict(),
                            'objective': objective.extra_state(), 'step': step, 'epoch': step / steps_per_epoch,
                            'config': vars(cfg), 'rng': common.rng_state(), 'val_loss': val_loss, 'loss': loss_now}, cfg.out_dir)

    @torch.no_grad()
    def val_loss():
        """The masked-patch MSE on the fixed val images with fixed masks (the training loss for MAE)."""
        mae.eval()
        g, total = torch.Generator(device=device).manual_seed(cfg.seed), 0.0
        for i in range(0, val_x.shape[0], 256):
            x = val_x[i:i + 256]
            noise = mae.masking_noise(x.shape[0], cfg.mask, cfg.masking, generator=g, device=device)
            with run.autocast:
                _, pred, m = mae(x, cfg.mask, noise=noise)
            total += mae.forward_loss(x, pred, m, on_all=False).item() * x.shape[0]
        mae.train()
        return total / val_x.shape[0]

    def knn(what):
        if not cfg.knn_bank or not run.master:
            return None
        t0 = time.time()
        result = evaluate.knn_top1(mae, knn_split, val_split, run)
        mae.train()
        run.log(dict(event='knn', step=step, what=what, **result),
                f"kNN top-1 on {len(val_split.labels)} val images ({what}): {result['top1']:.2f}% "
                f"({len(knn_split.labels)} bank, {time.time() - t0:.1f}s)")
        return result['top1']

    def evaluate_and_save(done):
        """At the end of epoch `done` (rank 0): the val loss and kNN, then ckpt.pt. -> the val loss."""
        vl, top1 = val_loss(), knn(f"epoch {done}")
        save(vl)
        run.log(dict(event='checkpoint', step=step, epoch=done, val_loss=vl, knn_top1=top1),
                f"epoch {done}: val masked-patch loss {vl:.4f}; saved {cfg.out_dir}/ckpt.pt")
        evaluate.write_learning_curves(cfg.out_dir, run)  # curves.png: losses, lr, kNN beside its floor
        return vl

    def picture(done, vl):
        evaluate.reconstruction_grid(mae, val_x[::max(1, len(val_x) // 8)][:8], cfg.mask, cfg.masking, cfg.seed,
                                     os.path.join(cfg.out_dir, f"recon_ep{done:04d}.png"),
                                     f"{cfg.out_dir}, epoch {done}" + (f", val loss {vl:.4f}" if vl else ""))

    if not cfg.bench_steps and step == 0:
        knn('floor: the initial weights')  # what an untrained encoder of this architecture already gets

    # progress: the step, a smoothed rate and the ETA, which the run's progress thread prints whenever 10 s pass
    # without a line (also inside a step: the first one compiles on CUDA), a benchmark too
    meter = common.Progress('step', total_steps, run, done=step, per=cfg.batch_size,
                            phase='the first step' + (' (torch.compile)' if mode else '')).start()

    # the loop
    mae.train()
    t_start = t_log = time.time()
    loss_sum, n_losses, step_logged, vl = torch.zeros((), device=device), 0, step, None
    loss_now = ck.get('loss', float('nan')) if ck is not None else float('nan')  # the last logged loss
    run.in_loop = True  # from here on, SIGTERM or Ctrl-C saves a checkpoint after the current step
    while step < total_steps:
        epoch = step // steps_per_epoch
        for _, micro_batches in loader.epoch(epoch, start_step=step % steps_per_epoch):
            if cfg.bench_steps and step == cfg.bench_warmup:  # benchmark: the timed steps start here
                t_bench = common.bench_start(run, t_start, cudagraphs)
            lr_now = common.get_lr(step, total_steps, warmup_steps, peak_lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group['lr'] = lr_now * group['lr_scale']
            # the masks of the whole global batch are a function of (seed, step): each rank takes its rows
            mask_gen.manual_seed(data.seed_for(cfg.seed, 1, step))
            noise = mae.masking_noise(cfg.batch_size, cfg.mask, cfg.masking, generator=mask_gen, device=device)
            for micro, (x, _) in enumerate(micro_batches):
                if cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()  # a new replay: the last step's outputs are consumed
                with run.autocast:
                    loss = step_model(x, cfg.mask, noise[loader.rows(micro)])
                run.scaler.scale(loss / cfg.accum_steps).backward()  # adds into the gradient buffer
                loss_sum += loss.detach()  # summed on the device: no host sync per step
                n_losses += 1
            grads.all_reduce()  # under torchrun: the gradients' mean over the ranks, once per optimizer step
            if cfg.grad_clip > 0:
                run.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.grad_clip)
            run.scaler.step(optimizer)  # a plain optimizer.step() unless fp16
            run.scaler.update()
            grads.zero()  # not zero_grad(set_to_none=True): the gradients stay views of the buffer
            step += 1

            meter.update(step)  # host-side counts for the smoothed rate and the progress thread's line
            if cfg.bench_steps:
                if step == total_steps:
                    return common.bench_result(run, t_bench, cfg, flops, peak, loss_sum / n_losses,
                                               f"pretrain {cfg.model} mask {cfg.mask} {cfg.masking} alpha {cfg.alpha}")
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
                dt, t_log = time.time() - t_log, time.time()
                ips = (step - step_logged) * cfg.batch_size / dt  # this interval's; the line shows the smoothed rate
                ips_smooth, eta = meter.rate(), meter.eta()
                mfu = ips_smooth * flops / (peak * run.world_size) if peak else None
                run.log(dict(event='train', step=step, epoch=round(step / steps_per_epoch, 4), loss=loss_now, lr=lr_now,
                             images_per_s=round(ips_smooth, 1), interval_images_per_s=round(ips, 1), mfu=mfu,
                             eta_s=round(eta)),
                        f"epoch {step / steps_per_epoch:7.2f} | step {step}/{total_steps} | loss {loss_now:.4f} | "
                        f"lr {lr_now:.2e} | {common.fmt_rate(ips_smooth)} img/s"
                        + (f" | mfu {100 * mfu:.1f}%" if mfu else "")
                        + f" | eta {common.fmt_eta(eta)}")
                loss_sum.zero_()
                n_losses, step_logged = 0, step
            if stopping:  # SIGTERM (pre-emption) or Ctrl-C: save where we are and say how to continue
                if run.master:
                    save()
                run.print(f"stopped by signal at step {step}; checkpoint saved to {cfg.out_dir}/ckpt.pt; continue "
                          f"with: {common.resume_command('pretrain', cfg.out_dir)}")
                return 128 + run.stop_signal
            if end_of_epoch and step < total_steps:  # (the last epoch's checkpoint and picture: at the end, below)
                done = step // steps_per_epoch
                checkpoint = done % cfg.ckpt_every == 0
                if run.master and checkpoint:
                    vl = evaluate_and_save(done)
                if run.master and done % cfg.picture_every == 0:
                    picture(done, vl)
                if run.ddp and checkpoint:
                    torch.distributed.barrier()
                meter.skip()  # the rate is the training's: the evaluation and checkpoint are left out
                t_log = time.time()

    # the end of the run, where a run stopped at its last step resumes: the final checkpoint, picture and summary
    if run.master:
        vl = evaluate_and_save(step // steps_per_epoch)
        picture(step // steps_per_epoch, vl)
    if run.ddp:
        torch.distributed.barrier()
    if run.master:  # the run's summary; its presence also marks the run as finished (reproduce.sh skips it)
        summary = dict(script='pretrain', model=cfg.model, dataset=cfg.dataset, mask=cfg.mask, masking=cfg.masking,
                       alpha=cfg.alpha, epochs=cfg.epochs, steps=step, final_loss=loss_now, val_loss=vl,
                       wall_s=round(time.time() - t_start, 1), config=vars(cfg))
        common.save_atomic(json.dumps(summary, indent=1), os.path.join(cfg.out_dir, 'results.json'))
    run.print(f"done in {time.time() - t_start:.0f}s: {cfg.out_dir}/ckpt.pt")
    return 0


if __name__ == '__main__':
    common.cli(main)
