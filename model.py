"""
The masked autoencoder: a ViT encoder and the MAE decoder, written from scratch in plain PyTorch.

Follows the official MAE code (facebookresearch/mae, models_mae.py) in everything a user can observe:
`loss, pred, mask = model(imgs, mask_ratio)`, argsort-of-noise masking, fixed 2-D sin-cos position embeddings
with a cls slot, the official weight init and parameter names, so a released MAE checkpoint loads with
`load_weights`. Adds block masking (the study's ablation), a classifier for fine-tuning and probing, presets
for the study's ViT-Lite-7/4, and the SMAE objective (MAE plus a perceptual term from a frozen critic).

Order: config and presets, position embeddings, blocks, the encoder, the MAE; then masking, loading, FLOPs, SMAE.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

# -----------------------------------------------------------------------------
# configuration and presets

MASKINGS = ('random', 'block')  # random: official MAE; block: BEiT-style rectangles
POOLS = ('cls', 'mean')         # the classification feature: the cls token, or the mean of the patch tokens
WEIGHTINGS = ('fixed', 'uncertainty')  # SMAE's mix of pixel and perceptual loss: fixed alpha, or learned (Kendall et al.)


@dataclass
class ViTConfig:
    img_size: int = 64            # input resolution (square)
    patch_size: int = 4           # patch side in pixels; img_size must be a multiple of it
    in_chans: int = 3             # image channels
    embed_dim: int = 256          # encoder width
    depth: int = 7                # encoder blocks
    num_heads: int = 4            # encoder attention heads
    mlp_ratio: float = 2.0        # encoder MLP hidden width / embed_dim
    decoder_embed_dim: int = 128  # decoder width
    decoder_depth: int = 2        # decoder blocks
    decoder_num_heads: int = 4    # decoder attention heads
    decoder_mlp_ratio: float = 2.0  # decoder MLP hidden width / decoder_embed_dim
    norm_pix_loss: bool = False   # target = per-patch normalised pixels (MAE paper option); raw pixels are better here
    loss_on_all: bool = False     # pixel loss on every patch (SMAE) instead of the masked patches only (MAE)
    masking: str = 'random'       # one of MASKINGS
    mask_ratio: float = 0.75      # fraction of patches masked when forward() is given no ratio
    num_classes: int = 0          # >0 adds a classification head (fine-tuning)
    global_pool: str = 'cls'      # one of POOLS
    drop_path: float = 0.0        # stochastic depth rate at the last block (fine-tuning option)

    def __post_init__(self):
        # every check of a model setting lives here, so the scripts fail at once with the fix, not with a shape error
        def check(ok, msg):
            if not ok:
                raise ValueError(msg)
        check(self.img_size >= 1 and self.patch_size >= 1, f"img_size and patch_size must be >= 1, got {self.img_size} and {self.patch_size}")
        check(self.img_size % self.patch_size == 0,
              f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}: pick sizes such that img_size % patch_size == 0")
        for prefix, dim, heads in (('', self.embed_dim, self.num_heads),
                                   ('decoder_', self.decoder_embed_dim, self.decoder_num_heads)):
            check(dim % heads == 0,
                  f"{prefix}embed_dim {dim} is not divisible by {prefix}num_heads {heads}: choose a width that is a multiple of the head count")
            check(dim % 4 == 0,
                  f"{prefix}embed_dim {dim} is not divisible by 4, which the 2-D sin-cos position embedding needs (sin|cos for each axis)")
        check(self.masking in MASKINGS, f"masking must be 'random' or 'block', got {self.masking!r}")
        check_mask_ratio(self.mask_ratio, self.num_patches, self.grid_size)
        check(self.global_pool in POOLS, f"global_pool must be 'cls' or 'mean', got {self.global_pool!r}")
        check(0.0 <= self.drop_path < 1.0, f"drop_path must be in [0, 1), got {self.drop_path}")

    @property
    def grid_size(self):
        return self.img_size // self.patch_size

    @property
    def num_patches(self):
        return self.grid_size ** 2


def mask_ratio_ok(mask_ratio):
    return 0.0 < mask_ratio < 1.0  # (NaN fails too)


def check_mask_ratio(mask_ratio, num_patches, grid_size):
    """A mask ratio must hide some patches and leave the encoder at least one visible patch."""
    if not mask_ratio_ok(mask_ratio):
        raise ValueError(f"mask ratio (--mask) must be in (0, 1), got {mask_ratio}: it is the fraction of patches hidden")
    if int(num_patches * (1 - mask_ratio)) < 1:
        raise ValueError(f"mask ratio (--mask) {mask_ratio} leaves no visible patch on a {grid_size}x{grid_size} patch grid: "
                         f"lower the mask ratio, or use smaller patches or larger images")


# Architectures by name. img_size/patch_size are the defaults for that preset and can be overridden.
PRESETS = {
    # the study's ViT-Lite-7/4 (Hassani et al.) with its 2x128 decoder: ~3.7M encoder parameters
    'vit_lite': dict(patch_size=4, embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0,
                     decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, decoder_mlp_ratio=2.0),
    # DeiT-Tiny / DeiT-Small encoders at 64x64 with patch 8, and a light decoder (shallow is better at this scale)
    'vit_tiny': dict(patch_size=8, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0,
                     decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, decoder_mlp_ratio=4.0),
    'vit_small': dict(patch_size=8, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
                      decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8, decoder_mlp_ratio=4.0),
    # the second seed: ViT-B/16 encoder (86M) with a ViT-Small-sized decoder (12 x 384, ~21M)
    'vit_base': dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                     decoder_embed_dim=384, decoder_depth=12, decoder_num_heads=6, decoder_mlp_ratio=4.0),
    # the official MAE ViT-B/16 (decoder 8 x 512): loads facebookresearch/mae's released checkpoints
    'mae_vit_base_patch16': dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, decoder_mlp_ratio=4.0),
}


def make_config(name, **overrides):
    """A ViTConfig from a preset name plus field overrides (None values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
    unknown = [k for k in overrides if k not in ViTConfig.__dataclass_fields__]
    if unknown:
        raise ValueError(f"unknown model config field(s) {unknown}: valid fields are {', '.join(ViTConfig.__dataclass_fields__)}")
    return ViTConfig(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})


# -----------------------------------------------------------------------------
# position embeddings (official MAE: fixed 2-D sin-cos, a cls slot of zeros)


def get_1d_sincos_pos_embed(embed_dim, pos):
    """pos (M,) -> (M, embed_dim) = [sin(pos * omega) | cos(pos * omega)], omega_d = 1 / 10000^(d / (embed_dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0))  # (D/2,)
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]                            # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)                                    # (M, D)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=True):
    """(1 + G*G, D) if cls_token else (G*G, D), float32, row-major over the patch grid.
    As in the official code (np.meshgrid's 'xy' indexing), the first half of the channels encodes the
    patch's column and the second half its row; matching it keeps released checkpoints interchangeable."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing='ij')              # each (G, G)
    emb = torch.cat([get_1d_sincos_pos_embed(embed_dim // 2, cols),         # (G*G, D/2) column
                     get_1d_sincos_pos_embed(embed_dim // 2, rows)], dim=1)  # (G*G, D/2) row -> (G*G, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


# -----------------------------------------------------------------------------
# transformer blocks (pre-norm; parameter names as timm's Block, which the official MAE uses)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads)  # (B, T, 3, H, C/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                         # 3 x (B, H, T, C/H)
        x = F.scaled_dot_product_attention(q, k, v)                            # (B, H, T, C/H): flash/efficient kernel on GPU
        return self.proj(x.transpose(1, 2).reshape(B, T, C))                   # (B, T, C)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x, rate, training):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""
    if rate == 0.0 or not training:
        return x
    keep = torch.empty(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, drop_path_rate=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> linear projection: a Conv2d with kernel = stride = patch, as officially."""

    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, G, G) -> (N, L, D), row-major patch order


# -----------------------------------------------------------------------------
# the encoder (also the classifier for fine-tuning and probing)


class VisionTransformer(nn.Module):
    """ViT encoder: patch embedding + cls token + fixed sin-cos positions + blocks + final norm. With
    cfg.num_classes > 0 it is a classifier (`head`); its keys are the MAE encoder's keys, so a pre-training
    checkpoint's encoder loads into it directly."""

    def __init__(self, cfg: ViTConfig, init=True):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer('pos_embed', get_2d_sincos_pos_embed(D, cfg.grid_size)[None])  # (1, 1+L, D), fixed, saved
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]     # linear decay rule
        self.blocks = nn.ModuleList([Block(D, cfg.num_heads, cfg.mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else None
        if init:
            self.initialize_weights()

    def initialize_weights(self):
        """The official MAE init: the patch embedding like a Linear, cls/mask tokens N(0, 0.02), every Linear
        xavier-uniform with zero bias, LayerNorm weight 1 bias 0; a classifier head trunc_normal(std 2e-5), as in
        official fine-tuning, so the first steps are gentle."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for name, p in self.named_parameters():
            if name in ('cls_token', 'mask_token'):
                nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.head is not None:
            nn.init.trunc_normal_(self.head.weight, std=2e-5)

    def patchify(self, imgs):
        """imgs (N, C, H, W) -> (N, L, p*p*C), row-major patches, channels last inside a patch (official order)."""
        p, (N, C, H, W) = self.cfg.patch_size, imgs.shape
        x = imgs.reshape(N, C, H // p, p, W // p, p)                 # (N, C, h, p, w, p)
        x = torch.einsum('nchpwq->nhwpqc', x)                        # (N, h, w, p, p, C)
        return x.reshape(N, (H // p) * (W // p), p * p * C)

    def unpatchify(self, x):
        """(N, L, p*p*C) -> imgs (N, C, H, W); the inverse of patchify."""
        p, (N, L, D) = self.cfg.patch_size, x.shape
        h, C = math.isqrt(L), D // (p * p)
        assert h * h == L and C * p * p == D, f"cannot unpatchify {tuple(x.shape)} with patch size {p}"
        x = torch.einsum('nhwpqc->nchpwq', x.reshape(N, h, h, p, p, C))  # (N, C, h, p, w, p)
        return x.reshape(N, C, h * p, h * p)

    def embed(self, imgs):
        """imgs (N, C, H, W) -> patch tokens with their positions (N, L, D), no cls yet."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:, :]

    def encode(self, x):
        """tokens (N, K, D) without cls -> prepend cls (+ its zero position), blocks, final norm -> (N, 1+K, D)."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)  # (N, 1, D)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_features(self, imgs, pool=None):
        """Unmasked encoding for classification, probing and kNN: (N, C, H, W) -> (N, D)."""
        x = self.encode(self.embed(imgs))  # (N, 1+L, D)
        return x[:, 0] if (pool or self.cfg.global_pool) == 'cls' else x[:, 1:].mean(dim=1)

    def forward(self, imgs):
        assert self.head is not None, "this encoder has no head: build it with num_classes > 0, or call forward_features"
        return self.head(self.forward_features(imgs))


# -----------------------------------------------------------------------------
# the masked autoencoder


class MaskedAutoencoderViT(VisionTransformer):
    """MAE: the encoder sees the visible patches (+ cls) only; the decoder sees every position."""

    def __init__(self, cfg: ViTConfig):
        super().__init__(replace(cfg, num_classes=0), init=False)  # initialised once, below, with the decoder
        Dd = cfg.decoder_embed_dim
        self.decoder_embed = nn.Linear(cfg.embed_dim, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.register_buffer('decoder_pos_embed', get_2d_sincos_pos_embed(Dd, cfg.grid_size)[None])  # (1, 1+L, Dd)
        self.decoder_blocks = nn.ModuleList([Block(Dd, cfg.decoder_num_heads, cfg.decoder_mlp_ratio)
                                             for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.decoder_pred = nn.Linear(Dd, cfg.patch_size ** 2 * cfg.in_chans)
        self.initialize_weights()  # one pass over encoder and decoder together

    def num_keep(self, mask_ratio):
        check_mask_ratio(mask_ratio, self.cfg.num_patches, self.cfg.grid_size)
        return int(self.cfg.num_patches * (1 - mask_ratio))

    def masking_noise(self, n, mask_ratio, masking=None, generator=None, device=None):
        """Noise (n, L) whose argsort gives the masking. 'random': U(0, 1), as officially. 'block': the patches of
        blocks drawn afresh from `generator` (sample_block_masks, below) get noise + 1; the blocks cover exactly
        L - len_keep patches, so exactly those are masked: every block patch, and nothing else."""
        masking, device = masking or self.cfg.masking, device or self.pos_embed.device
        noise = torch.rand(n, self.cfg.num_patches, device=device, generator=generator)
        if masking == 'random':
            return noise
        if masking != 'block':
            raise ValueError(f"masking must be 'random' or 'block', got {masking!r}")
        cover, _, _ = sample_block_masks(n, self.cfg.grid_size, self.cfg.num_patches - self.num_keep(mask_ratio),
                                         generator=generator, device=device)
        return noise + cover.to(noise.dtype)  # (n, L)

    def random_masking(self, x, mask_ratio, noise=None):
        """Official per-sample masking by argsort of noise: keep the len_keep smallest. x (N, L, D) ->
        x_visible (N, K, D), mask (N, L) with 1 = masked in patch order, ids_restore (N, L)."""
        N, L, D = x.shape
        len_keep = self.num_keep(mask_ratio)
        if noise is None:
            noise = self.masking_noise(N, mask_ratio, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)          # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]               # (N, K)
        x_visible = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, D))  # (N, K, D)
        mask = torch.ones(N, L, device=x.device)           # float32 even under autocast
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)          # (N, L), back in patch order
        return x_visible, mask, ids_restore

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        x = self.embed(imgs)                                # (N, L, D)
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        return self.encode(x), mask, ids_restore            # (N, 1+K, D)

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)                           # (N, 1+K, Dd)
        N, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(N, L + 1 - x.shape[1], -1)   # (N, L-K, Dd)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)   # (N, L, Dd) in shuffled order
        x_ = torch.gather(x_, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed         # (N, 1+L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))         # (N, 1+L, p*p*C)
        return x[:, 1:, :]                                  # drop cls -> (N, L, p*p*C)

    def pixel_target(self, imgs):
        """The reconstruction target in patch space: raw (normalised-image) pixels, or per-patch normalised."""
        target = self.patchify(imgs)                        # (N, L, p*p*C)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, imgs, pred, mask, on_all=None):
        """Per-patch MSE against pixel_target, averaged over the masked patches (MAE), or over all patches
        (on_all; default cfg.loss_on_all, SMAE). With on_all=False it is the masked-patch MSE that pretrain.py's
        val loss and evaluate.py report."""
        loss = ((pred.float() - self.pixel_target(imgs).float()) ** 2).mean(dim=-1)  # (N, L) per-patch loss
        if self.cfg.loss_on_all if on_all is None else on_all:
            return loss.mean()
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=None, noise=None):
        mask_ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)    # (N, L, p*p*C)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def pixel_mask(self, mask):
        """Patch mask (N, L), 1 = masked -> pixel mask (N, 1, H, W)."""
        g, p = self.cfg.grid_size, self.cfg.patch_size
        return mask.view(-1, 1, g, g).repeat_interleave(p, 2).repeat_interleave(p, 3)

    def reconstruct(self, imgs, pred, mask, paste=True):
        """Images from predictions, in the input's (normalised) space: (reconstruction, reconstruction with the
        visible patches pasted from the input, or None if paste=False). With norm_pix_loss the predictions are
        per-patch normalised; turning them into pixels needs each patch's true mean and variance, which this
        does (for the SMAE critic, which sees the image anyway). evaluate.py does not score such pictures."""
        if self.cfg.norm_pix_loss:
            target = self.patchify(imgs)
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        recon = self.unpatchify(pred.float())
        if not paste:
            return recon, None
        m = mask[:, :, None].expand(-1, -1, pred.shape[-1]).to(pred.dtype)  # (N, L, p*p*C)
        return recon, self.unpatchify(pred.float() * m + self.patchify(imgs).float() * (1 - m))


# -----------------------------------------------------------------------------
# block masking (BEiT-style rectangles), drawn fresh on every call from the caller's generator, vectorised over masks


def sample_block_masks(n, grid, num_masked, generator=None, device=None, min_area=16, log_aspect=math.log(1 / 0.3),
                       tries=4, rounds=None):
    """n block masks on a grid x grid patch grid, each exactly `num_masked` patches and exactly the union of its
    blocks (BEiT's recipe: area ~ U[min_area, remaining], aspect log-uniform in [0.3, 1/0.3]; here never wrapping
    around the edge). Each of `rounds` rounds (default 16, or 32 when more than half the grid is masked) adds at most
    one rectangle to every mask: the first of `tries` proposals that adds 1..remaining new patches (rejection
    sampling, so no overshoot); below min_area remaining, proposals aim at the remainder itself. A mask still short
    after the rounds takes its missing patches as 1x1 blocks: the next uncovered patches in reading order from a
    random patch. Of 200,000 masks that happened to 1 at 128 of 16x16 (the study's block ablation), to none at 192
    of 16x16 or 48 of 8x8 (mask 0.75) and on the tests' grids up to 8x8, to 0.06% at 16 of 4x4 (all of it) and to 3%
    at 230 of 16x16 (mask 0.9). The same kernels run whatever the draws, on the generator's device: no host sync.
    -> (cover (n, grid*grid) bool, rects (n, rounds, 4) of (top, left, height, width) with height 0 for no rectangle,
    patches (n, grid*grid) bool: the completion's 1x1 blocks, outside every rectangle)"""
    if not 0 <= num_masked <= grid * grid:
        raise ValueError(f"cannot mask {num_masked} patches on a {grid}x{grid} patch grid")
    device = generator.device if generator is not None else device
    rounds = rounds or (16 if 2 * num_masked <= grid * grid else 32)  # a fuller grid takes more rounds
    u = torch.rand(rounds, 4, n, tries, generator=generator, device=device)  # every round's proposals, drawn at once
    first = torch.rand(n, 1, generator=generator, device=device)            # where the completion starts
    aspect = torch.exp((2 * u[:, 1] - 1) * log_aspect)                    # log-uniform in [0.3, 1/0.3]
    shape = torch.stack([aspect, 1 / aspect], 1).sqrt_()                   # (rounds, 2, n, tries): h, w per sqrt(area)
    ar = torch.arange(grid, device=device)
    cover = torch.zeros(n, grid, grid, device=device)                      # 0/1 as float: overlaps are matmuls
    remaining = torch.full((n, 1), float(num_masked), device=device)       # patches still to mask (whole numbers)
    picked = []
    for r in range(rounds):
        lo = remaining.clamp(max=min_area)                                 # below min_area: aim at the remainder
        side = torch.addcmul(lo, u[r, 0], remaining - lo).sqrt_()          # sqrt(area), area ~ U[min_area, remaining]
        hw = (side * shape[r]).round_().clamp_(min=1)                      # (2, n, tries)
        # trim so that h * w <= remaining (rounding can overshoot the area): a proposal then never overshoots
        h = hw[0].minimum(remaining.clamp(1, grid))
        w = hw[1].minimum((remaining / h).floor_().clamp_(max=grid))       # 0 once a mask is done
        size = torch.stack([h, w])                                         # (2, n, tries)
        start = (u[r, 2:] * (grid + 1 - size)).floor_()                    # top, left in [0, grid - size]: no wrap
        spans = ((ar >= start[..., None]) & (ar < (start + size)[..., None])).float()  # (2, n, tries, G) rows, cols
        added = h * w - ((spans[0] @ cover) * spans[1]).sum(-1)            # (n, tries); overlapping is fine
        fits = (added > 0) & (added <= remaining)                          # done masks (remaining 0) take nothing
        pick = fits.long().argmax(1, keepdim=True)                         # the first fitting proposal: rejection
        ok = fits.gather(1, pick)                                          # sampling, cut at `tries`; (n, 1)
        rect = torch.stack([start[0], start[1], h, w, added]).gather(2, pick.expand(5, n, 1)) * ok  # (5, n, 1)
        rows, cols = spans.gather(2, pick[..., None].expand(2, n, 1, grid)) * ok[..., None]  # (n, 1, G) each
        cover = cover.maximum(rows.transpose(1, 2) * cols)                 # cover |= picked rectangle
        remaining -= rect[4]
        picked.append(rect[:4, :, 0].T)                                   # (n, 4)
    # completion of a mask still short: its next `remaining` uncovered patches in reading order from a random patch
    # (wrapping around at the end), each a 1x1 block; cumulative sums, no sort
    free = 1 - cover.flatten(1)                                            # (n, G*G)
    order = free.cumsum(1)                                                 # 1, 2, 3... along the uncovered patches
    skip = (free * (torch.arange(grid * grid, device=device) < first * grid * grid)).sum(1, keepdim=True)  # (n, 1)
    order = order - skip + order[:, -1:] * (order <= skip)                 # from the random start on, then wrapping
    patches = (free > 0) & (order <= remaining)                            # (n, G*G): the first `remaining` of them
    return cover.flatten(1).bool() | patches, torch.stack(picked, 1).long(), patches


# -----------------------------------------------------------------------------
# building models and loading weights


def build_mae(cfg: ViTConfig) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(cfg)


def build_classifier(cfg: ViTConfig, num_classes) -> VisionTransformer:
    return VisionTransformer(replace(cfg, num_classes=num_classes))


def build_squeezenet(num_classes):
    """torchvision's SqueezeNet 1.1, trained from scratch (finetune.py --arch squeezenet): the SMAE critic."""
    import torchvision  # here, not at the top: only SqueezeNet needs it, and it costs a second to import
    return torchvision.models.squeezenet1_1(weights=None, num_classes=num_classes)


def clean_state_dict(sd):
    """Accept official checkpoints ({'model': sd}) and wrapped models (DDP 'module.', torch.compile '_orig_mod.')."""
    if 'model' in sd and isinstance(sd['model'], dict):
        sd = sd['model']
    out = {}
    for k, v in sd.items():
        for prefix in ('module.', '_orig_mod.'):
            k = k[len(prefix):] if k.startswith(prefix) else k
        out[k] = v
    return out


def encoder_state_dict(sd):
    """The encoder part of an MAE state dict (what a classifier loads)."""
    return {k: v for k, v in clean_state_dict(sd).items() if not (k.startswith('decoder') or k == 'mask_token')}


def load_weights(model, sd, what='checkpoint'):
    """Load a state dict into `model` strictly, with a readable error. The position embeddings are fixed sin-cos, so
    at another image size the model's own (regenerated) ones are kept. A missing, unexpected or mis-shaped key raises
    ValueError naming the keys and both shapes."""
    sd, own = clean_state_dict(sd), model.state_dict()
    for k in ('pos_embed', 'decoder_pos_embed'):
        if k in sd and k in own and sd[k].shape != own[k].shape:
            sd[k] = own[k]  # regenerated for this model's grid
    problems = [f"shape mismatch {k}: {tuple(sd[k].shape)} in {what} vs {tuple(own[k].shape)} in model"
                for k in sd if k in own and sd[k].shape != own[k].shape]
    for label, keys in (('missing keys', [k for k in own if k not in sd]), ('unexpected keys', [k for k in sd if k not in own])):
        if keys:
            problems.append(f"{label} {keys[:6]}" + (" ..." if len(keys) > 6 else ""))
    if problems:
        raise ValueError(f"{what} does not fit this model ({'; '.join(problems[:8])}): build the model with the checkpoint's preset and sizes")
    model.load_state_dict(sd, strict=True)
    return model


# -----------------------------------------------------------------------------
# FLOPs, for MFU


def flops_per_image(cfg: ViTConfig, mask_ratio=None, train=True):
    """Matmul FLOPs per image (2 per multiply-add, attention included), x3 for forward + backward when training.
    mask_ratio=None: the unmasked encoder (classification); else the MAE encoder on visible tokens + decoder."""
    def blocks(n_tokens, dim, depth, mlp_ratio):
        per_token = 2 * (4 * dim * dim + 2 * dim * int(dim * mlp_ratio))   # qkv + proj + mlp
        return depth * (n_tokens * per_token + 2 * 2 * n_tokens * n_tokens * dim)  # + q@k^T and attn@v
    L, D, p2c = cfg.num_patches, cfg.embed_dim, cfg.patch_size ** 2 * cfg.in_chans
    if mask_ratio is None:
        f = 2 * L * p2c * D + blocks(L + 1, D, cfg.depth, cfg.mlp_ratio) + 2 * D * max(cfg.num_classes, 1)
    else:
        K, Dd = int(L * (1 - mask_ratio)), cfg.decoder_embed_dim
        f = (2 * L * p2c * D + blocks(K + 1, D, cfg.depth, cfg.mlp_ratio)
             + 2 * (K + 1) * D * Dd + blocks(L + 1, Dd, cfg.decoder_depth, cfg.decoder_mlp_ratio) + 2 * L * Dd * p2c)
    return 3 * f if train else f


def forward_flops(module, *inputs):
    """Forward FLOPs (2 per multiply-add) of `module(*inputs)`, counted by torch's FlopCounterMode."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops()


# -----------------------------------------------------------------------------
# SMAE: the pre-training objective with a perceptual term


class MAEObjective(nn.Module):
    """The pre-training loss as one module, so that one torch.compile covers model, loss and critic.
    alpha = 0 (or no critic): exactly the MAE loss. alpha > 0: (1 - alpha) * L_pixel + alpha * c * L_percep with
    L_pixel on all patches (the model is built with loss_on_all) and L_percep = MSE between critic features of the
    image and of the full reconstruction; c is fixed by calibration before training. weighting='uncertainty' learns
    the mix instead (Kendall et al.: sum_i exp(-s_i) L_i + s_i over the pixel and the c-scaled perceptual term)."""

    def __init__(self, mae, critic=None, alpha=0.0, critic_sigmoid=True, weighting='fixed'):
        super().__init__()
        self.mae, self.alpha, self.critic = mae, float(alpha), critic
        self.critic_sigmoid, self.weighting = critic_sigmoid, weighting
        if critic is not None:
            critic.eval()                      # frozen: eval mode and no gradients into its weights
            critic.requires_grad_(False)
        self.register_buffer('c', torch.ones(()))  # perceptual scale, fixed by calibration before training
        # learned log-variances only where there are two terms to mix (an unused parameter breaks DDP)
        self.log_vars = nn.Parameter(torch.zeros(2)) if weighting == 'uncertainty' and self.smae else None

    @property
    def smae(self):
        return self.alpha > 0 and self.critic is not None

    def train(self, mode=True):
        super().train(mode)
        if self.critic is not None:
            self.critic.eval()                 # stays in eval mode whatever the caller does
        return self

    def critic_features(self, x):
        f = self.critic(x)
        return torch.sigmoid(f) if self.critic_sigmoid else f

    def loss_terms(self, imgs, mask_ratio, noise=None):
        """(pixel loss, perceptual loss or None, pred, mask)."""
        pixel, pred, mask = self.mae(imgs, mask_ratio, noise)
        if not self.smae:
            return pixel, None, pred, mask
        recon, _ = self.mae.reconstruct(imgs, pred, mask, paste=False)  # full reconstruction, image space
        with torch.no_grad():
            target = self.critic_features(imgs)
        percep = F.mse_loss(self.critic_features(recon.to(imgs.dtype)).float(), target.float())
        return pixel, percep, pred, mask

    def forward(self, imgs, mask_ratio, noise=None):
        pixel, percep, _, _ = self.loss_terms(imgs, mask_ratio, noise)
        if percep is None:
            return pixel
        percep = self.c * percep
        if self.log_vars is not None:
            s = self.log_vars
            return torch.exp(-s[0]) * pixel + s[0] + torch.exp(-s[1]) * percep + s[1]
        return (1 - self.alpha) * pixel + self.alpha * percep

    def extra_state(self):
        return {'c': float(self.c), 'log_vars': None if self.log_vars is None else self.log_vars.detach().cpu()}

    def load_extra_state(self, state):
        if 'c' in state:
            self.c.fill_(state['c'])
        if self.log_vars is not None and state.get('log_vars') is not None:
            with torch.no_grad():
                self.log_vars.copy_(state['log_vars'])

    def extra_flops_per_image(self):
        """Critic FLOPs per training image: a forward on the image, forward + backward on the reconstruction."""
        if not self.smae:
            return 0
        cfg = self.mae.cfg
        image = torch.zeros(1, cfg.in_chans, cfg.img_size, cfg.img_size, device=self.c.device)
        return 4 * forward_flops(self.critic, image)


if __name__ == '__main__':  # a library, imported by the scripts: `python model.py` says what it holds
    print(__doc__.strip() + "\n\nmodel.py has no command of its own; the presets: "
          + ", ".join(f"{name} ({cfg.embed_dim}-wide, depth {cfg.depth}, {cfg.img_size}px / {cfg.patch_size}px patches)"
                      for name, cfg in ((name, make_config(name)) for name in PRESETS)))
