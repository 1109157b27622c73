"""The model's contract (official MAE semantics, block masking, presets, loading, bad configs)."""
import math

import pytest
import torch

import model as M


def small_cfg(**kw):
    # vit_lite at 32x32 with patch 8: a 4x4 grid keeps the tests fast
    base = dict(img_size=32, patch_size=8)
    base.update(kw)
    return M.make_config('vit_lite', **base)


@pytest.fixture
def mae():
    torch.manual_seed(0)
    return M.build_mae(small_cfg())


def test_patchify_unpatchify_round_trip_and_order(mae):
    imgs = torch.randn(2, 3, 32, 32)
    x = mae.patchify(imgs)
    assert x.shape == (2, 16, 8 * 8 * 3)
    assert torch.equal(mae.unpatchify(x), imgs)
    # official order: patch index = row * grid + col, channels last inside a patch
    row, col, py, px, c = 1, 2, 3, 5, 2
    assert x[0, row * 4 + col, (py * 8 + px) * 3 + c] == imgs[0, c, row * 8 + py, col * 8 + px]


def test_random_masking_counts_per_sample_and_restore(mae):
    N, L, D = 6, 16, 5
    x = torch.arange(N * L * D, dtype=torch.float32).view(N, L, D)
    noise = torch.rand(N, L)
    x_vis, mask, ids_restore = mae.random_masking(x, 0.75, noise)
    keep = int(L * (1 - 0.75))
    assert x_vis.shape == (N, keep, D)
    assert torch.all(mask.sum(1) == L - keep)
    assert len({tuple(m.tolist()) for m in mask}) > 1, "every sample got the same mask"
    # visible tokens are exactly the unmasked ones, and the kept ones are the smallest-noise ones
    for n in range(N):
        kept = (mask[n] == 0).nonzero().flatten()
        assert torch.equal(torch.sort(x_vis[n, :, 0]).values, x[n, kept, 0])
        assert set(kept.tolist()) == set(torch.argsort(noise[n])[:keep].tolist())
    # ids_restore inverts the shuffle
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(L).expand(N, L))


def test_same_noise_same_mask_and_output(mae):
    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 16)
    l1, p1, m1 = mae(imgs, 0.75, noise=noise)
    l2, p2, m2 = mae(imgs, 0.75, noise=noise)
    assert torch.equal(m1, m2) and torch.equal(p1, p2) and l1 == l2
    _, _, m3 = mae(imgs, 0.75, noise=torch.rand(3, 16))
    assert not torch.equal(m1, m3)


def test_forward_contract_shapes(mae):
    loss, pred, mask = mae(torch.randn(2, 3, 32, 32), mask_ratio=0.5)
    assert loss.dim() == 0 and pred.shape == (2, 16, 192) and mask.shape == (2, 16)
    assert set(mask.unique().tolist()) == {0.0, 1.0}


def test_position_embeddings_closed_form():
    D, G = 16, 3
    pe = M.get_2d_sincos_pos_embed(D, G, cls_token=True)
    assert pe.shape == (1 + G * G, D) and torch.all(pe[0] == 0)
    q = D // 4
    for i in range(G):
        for j in range(G):
            for d in range(q):
                w = 1.0 / 10000 ** (d / q)
                row = pe[1 + i * G + j]
                # first half: column (official np.meshgrid 'xy' order), second half: row
                assert math.isclose(row[d], math.sin(j * w), abs_tol=1e-6)
                assert math.isclose(row[q + d], math.cos(j * w), abs_tol=1e-6)
                assert math.isclose(row[2 * q + d], math.sin(i * w), abs_tol=1e-6)
                assert math.isclose(row[3 * q + d], math.cos(i * w), abs_tol=1e-6)


def test_pos_embed_is_fixed_not_trained(mae):
    assert 'pos_embed' not in dict(mae.named_parameters())
    assert torch.equal(mae.pos_embed[0], M.get_2d_sincos_pos_embed(256, 4))
    assert torch.equal(mae.decoder_pos_embed[0], M.get_2d_sincos_pos_embed(128, 4))


def test_loss_ignores_visible_predictions_in_masked_mode():
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16)
    mask[:, :12] = 1
    pred = torch.randn(2, 16, 192)
    pred2 = pred.clone()
    pred2[:, 12:] += 5.0  # change only visible patches
    masked = M.build_mae(small_cfg())
    assert torch.equal(masked.forward_loss(imgs, pred, mask), masked.forward_loss(imgs, pred2, mask))
    everywhere = M.build_mae(small_cfg(loss_on_all=True))
    assert everywhere.forward_loss(imgs, pred, mask) != everywhere.forward_loss(imgs, pred2, mask)


def test_norm_pix_loss_matches_direct_computation():
    torch.manual_seed(0)
    m = M.build_mae(small_cfg(norm_pix_loss=True))
    imgs = torch.randn(2, 3, 32, 32)
    pred = torch.randn(2, 16, 192)
    mask = (torch.rand(2, 16) > 0.5).float()
    # direct: cut the image into 8x8 patches by slicing, normalise each by its own mean/var
    losses = []
    for n in range(2):
        for r in range(4):
            for c in range(4):
                patch = imgs[n, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].permute(1, 2, 0).reshape(-1)
                t = (patch - patch.mean()) / (patch.var() + 1e-6) ** 0.5
                losses.append(((pred[n, r * 4 + c] - t) ** 2).mean())
    per_patch = torch.stack(losses).view(2, 16)
    expected = (per_patch * mask).sum() / mask.sum()
    assert torch.allclose(m.forward_loss(imgs, pred, mask), expected, atol=1e-5)


def union_of_rects(rects, G):
    """Rebuild each mask from its rectangles (top, left, h, w), checking that every rectangle lies inside the grid."""
    union = torch.zeros(rects.shape[0], G, G, dtype=torch.bool)
    for n, mask_rects in enumerate(rects.tolist()):
        for top, left, h, w in mask_rects:
            if h == 0:
                continue
            assert 0 <= top and top + h <= G and 0 <= left and left + w <= G and w >= 1, "a block leaves the grid"
            union[n, top:top + h, left:left + w] = True
    return union.flatten(1)


def assert_union_of_blocks(cover, rects, patches, G):
    """Each mask is exactly its rectangles plus its completion's 1x1 blocks, which lie outside the rectangles."""
    union = union_of_rects(rects, G)
    assert not (union & patches).any(), "a completion patch lies inside a rectangle"
    assert torch.equal(union | patches, cover), "a mask is not the union of its blocks"


@pytest.mark.parametrize('G,T', [(16, 128), (8, 32), (8, 48), (14, 49), (4, 15), (4, 1), (4, 16)])
def test_block_masks_exact_count_and_rectangles_inside_grid(G, T):
    # exactly T patches per mask (an overshoot would leave random holes in the blocks), and each mask is exactly
    # the union of its blocks: no block patch left out, nothing outside the blocks
    cover, rects, patches = M.sample_block_masks(300, G, T, generator=torch.Generator().manual_seed(1))
    assert cover.shape == (300, G * G) and cover.dtype == torch.bool and rects.shape[::2] == (300, 4)
    assert torch.all(cover.sum(1) == T)
    assert_union_of_blocks(cover, rects, patches, G)


@pytest.mark.parametrize('G,T', [(16, 128), (8, 48), (4, 15), (4, 16), (4, 0)])
def test_block_masks_completion_after_the_rounds(G, T):
    # a mask still short after its rounds (here cut to 2, so that most are) takes its missing patches as 1x1 blocks:
    # the next uncovered patches in reading order from a random patch, so exactly T in all, never one twice
    cover, rects, patches = M.sample_block_masks(300, G, T, generator=torch.Generator().manual_seed(4), rounds=2)
    assert rects.shape == (300, 2, 4) and torch.all(cover.sum(1) == T)
    assert_union_of_blocks(cover, rects, patches, G)
    short = patches.any(1)
    assert short.float().mean() > 0.5 or T == 0, "the completion was not exercised"
    free = ~union_of_rects(rects, G)
    runs, at_first = 0, 0
    for n in short.nonzero()[:, 0].tolist():  # the taken patches are one run, cyclically, of the uncovered ones
        run = patches[n][free[n]].int()
        if not run.all():                       # (when it takes every uncovered patch, it has no start)
            assert (run - run.roll(1)).clamp(min=0).sum() == 1, "the completion is not a run in reading order"
            runs, at_first = runs + 1, at_first + bool(run[0] and not run[-1])
    assert at_first < runs or T in (0, G * G), "the completion always starts at the first free patch"


def test_block_masks_through_the_model_mask_exactly_the_blocks():
    # the study's ablation: block masking at 0.5 on the 16x16 grid of ViT-Lite-7/4 at 64px; and an 8x8 preset at 0.75
    for name, ratio in [('vit_lite', 0.5), ('vit_tiny', 0.75)]:
        cfg = M.make_config(name, masking='block')
        m = M.build_mae(cfg)
        L = cfg.num_patches
        noise = m.masking_noise(64, ratio, generator=torch.Generator().manual_seed(0))
        _, mask, _ = m.random_masking(torch.randn(64, L, 4), ratio, noise)
        assert torch.all(mask.sum(1) == L - m.num_keep(ratio))
        assert torch.equal(mask.bool(), noise >= 1), "masked patches are not exactly the block patches"
        assert len({tuple(r.tolist()) for r in mask}) == 64, "masks repeat across the batch"


def test_block_masks_fresh_per_generator_state_and_reproducible():
    m = M.build_mae(M.make_config('vit_lite', masking='block'))
    draw = lambda g: m.masking_noise(256, 0.5, generator=g) >= 1
    a, b = draw(torch.Generator().manual_seed(5)), draw(torch.Generator().manual_seed(5))
    assert torch.equal(a, b), "the same generator state must give the same masks"
    g = torch.Generator().manual_seed(6)
    c, d = draw(g), draw(g)                     # other seed; and the next call from the same generator
    seen = {tuple(r.tolist()) for x in (a, c, d) for r in x}
    assert len(seen) == 3 * 256, "masks repeat across seeds or calls: they must be drawn fresh, not from a table"


def test_block_masks_are_beit_like():
    # rectangles of BEiT's sizes and shapes, not a scatter of tiny ones (BEiT's own sampler at 128 of 16x16:
    # ~5.6 rectangles of mean area ~30 per mask; only the last, remainder-filling ones may be small)
    _, rects, patches = M.sample_block_masks(1000, 16, 128, generator=torch.Generator().manual_seed(2))
    live = rects[..., 2] > 0
    ones = torch.ones(int(patches.sum()))                  # the completion's 1x1 blocks, if any
    h, w = torch.cat([rects[..., 2][live].float(), ones]), torch.cat([rects[..., 3][live].float(), ones])
    per_mask = (live.sum(1) + patches.sum(1)).float()
    assert 4 <= per_mask.mean() <= 8 and per_mask.max() <= 20, per_mask.mean()
    assert 20 <= (h * w).mean() <= 40, (h * w).mean()
    assert (h * w == 1).float().mean() < 0.1, "too many 1x1 blocks"
    big = h * w >= 16                           # aspect ratios spread over [0.3, 1/0.3] (up to rounding)
    assert (h / w)[big].min() < 0.45 and (h / w)[big].max() > 2.2 and 0.25 <= (h / w)[big].min()


def test_block_masks_without_wrap_around():
    # a block touching the right edge must not continue on the left edge (the reproduction's bug)
    g = torch.Generator().manual_seed(3)
    _, rects, _ = M.sample_block_masks(500, 8, 40, generator=g)
    r = rects.view(-1, 4)
    r = r[r[:, 2] > 0]
    assert torch.all(r[:, 0] + r[:, 2] <= 8) and torch.all(r[:, 1] + r[:, 3] <= 8)
    assert torch.all(r[:, 0] >= 0) and torch.all(r[:, 1] >= 0)
    assert torch.any(r[:, 1] + r[:, 3] == 8) and torch.any(r[:, 0] + r[:, 2] == 8)  # the edges are reached


def test_block_masks_bad_target():
    with pytest.raises(ValueError, match='cannot mask 65 patches on a 8x8'):
        M.sample_block_masks(4, 8, 65)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_block_masks_on_a_cuda_generator():
    g = torch.Generator(device='cuda').manual_seed(0)
    cover, rects, patches = M.sample_block_masks(512, 16, 128, generator=g)
    assert cover.is_cuda and rects.is_cuda and patches.is_cuda and torch.all(cover.sum(1) == 128)
    assert_union_of_blocks(cover.cpu(), rects.cpu(), patches.cpu(), 16)
    cover, rects, patches = M.sample_block_masks(512, 16, 128, generator=g, rounds=2)  # the completion too
    assert torch.all(cover.sum(1) == 128) and patches.any()
    assert_union_of_blocks(cover.cpu(), rects.cpu(), patches.cpu(), 16)


def test_vit_lite_parameter_count():
    m = M.build_mae(M.make_config('vit_lite'))
    enc = sum(p.numel() for n, p in m.named_parameters() if not (n.startswith('decoder') or n == 'mask_token'))
    assert abs(enc - 3.72e6) / 3.72e6 < 0.03, enc


@pytest.mark.parametrize('name', ['vit_tiny', 'vit_small', 'vit_base', 'mae_vit_base_patch16'])
def test_presets_build(name):
    cfg = M.make_config(name)
    assert cfg.img_size % cfg.patch_size == 0
    if name == 'vit_base':  # the second seed: ViT-B/16 (~86M) + ViT-Small-sized decoder (~22M)
        with torch.device('meta'):
            m = M.build_mae(cfg)
        enc = sum(p.numel() for n, p in m.named_parameters() if not (n.startswith('decoder') or n == 'mask_token'))
        dec = sum(p.numel() for n, p in m.named_parameters() if n.startswith('decoder') or n == 'mask_token')
        assert 85e6 < enc < 87e6 and 20e6 < dec < 23e6


def test_official_state_dict_names():
    m = M.build_mae(small_cfg())
    keys = set(m.state_dict())
    expected = {'patch_embed.proj.weight', 'patch_embed.proj.bias', 'cls_token', 'pos_embed', 'norm.weight', 'norm.bias',
                'decoder_embed.weight', 'decoder_embed.bias', 'mask_token', 'decoder_pos_embed',
                'decoder_norm.weight', 'decoder_norm.bias', 'decoder_pred.weight', 'decoder_pred.bias'}
    for i in range(7):
        for s in ('norm1.weight', 'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight', 'norm2.bias',
                  'mlp.fc1.weight', 'mlp.fc2.bias'):
            expected.add(f'blocks.{i}.{s}')
    for i in range(2):
        expected |= {f'decoder_blocks.{i}.attn.qkv.weight', f'decoder_blocks.{i}.mlp.fc2.weight'}
    assert expected <= keys
    assert all(k.startswith(('blocks.', 'decoder_blocks.')) or k in expected for k in keys)


def test_loading_official_format_other_size_and_mismatch():
    src = M.build_mae(small_cfg())
    official = {'model': {('module.' + k): v for k, v in src.state_dict().items()}}
    # same architecture at 64x64: positions are regenerated, weights copied
    dst = M.build_mae(M.make_config('vit_lite', img_size=64, patch_size=8))
    M.load_weights(dst, official)
    assert torch.equal(dst.blocks[3].mlp.fc1.weight, src.blocks[3].mlp.fc1.weight)
    assert torch.equal(dst.pos_embed[0], M.get_2d_sincos_pos_embed(256, 8))
    # classifier loads the encoder part
    clf = M.build_classifier(small_cfg(), num_classes=10)
    enc = M.encoder_state_dict(official)
    enc.update({k: v for k, v in clf.state_dict().items() if k.startswith('head.')})
    M.load_weights(clf, enc)
    assert torch.equal(clf.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    # another width: a clear message naming the keys
    other = M.build_mae(small_cfg(embed_dim=128))
    with pytest.raises(ValueError, match=r'blocks\.0\.attn\.qkv\.weight.*\(768, 256\).*\(384, 128\)'):
        M.load_weights(other, official)


def test_unmasked_encoder_features_and_classifier():
    cfg = small_cfg()
    clf = M.build_classifier(cfg, num_classes=7)
    x = torch.randn(3, 3, 32, 32)
    assert clf(x).shape == (3, 7)
    assert clf.forward_features(x, pool='cls').shape == (3, 256)
    assert clf.forward_features(x, pool='mean').shape == (3, 256)
    assert not torch.allclose(clf.forward_features(x, pool='cls'), clf.forward_features(x, pool='mean'))


@pytest.mark.parametrize('kw, msg', [
    (dict(img_size=30, patch_size=4), 'img_size 30 is not divisible by patch_size 4'),
    (dict(embed_dim=250), 'embed_dim 250 is not divisible by num_heads 4'),
    (dict(embed_dim=18, num_heads=6), "embed_dim 18 is not divisible by 4"),
    (dict(decoder_embed_dim=130, decoder_num_heads=5), 'decoder_embed_dim 130 is not divisible by 4'),
    (dict(masking='grid'), "masking must be 'random' or 'block'"),
    (dict(mask_ratio=1.0), r"mask ratio \(--mask\) must be in \(0, 1\), got 1.0"),
    (dict(mask_ratio=0.0), r"mask ratio \(--mask\) must be in \(0, 1\), got 0.0"),
])
def test_bad_configs_fail_at_construction(kw, msg):
    with pytest.raises(ValueError, match=msg):
        M.make_config('vit_lite', **kw)


def test_bad_mask_ratio_and_unknown_preset(mae):
    for r in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"mask ratio \(--mask\) must be in \(0, 1\)"):
            mae(torch.randn(1, 3, 32, 32), mask_ratio=r)
    with pytest.raises(ValueError, match='unknown model preset'):
        M.make_config('vit_huge_typo')


def test_gradients_flow_to_encoder_and_decoder(mae):
    loss, _, _ = mae(torch.randn(2, 3, 32, 32), 0.75)
    loss.backward()
    assert mae.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert mae.decoder_blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert mae.mask_token.grad.abs().sum() > 0


def test_pixel_mask_covers_exactly_the_masked_patches(mae):
    mask = (torch.rand(2, 16) > 0.5).float()
    pix = mae.pixel_mask(mask)
    assert pix.shape == (2, 1, 32, 32)
    patches = mae.patchify(pix.expand(-1, 3, -1, -1))   # (2, 16, 192): every pixel of a patch equals its mask bit
    assert torch.equal(patches, mask[:, :, None].expand(-1, -1, 192))
