"""
DINO pre-training (Caron et al. 2021) of the same ViT encoder, in one process or under torchrun: the baseline of
the study's Table 1 (DINO pre-train + fine-tune: 41.72% top-1 on TIN, 24.09% on CUB).

    python dino.py --dataset demo --epochs 4 --warmup_epochs 1 --warmup_teacher_temp_epochs 1
                                          # the demo: 48 steps, 25 minutes on a quiet 2-core CPU (measured: 1501 s
                                          # wall, 3.9-4.9 images/s): each step runs student and teacher on two
                                          # whole 64 px views of 128 images
    python dino.py                                                      # the study's DINO on Tiny ImageNet
    torchrun --nproc_per_node=2 dino.py                                 # the same run on two GPUs
    python finetune.py --ckpt out/dino/ckpt.pt                          # then fine-tune its teacher encoder

A student (encoder + DINO head) learns to match an EMA teacher of the same architecture: the teacher sees the two
global views, the student every view, and the loss is the cross-entropy from each teacher view (centred, sharpened)
to every other student view. The defaults are the study's DINO settings (its Table 3). DINO's official ViT recipe
(main_dino.py) is one override away:

    --local_crops_number 8 --out_dim 65536 --head_hidden 2048 --head_bottleneck 256 --warmup_teacher_temp 0.04
    --teacher_temp 0.04 --momentum_teacher 0.996 --global_crops_min 0.4 --local_crops_min 0.05 --drop_path 0.1
    (local crops are then 96/224 of the image side, as 96 px is of 224 px; the official batch is 64 per GPU)

The views are made on the device, per sample, from uniforms drawn for the whole global batch from (seed, step):
the same step gives the same views whatever the number of processes or accumulation steps, and after a resume.
Colour jitter follows torchvision's ColorJitter (a random order of the four ops per sample), except hue, which is
a rotation of the chroma plane in YIQ space rather than a shift in HSV (see colour_jitter). Gradient clipping is
DINO's: each parameter's gradient norm is clipped on its own. The checkpoint's `model` is the teacher's encoder
(what DINO evaluates), so finetune.py, probe.py and evaluate.py read it as they read a pretrain.py checkpoint.
"""
import json
import math
import os
import time
from dataclasses import asdict, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
import evaluate
import model as M

# -----------------------------------------------------------------------------
# config: the study's DINO recipe (its Table 3)
# data
dataset = 'tin'             # tin | cub | demo (embedded, no download) | synthetic (random, for benchmarks)
data_dir = 'data'           # where tiny-imagenet-200/ and CUB_200_2011/ live (and their decoded caches)
download = False            # fetch the official archive into data_dir if it is missing
subset = 0                  # >0: train on a fixed random subset of this many images (quick experiments, tests)
# model
model = 'vit_lite'          # encoder preset in model.PRESETS (the decoder fields are unused)
img_size = 0                # global view resolution; 0 = the preset's (64 for vit_lite)
patch_size = 0              # patch side; 0 = the preset's (4 for vit_lite)
drop_path = 0.0             # stochastic depth of the student (DINO's ViT default: 0.1); the teacher has none
out_dim = 1024              # K, the head's output dimension (DINO's default: 65536)
head_hidden = 512           # hidden width of the head's 3-layer MLP (DINO's: 2048)
head_bottleneck = 128       # bottleneck before the weight-normalised last layer (DINO's: 256)
# DINO
momentum_teacher = 0.9995   # teacher EMA momentum, raised to 1 on a cosine over the run (DINO's default: 0.996)
teacher_temp = 0.04         # teacher temperature after the warm-up
warmup_teacher_temp = 0.02  # teacher temperature at epoch 0, raised linearly to teacher_temp (DINO's default: 0.04)
warmup_teacher_temp_epochs = 30  # epochs of the teacher-temperature warm-up
student_temp = 0.1          # student temperature
center_momentum = 0.9       # EMA momentum of the centre subtracted from the teacher's outputs
freeze_last_layer = 1       # epochs during which the head's last layer is not updated (its gradient is dropped)
# multi-crop views
global_crops_min = 0.6      # the two global crops cover [this, 1] of the image area (DINO's default: 0.4)
local_crops_number = 0      # local crops per image (DINO's default: 8)
local_crops_min = 0.2       # local crops cover [this, global_crops_min] of the area (DINO's default: 0.05)
local_crops_size = 0        # local crop side in pixels; 0 = 96/224 of img_size (as DINO's 96 of 224), whole patches
# optimisation
epochs = 100                # pre-training epochs
warmup_epochs = 10          # linear lr warm-up, then cosine decay to min_lr
batch_size = 128            # global batch of images per optimizer step (all GPUs, all accumulation steps)
accum_steps = 1             # gradient accumulation micro-steps per optimizer step
lr = 5e-4                   # learning rate at batch 256, scaled linearly: lr * batch_size / 256 (DINO's rule)
min_lr = 1e-6               # final learning rate of the cosine schedule
weight_decay = 0.04         # AdamW weight decay at the start (not on biases and norms), cosine to weight_decay_end
weight_decay_end = 0.4      # AdamW weight decay at the end of the run
beta1 = 0.9                 # AdamW beta1
beta2 = 0.999               # AdamW beta2
grad_clip = 3.0             # clip each parameter's gradient norm at this value (DINO's per-tensor rule); 0 = off
# system
device = 'auto'             # auto (cuda if available) | cuda | cuda:N | cpu
dtype = 'bfloat16'          # autocast on CUDA: bfloat16 | float16 (with GradScaler) | float32; the CPU runs float32
compile = True              # torch.compile the training step on CUDA (the CPU runs eager)
compile_mode = 'reduce-overhead'  # reduce-overhead = CUDA graphs (kept under torchrun and with accum_steps > 1)
seed = 0                    # seeds the initialisation, the data order and the views
# output
out_dir = 'out/dino'        # ckpt.pt, log.jsonl, results.json
resume = False              # continue the run in out_dir from its ckpt.pt
tensorboard = False         # also write TensorBoard event files into out_dir (train/ and val/ scalars, as official MAE)
log_every = 50              # steps between log lines (each a host sync); also steps 1, 2, 4, 8... and every 10 s
ckpt_every = 10             # epochs between checkpoints and kNN (and always at the end)
val_images = 1024           # fixed val images: the kNN queries
knn_bank = 10000            # train images (a fixed subset) in the kNN bank logged at each checkpoint; 0 = no kNN
bench_steps = 0             # >0: benchmark mode: time this many steps after warm-up, print, exit (no files)
bench_warmup = 30           # benchmark warm-up steps (compilation, CUDA graph capture)
# -----------------------------------------------------------------------------


CHECKS = [  # rules between values (each value's own rule is in common.RULES)
    (lambda c: 0 < c.local_crops_min < c.global_crops_min or c.local_crops_number == 0, "--local_crops_min "
     "{local_crops_min} must be in (0, --global_crops_min {global_crops_min}): local crops cover [local_crops_min, "
     "global_crops_min] of the image area"),
    (lambda c: c.min_lr <= c.lr * c.batch_size / 256, "--min_lr {min_lr} is above the peak lr (--lr {lr} x "
     "--batch_size {batch_size} / 256): the cosine 'decay' would rise; choose --min_lr at most the peak lr (the "
     "recipe's is 1e-6)"),
]
FIXED_ON_RESUME = ('model', 'img_size', 'patch_size', 'out_dim', 'head_hidden', 'head_bottleneck', 'dataset', 'subset',
                   'batch_size')  # the weights and the step count depend on these

# -----------------------------------------------------------------------------
# the views: DINO's multi-crop augmentation, on the device, each sample with its own draws

VIEW_STREAM = 7                 # seed_for(seed, VIEW_STREAM, step) seeds the views (others: 1 masks, 2 calibration, 4 drop path)
JITTER = (0.4, 0.4, 0.2, 0.1)   # ColorJitter strengths: brightness, contrast, saturation, hue
JITTER_P, GRAY_P = 0.8, 0.2     # probabilities of the colour jitter and of grayscale
BLUR_P = (1.0, 0.1, 0.5)        # Gaussian blur probability: first global view, second global view, local views
SOLARIZE_P = (0.0, 0.2, 0.0)    # solarisation probability: the same three
BLUR_SIGMA = (0.1, 2.0)         # blur sigma range in pixels of the view (PIL's radius in DINO's GaussianBlur)
BLUR_RADIUS = 6                 # blur kernel half-width: 3 sigma at the largest sigma
YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))  # RGB -> YIQ (NTSC)
U_SIZES = (2 * data.RRC_TRIES + 3, 9, 1, 2, 1)  # uniforms per view: crop, colour jitter, grayscale, blur, solarisation


def colour_jitter(x, u, gray, yiq, yiq_inv):
    """torchvision's RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8) from uniforms u (N, 9): apply, four factors,
    four keys whose argsort is the sample's order of the ops. Each op is an affine map of the colours (a 3x3 matrix
    per sample, plus an offset for contrast), so a round is one batched matmul whatever op each sample does, clamped
    after it as torchvision does. Brightness, contrast and saturation are torchvision's formulas; hue rotates the
    (I, Q) chroma plane of YIQ by 2 pi h, in the direction of torchvision's HSV hue shift (red turns to yellow for
    h > 0) but keeping the luma where torchvision keeps HSV value and saturation: the hues turn alike, the pixels
    differ (an HSV shift is not affine). A sample that does not jitter gets identity matrices: unchanged to the bit."""
    N, apply = len(x), u[:, 0] < JITTER_P
    b, c, s = (torch.where(apply, 1 + k * (2 * u[:, i] - 1), 1.0) for i, k in zip((1, 2, 3), JITTER))  # each (N,)
    angle = torch.where(apply, -2 * math.pi * JITTER[3] * (2 * u[:, 4] - 1), 0.0)  # minus: red turns to yellow
    eye = torch.eye(3, device=x.device)
    rot = torch.zeros(N, 3, 3, device=x.device)  # rotation minus identity in YIQ: exactly 0 at angle 0
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = angle.cos() - 1, -angle.sin(), angle.sin(), angle.cos() - 1
    mats = torch.stack([b.view(N, 1, 1) * eye,                                    # brightness: b x
                        c.view(N, 1, 1) * eye,                                    # contrast: c x + (1 - c) mean gray
                        s.view(N, 1, 1) * eye + (1 - s).view(N, 1, 1) * gray.expand(3, 3),  # saturation: s x + (1 - s) gray
                        eye + yiq_inv @ rot @ yiq], 1)              # hue; (N, 4, 3, 3)
    offset = torch.stack([torch.zeros_like(c), 1 - c, torch.zeros_like(c), torch.zeros_like(c)], 1)  # (N, 4)
    order, rows = u[:, 5:9].argsort(1), torch.arange(N, device=x.device)  # (N, 4): a random permutation per sample
    for op in order.T:  # (N,): each sample's op of this round
        mean_gray = x.mean((2, 3)) @ gray  # (N,): the image's mean gray level before this op
        x = torch.einsum('nij,njhw->nihw', mats[rows, op], x) + (offset[rows, op] * mean_gray).view(N, 1, 1, 1)
        x = x.clamp(0, 1)
    return x


def gaussian_blur(x, u, on):
    """DINO's GaussianBlur (PIL's, radius = sigma ~ U[0.1, 2] from u[:, 1]) where `on` (N,) bool: a separable Gaussian
    of half-width BLUR_RADIUS, edge pixels repeated. Samples that do not blur get a unit impulse, so the batch is
    always the same two grouped convolutions."""
    N, C, H, W = x.shape
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, 1]
    t = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-t ** 2 / (2 * sigma[:, None] ** 2))  # (N, 2R+1)
    k = torch.where(on[:, None], k / k.sum(1, keepdim=True), (t == 0).to(x.dtype))
    k = k.repeat_interleave(C, 0)  # (N*C, 2R+1): one kernel per channel of each sample
    y = F.pad(x.reshape(1, N * C, H, W), (BLUR_RADIUS,) * 4, mode='replicate')  # (1, N*C, H+2R, W+2R)
    y = F.conv2d(y, k.view(N * C, 1, 1, -1), groups=N * C)  # along x
    y = F.conv2d(y, k.view(N * C, 1, -1, 1), groups=N * C)  # along y
    return y.view(N, C, H, W)


class Views:
    """DINO's multi-crop: two global and local_crops_number smaller local views of each image (see BLUR_P, SOLARIZE_P).
    draw(step) gives the uniforms of the whole global batch; a rank makes the views of its own rows from theirs."""

    def __init__(self, cfg, img_size, local_size, device):
        self.cfg, self.img_size, self.local_size, self.device = cfg, img_size, local_size, device
        self.gen = torch.Generator(device=device)
        self.gray, self.yiq = torch.tensor(data.LUMA, device=device), torch.tensor(YIQ, device=device)
        self.yiq_inv = torch.linalg.inv(self.yiq)
        self.p = torch.tensor(list(zip(BLUR_P, SOLARIZE_P)), device=device)  # (3, 2), made once: no host copy per step

    def draw(self, step):
        """Uniforms (2 + L, batch_size, sum(U_SIZES)) of the global batch of `step`: a function of (seed, step) only."""
        self.gen.manual_seed(data.seed_for(self.cfg.seed, VIEW_STREAM, step))
        return torch.rand(2 + self.cfg.local_crops_number, self.cfg.batch_size, sum(U_SIZES), generator=self.gen,
                          device=self.device)

    def __call__(self, x, u):
        """x (n, 3, H, W) in [0, 1] and u (2 + L, n, U) its draws -> normalised (global views (2n, 3, S, S), local
        views (L n, 3, s, s) or None), view-major: all the samples' first view, then their second, ..."""
        n, L, c = len(x), self.cfg.local_crops_number, self.cfg
        glob = self.augment(x.repeat(2, 1, 1, 1), u[:2].flatten(0, 1), self.img_size, (c.global_crops_min, 1.0),
                            self.p[:2].repeat_interleave(n, 0))
        if L == 0:
            return glob, None
        return glob, self.augment(x.repeat(L, 1, 1, 1), u[2:].flatten(0, 1), self.local_size,
                                  (c.local_crops_min, c.global_crops_min), self.p[2:].expand(L * n, 2))

    def augment(self, x, u, size, scale, p):
        """x (N, 3, H, W) in [0, 1], u (N, U) uniforms, p (N, 2) blur and solarisation probabilities -> (N, 3, size, size)."""
        crop_u, jitter_u, gray_u, blur_u, solarize_u = u.split(U_SIZES, 1)
        # torchvision's RandomResizedCrop(size, scale, bicubic) + RandomHorizontalFlip, from this view's draws
        x = data.random_resized_crop(x, scale, hflip=0.5, u=crop_u, size=size, mode='bicubic').clamp(0, 1)
        x = colour_jitter(x, jitter_u, self.gray, self.yiq, self.yiq_inv)
        luma = torch.einsum('c,nchw->nhw', self.gray, x).unsqueeze(1).expand_as(x)
        x = torch.where((gray_u < GRAY_P).view(-1, 1, 1, 1), luma, x)  # RandomGrayscale: the luma in all three channels
        x = gaussian_blur(x, blur_u, blur_u[:, 0] < p[:, 0])
        # PIL's ImageOps.solarize (threshold 128): levels >= 128 inverted
        x = torch.where((solarize_u < p[:, 1:]).view(-1, 1, 1, 1) & (x >= 128 / 255), 1 - x, x)
        return data.normalize(x)

# -----------------------------------------------------------------------------
# the networks and the loss


class DINOHead(nn.Module):
    """DINO's projection head: a 3-layer MLP with GELU (hidden -> bottleneck), L2 normalisation, then a
    weight-normalised Linear without bias whose norm is fixed at 1 (norm_last_layer=True): each output row of the
    last layer's weight is divided by its norm at every forward."""

    def __init__(self, in_dim, out_dim, hidden, bottleneck):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for m in self.mlp[::2]:  # the Linears: DINO's init; the last layer keeps Linear's default, as in DINO
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        self.last_layer = nn.Linear(bottleneck, out_dim, bias=False)

    def forward(self, x):
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.last_layer.weight, dim=1))


class MultiCropWrapper(nn.Module):
    """Encoder + head on the cls feature of every view (DINO's MultiCropWrapper): the global views in one pass, the
    local views (another resolution) in a second; the head runs once on all of them."""

    def __init__(self, encoder, head, local_grid=0):
        super().__init__()
        self.encoder, self.head = encoder, head
        # local views: the fixed patch positions (1, 1+G*G, D) interpolated bicubically to their g x g grid, as DINO's
        # interpolate_pos_encoding does (a local crop spans the same range of positions as a global one)
        if local_grid:
            G, D, g = math.isqrt(encoder.pos_embed.shape[1] - 1), encoder.pos_embed.shape[2], local_grid
            p = encoder.pos_embed[0, 1:].reshape(G, G, D).permute(2, 0, 1)[None]  # (1, D, G, G)
            p = F.interpolate(p, size=(g, g), mode='bicubic', align_corners=False).permute(0, 2, 3, 1)  # (1, g, g, D)
            self.register_buffer('local_pos', p.reshape(1, g * g, D), persistent=False)  # recomputed, so not saved

    def forward(self, global_views, local_views=None):
        f = self.encoder.forward_features(global_views, pool='cls')  # (2n, D)
        if local_views is not None:  # + (L n, D)
            f = torch.cat([f, self.encoder.encode(self.encoder.patch_embed(local_views) + self.local_pos)[:, 0]])
        return self.head(f)


def dino_loss(student_out, teacher_out, center, teacher_temp, student_temp):
    """DINO's loss on view-major outputs: student (V n, K) for V views, teacher (2n, K) for the two global views.
    The mean over samples of H(teacher view t, student view v), averaged over every pair with v != t. The teacher is
    centred and sharpened: softmax((out - center) / teacher_temp). -> (loss, mean entropy of the teacher's outputs)."""
    n, K = teacher_out.shape[0] // 2, teacher_out.shape[1]
    V = student_out.shape[0] // n
    logp = F.log_softmax(student_out.float() / student_temp, dim=-1).view(V, n, K)
    logq = F.log_softmax((teacher_out.float() - center) / teacher_temp, dim=-1).view(2, n, K)
    q = logq.exp()
    ce = -torch.einsum('tnk,vnk->tv', q, logp) / n  # (2, V): cross-entropy of every (teacher, student) view pair
    loss = (ce.sum() - ce.diagonal().sum()) / (2 * V - 2)  # the diagonal pairs a view with itself
    return loss, -(q * logq).sum(-1).mean()


class DINO(nn.Module):
    """Student and teacher and the loss in one module, so that one torch.compile covers the step; only the student
    has gradients (the teacher is an EMA of the student, updated by update_teacher)."""

    def __init__(self, student, teacher, out_dim, student_temp):
        super().__init__()
        self.student, self.teacher, self.student_temp = student, teacher, student_temp
        self.teacher.requires_grad_(False)
        self.register_buffer('center', torch.zeros(out_dim))
        # set every step from its schedule; a tensor, so that torch.compile does not recompile for each new value
        self.register_buffer('teacher_temp', torch.ones(()))

    def forward(self, global_views, local_views=None):
        """-> (loss, sum of the teacher's outputs over its views (K,) for the centre, teacher output entropy)."""
        with torch.no_grad():
            t = self.teacher(global_views).float()  # (2n, K)
        s = self.student(global_views, local_views)  # ((2 + L) n, K)
        loss, entropy = dino_loss(s, t, self.center, self.teacher_temp, self.student_temp)
        return loss, t.sum(0), entropy


def build(mcfg, cfg, local_size):
    """The DINO module: a student (encoder with drop path, head) and a teacher that starts as its copy, as in DINO."""
    def net(drop, grid):
        return MultiCropWrapper(M.VisionTransformer(replace(mcfg, drop_path=drop)),
                                DINOHead(mcfg.embed_dim, cfg.out_dim, cfg.head_hidden, cfg.head_bottleneck), grid)
    student = net(cfg.drop_path, (local_size // mcfg.patch_size) * (cfg.local_crops_number > 0))
    teacher = net(0.0, 0)
    teacher.load_state_dict(student.state_dict())
    return DINO(student, teacher, cfg.out_dim, cfg.student_temp)


def local_view_size(cfg, mcfg):
    """The local view side: --local_crops_size, or 96/224 of img_size rounded to whole patches (at least one)."""
    p = mcfg.patch_size
    size = cfg.local_crops_size or max(p, round(mcfg.img_size * 96 / 224 / p) * p)
    if size % p or size > mcfg.img_size:
        raise common.UserError(f"--local_crops_size {size} must be a multiple of the patch size {p} and at most "
                               f"img_size {mcfg.img_size}: choose e.g. {min(mcfg.img_size, max(p, size // p * p))}")
    return size

# -----------------------------------------------------------------------------
# the schedules and the updates outside the gradient step


def teacher_temp_at(epoch, cfg):
    """DINO's teacher temperature: np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs) for the
    first epochs, then teacher_temp. In a run shorter than the warm-up it ends with the run (clipped): the recipe's
    30 epochs would otherwise never reach teacher_temp in a short run."""
    w, t0, t1 = min(cfg.warmup_teacher_temp_epochs, cfg.epochs), cfg.warmup_teacher_temp, cfg.teacher_temp  # (clipped)
    return t1 if epoch >= w else t0 + (t1 - t0) * epoch / max(w - 1, 1)


@torch.no_grad()
def update_teacher(teacher_params, student_params, m):
    """DINO's EMA, parameter by parameter: teacher = m * teacher + (1 - m) * student (one fused op per list)."""
    torch._foreach_mul_(teacher_params, m)
    torch._foreach_add_(teacher_params, student_params, alpha=1 - m)


@torch.no_grad()
def update_center(center, teacher_sum, count, m):
    """DINO's centre: center = m * center + (1 - m) * the mean teacher output over `count` rows (the global batch's
    global views; teacher_sum is their sum over every rank)."""
    center.mul_(m).add_(teacher_sum / count, alpha=1 - m)


@torch.no_grad()
def clip_per_tensor(params, clip):
    """DINO's clip_gradients, without a host sync: each gradient scaled to norm at most `clip`, on its own."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack(torch._foreach_norm(grads))
    torch._foreach_mul_(grads, (clip / (norms + 1e-6)).clamp(max=1.0).unbind())


def flops_per_image(dino, img_size, local_size, n_local, device):
    """Training FLOPs per source image, counted on one forward of each network: the student on every view (x3 for
    forward + backward), the teacher on the two global views."""
    g = torch.zeros(2, 3, img_size, img_size, device=device)
    local = torch.zeros(n_local, 3, local_size, local_size, device=device) if n_local else None
    return 3 * M.forward_flops(dino.student, g, local) + M.forward_flops(dino.teacher, g)

# -----------------------------------------------------------------------------


def main(argv=None):
    cfg, given = common.configure(globals(), argv, CHECKS)
    # the out_dir is locked before it is looked at, so no other run can change it between the checks and the writes
    with common.out_dir_locked(cfg.out_dir, 'dino', take=cfg.bench_steps == 0):
        # resume or start fresh, and the model's checks before anything is written
        ck, cfg = ((None, cfg) if cfg.bench_steps else
                   common.check_out_dir(cfg, given, 'dino', FIXED_ON_RESUME, CHECKS))
        if 'warmup_teacher_temp_epochs' in given and cfg.warmup_teacher_temp_epochs > cfg.epochs:
            raise common.UserError(f"--warmup_teacher_temp_epochs {cfg.warmup_teacher_temp_epochs} is longer than the "
                                   f"run's {cfg.epochs} epoch{'s' * (cfg.epochs > 1)}: the teacher temperature would never reach "
                                   f"--teacher_temp {cfg.teacher_temp:g}; choose at most {cfg.epochs}")
        mcfg = common.preset_config(cfg)
        local_view_size(cfg, mcfg)
        with common.Run(cfg, 'dino', lock=cfg.bench_steps == 0) as run:
            return train(cfg, given, ck, mcfg, run)


def train(cfg, given, ck, mcfg, run):
    local_size, device = local_view_size(cfg, mcfg), run.device
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    dino = build(mcfg, cfg, local_size).to(device)
    student, teacher = dino.student, dino.teacher
    flops = flops_per_image(dino, mcfg.img_size, local_size, cfg.local_crops_number, device)
    torch.manual_seed(data.seed_for(cfg.seed, 4, run.rank))  # drop path: its own stream on each rank

    # data: the whole split as uint8 on the device; each rank makes the views of its rows of the global batch
    train_split = data.subset(data.load_split(cfg.dataset, 'train', cfg.data_dir, download=cfg.download), cfg.subset, cfg.seed)
    loader = data.DeviceLoader(train_split, batch_size=cfg.batch_size, device=device, seed=cfg.seed, rank=run.rank,
                               world_size=run.world_size, accum_steps=cfg.accum_steps, img_size=mcfg.img_size)
    views = Views(cfg, mcfg.img_size, local_size, loader.device)
    steps_per_epoch = loader.steps_per_epoch
    total_steps = cfg.bench_warmup + cfg.bench_steps if cfg.bench_steps else cfg.epochs * steps_per_epoch
    warmup_steps = common.warmup_steps(cfg, given, steps_per_epoch, run)
    if cfg.warmup_teacher_temp_epochs > cfg.epochs:  # the recipe's 30 in a shorter run: clipped (teacher_temp_at)
        run.effective['warmup_teacher_temp_epochs'] = (cfg.epochs, f"the recipe's {cfg.warmup_teacher_temp_epochs} do not "
                                                                   f"fit in {cfg.epochs} epoch{'s' * (cfg.epochs > 1)}")
    peak_lr = cfg.lr * cfg.batch_size / 256

    # optimizer: AdamW on the student; the weight decay of the group marked 'decayed' (a key the optimizer's state
    # dict keeps) follows its own schedule
    groups = [dict(g, decayed=g['weight_decay'] > 0) for g in common.param_groups(student, cfg.weight_decay)]
    optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=(cfg.beta1, cfg.beta2), **(dict(fused=True) if run.cuda else {}))
    step, knn_floor = 0, None
    if ck is not None:  # resume: both networks, the centre, optimizer, scaler, RNG (drop path), the step, the kNN floor
        path = os.path.join(cfg.out_dir, 'ckpt.pt')
        common.check_resume_step(ck, steps_per_epoch, len(train_split.labels), path)
        with common.restoring(path):  # what does not fit this run: one line
            student.load_state_dict(ck['student'])
            M.load_weights(teacher.encoder, ck['model'], what=path)
            teacher.head.load_state_dict(ck['teacher_head'])
            dino.center.copy_(ck['center'])
            common.load_optimizer(optimizer, ck['optimizer'])
            if ck.get('scaler') and run.scaler.is_enabled():  # an fp16 run resumed from bf16/fp32/CPU: a fresh scale
                run.scaler.load_state_dict(ck['scaler'])
            if run.rank == 0:
                common.set_rng_state(ck['rng'])
            else:
                torch.manual_seed(data.seed_for(cfg.seed, 4, run.rank, ck['step']))
        step, knn_floor = ck['step'], ck.get('knn_floor')

    # fixed val images (spread over the split, all classes) as the kNN queries, a fixed train subset as the bank
    if not cfg.bench_steps:
        val_split = data.spread(data.load_split(cfg.dataset, 'val', cfg.data_dir, download=cfg.download), cfg.val_images)
        knn_split = data.subset(train_split, cfg.knn_bank, cfg.seed)

    n_student, n_enc = (sum(p.numel() for p in net.parameters()) for net in (student, student.encoder))
    run.taken("the preset's", img_size=mcfg.img_size, patch_size=mcfg.patch_size)
    run.banner({'params': f"{n_student / 1e6:.2f}M student ({n_enc / 1e6:.2f}M encoder), the same in the teacher",
                'views': f"2 x {mcfg.img_size}px global (area {cfg.global_crops_min:g}-1)" + (
                    f" + {cfg.local_crops_number} x {local_size}px local (area {cfg.local_crops_min:g}-"
                    f"{cfg.global_crops_min:g})" if cfg.local_crops_number else ""),
                'log K': f"{math.log(cfg.out_dim):.3f}", 'train images': len(train_split.labels),
                'steps/epoch': steps_per_epoch, 'effective batch': cfg.batch_size, 'micro batch': loader.micro_batch,
                'peak lr': f"{peak_lr:.3g}", 'start step': step})

    # compile the DINO module (both networks + loss); `dino` stays raw for saving and updates. No DDP wrapper: the
    # student's gradients are views of one buffer, averaged over the ranks by one all-reduce after backward,
    # outside the graph (see common.FlatGrads)
    mode = common.compile_mode(cfg, run)
    step_model = torch.compile(dino, mode=mode) if mode else dino
    grads = common.FlatGrads(dino, run)  # under torchrun, first rank 0's weights (both networks) to every rank
    cudagraphs = mode in ('reduce-overhead', 'max-autotune')
    peak = common.peak_flops(run)
    teacher_params, student_params = list(teacher.parameters()), list(student.parameters())

    def save(top1=None):
        common.save_checkpoint({'kind': 'dino', 'model': teacher.encoder.state_dict(), 'model_config': asdict(mcfg),
                            'student': student.state_dict(), 'teacher_head': teacher.head.state_dict(),
                            'center': dino.center, 'optimizer': optimizer.state_dict(), 'scaler': run.scaler.state_dict(),
                            'step': step, 'epoch': step / steps_per_epoch, 'config': vars(cfg),
                            'rng': common.rng_state(), 'knn_top1': top1, 'knn_floor': knn_floor,
                            'loss': loss_now, 'teacher_entropy': entropy_now}, cfg.out_dir)

    def knn(what):
        if not cfg.knn_bank or not run.master:
            return None
        t0, result = time.time(), evaluate.knn_top1(teacher.encoder, knn_split, val_split, run)
        dino.train()
        run.log(dict(event='knn', step=step, what=what, **result),
                f"kNN top-1 of the teacher on {len(val_split.labels)} val images ({what}): {result['top1']:.2f}% "
                f"({len(knn_split.labels)} bank, {time.time() - t0:.1f}s)")
        return result['top1']

    def knn_and_save(done):
        """At the end of epoch `done` (rank 0): the teacher's kNN, then ckpt.pt. -> the kNN top-1."""
        top1 = knn(f"epoch {done}")
        save(top1)
        run.log(dict(event='checkpoint', step=step, epoch=done, knn_top1=top1),
                f"epoch {done}: saved {cfg.out_dir}/ckpt.pt")
        evaluate.write_learning_curves(cfg.out_dir, run)  # curves.png: loss, entropy, lr, kNN and floor
        return top1

    if not cfg.bench_steps and step == 0:
        knn_floor = knn('floor: the initial weights')  # what an untrained encoder of this architecture already gets

    # progress: the step, a smoothed rate and the ETA, which the run's progress thread prints whenever 10 s pass
    # without a line (also inside a step: the first one compiles on CUDA), a benchmark too
    meter = common.Progress('step', total_steps, run, done=step, per=cfg.batch_size,
                            phase='the first step' + (' (torch.compile)' if mode else '')).start()

    # the loop
    dino.train()
    t_start = t_log = time.time()
    sums, teacher_sum = torch.zeros(2, device=device), torch.zeros(cfg.out_dim, device=device)  # (loss, entropy), (K,)
    n_losses, step_logged, top1 = 0, step, None
    loss_now, entropy_now = (ck.get(k, float('nan')) if ck is not None else float('nan')  # the last logged values
                             for k in ('loss', 'teacher_entropy'))
    run.in_loop = True  # from here on, SIGTERM or Ctrl-C saves a checkpoint after the current step
    while step < total_steps:
        epoch = step // steps_per_epoch
        for _, micro_batches in loader.epoch(epoch, start_step=step % steps_per_epoch):
            if cfg.bench_steps and step == cfg.bench_warmup:  # benchmark: the timed steps start here
                t_bench = common.bench_start(run, t_start, cudagraphs)
            lr_now = common.get_lr(step, total_steps, warmup_steps, peak_lr, cfg.min_lr)
            wd_now = common.get_lr(step, total_steps, 0, cfg.weight_decay, cfg.weight_decay_end)  # cosine, no warm-up
            for group in optimizer.param_groups:
                group['lr'] = lr_now * group['lr_scale']
                group['weight_decay'] = wd_now if group['decayed'] else 0.0
            temp_now = teacher_temp_at(epoch, cfg)
            dino.teacher_temp.fill_(temp_now)
            u = views.draw(step)  # (2 + L, batch_size, U): the views of the whole global batch; each rank takes its rows
            teacher_sum.zero_()
            for micro, (x, _) in enumerate(micro_batches):
                global_views, local_views = views(data.denormalize(x), u[:, loader.rows(micro)])
                if cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()  # a new replay: the last step's outputs are consumed
                with run.autocast:
                    loss, t_sum, entropy = step_model(global_views, local_views)
                run.scaler.scale(loss / cfg.accum_steps).backward()  # adds into the gradient buffer
                sums += torch.stack([loss.detach(), entropy])  # summed on the device: no host sync per step
                teacher_sum += t_sum
                n_losses += 1
            grads.all_reduce()  # under torchrun: the gradients' mean over the ranks, once per optimizer step
            if cfg.grad_clip > 0:
                run.scaler.unscale_(optimizer)
                clip_per_tensor(student_params, cfg.grad_clip)
            if epoch < cfg.freeze_last_layer:  # DINO: the last layer is not updated in the first epochs (AdamW skips
                student.head.last_layer.weight.grad = None  # a parameter without a gradient: no momentum, no decay)
            run.scaler.step(optimizer)  # a plain optimizer.step() unless fp16
            run.scaler.update()
            grads.zero()  # not zero_grad(set_to_none=True): the gradients stay views of the buffer (the frozen one too)
            # the teacher and the centre, identically on every rank (the student's weights and the sums are the same)
            update_teacher(teacher_params, student_params, common.get_lr(step, total_steps, 0, cfg.momentum_teacher, 1.0))
            if run.ddp:
                torch.distributed.all_reduce(teacher_sum)
            update_center(dino.center, teacher_sum, 2 * cfg.batch_size, cfg.center_momentum)
            step += 1

            meter.update(step)  # host-side counts for the smoothed rate and the progress thread's line
            if cfg.bench_steps:
                if step == total_steps:
                    return common.bench_result(run, t_bench, cfg, flops, peak, sums[0] / n_losses,
                                               f"dino {cfg.model} {cfg.local_crops_number} local crops")
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
                loss_now, entropy_now = (run.mean(v / n_losses) for v in sums.tolist())
                if not math.isfinite(loss_now):
                    raise common.NonFiniteLoss.at(loss_now, step, cfg.out_dir,
                                                  "lower --lr, lower --grad_clip, or use --dtype bfloat16")
                dt, t_log = time.time() - t_log, time.time()
                ips = (step - step_logged) * cfg.batch_size / dt  # this interval's; the line shows the smoothed rate
                ips_smooth, eta = meter.rate(), meter.eta()
                mfu = ips_smooth * flops / (peak * run.world_size) if peak else None
                run.log(dict(event='train', step=step, epoch=round(step / steps_per_epoch, 4), loss=loss_now,
                             teacher_entropy=entropy_now, lr=lr_now, weight_decay=wd_now, teacher_temp=temp_now,
                             images_per_s=round(ips_smooth, 1), interval_images_per_s=round(ips, 1), mfu=mfu,
                             eta_s=round(eta)),
                        f"epoch {step / steps_per_epoch:7.2f} | step {step}/{total_steps} | loss {loss_now:.4f} | "
                        f"teacher entropy {entropy_now:.3f} | lr {lr_now:.2e} | {common.fmt_rate(ips_smooth)} img/s"
                        + (f" | mfu {100 * mfu:.1f}%" if mfu else "") + f" | eta {common.fmt_eta(eta)}")
                sums.zero_()
                n_losses, step_logged = 0, step
            if stopping:  # SIGTERM (pre-emption) or Ctrl-C: save where we are and say how to continue
                if run.master:
                    save()
                run.print(f"stopped by signal at step {step}; checkpoint saved to {cfg.out_dir}/ckpt.pt; continue "
                          f"with: {common.resume_command('dino', cfg.out_dir)}")
                return 128 + run.stop_signal
            if end_of_epoch and step < total_steps:  # (the last epoch's kNN and checkpoint: at the end, below)
                done = step // steps_per_epoch
                if run.master and done % cfg.ckpt_every == 0:
                    top1 = knn_and_save(done)
                if run.ddp and done % cfg.ckpt_every == 0:
                    torch.distributed.barrier()
                meter.skip()  # the rate is the training's: the kNN and checkpoint are left out
                t_log = time.time()

    # the end of the run, where a run stopped at its last step resumes: the final kNN, checkpoint and summary
    if run.master:
        top1 = knn_and_save(step // steps_per_epoch)
    if run.ddp:
        torch.distributed.barrier()
    if run.master:  # the run's summary; its presence also marks the run as finished (reproduce.sh skips it)
        summary = dict(script='dino', model=cfg.model, dataset=cfg.dataset, epochs=cfg.epochs, steps=step,
                       final_loss=loss_now, teacher_entropy=entropy_now, log_k=math.log(cfg.out_dim),
                       knn_top1=top1, knn_floor=knn_floor, wall_s=round(time.time() - t_start, 1), config=vars(cfg))
        common.save_atomic(json.dumps(summary, indent=1), os.path.join(cfg.out_dir, 'results.json'))
    run.print(f"done in {time.time() - t_start:.0f}s: {cfg.out_dir}/ckpt.pt")
    return 0


if __name__ == '__main__':
    common.cli(main)
