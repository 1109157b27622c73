"""SMAE: the perceptual objective, the frozen critic, calibration of c, and the critic's error messages."""
import dataclasses
import json
import os
import shutil

import pytest
import torch

import common
import data
import model as M
import pretrain
from conftest import keep_first_checkpoint


def critic_checkpoint(path, num_classes=5, arch='squeezenet', net=None):
    """A checkpoint in the format finetune.py --arch squeezenet writes."""
    torch.manual_seed(0)
    net = net or M.build_squeezenet(num_classes)
    model_config = ({'num_classes': num_classes} if arch == 'squeezenet' else  # a ViT classifier stores all its sizes
                    dataclasses.asdict(M.make_config('vit_lite', num_classes=num_classes)))
    common.save_atomic({'kind': 'finetune', 'model': net.state_dict(), 'model_config': model_config,
                        'config': {'arch': arch, 'model': 'vit_lite'}, 'step': 1}, str(path))
    return str(path)


def small_mae(**kw):
    torch.manual_seed(0)
    return M.build_mae(M.make_config('vit_lite', img_size=32, patch_size=8, **kw))


def squeezenet_critic():
    torch.manual_seed(1)
    return M.build_squeezenet(5).features[:5]


def test_alpha_zero_is_exactly_mae_value_and_gradients():
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    mae = small_mae()
    ref_loss, _, _ = mae(imgs, 0.75, noise)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in mae.named_parameters()}
    mae.zero_grad()
    for critic in (None, squeezenet_critic()):
        obj = M.MAEObjective(mae, critic, alpha=0.0)
        loss = obj(imgs, 0.75, noise)
        assert torch.equal(loss, ref_loss)
        loss.backward()
        for n, p in mae.named_parameters():
            assert torch.equal(p.grad, ref_grads[n]), n
        mae.zero_grad()


def test_alpha_mixes_pixel_on_all_patches_and_perceptual():
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    mae = small_mae(loss_on_all=True)
    obj = M.MAEObjective(mae, squeezenet_critic(), alpha=0.5)
    obj.c.fill_(3.0)
    pixel, percep, pred, mask = obj.loss_terms(imgs, 0.75, noise)
    assert torch.allclose(pixel, ((pred - mae.patchify(imgs)) ** 2).mean())  # all patches
    recon = mae.unpatchify(pred)
    with torch.no_grad():
        direct = torch.nn.functional.mse_loss(torch.sigmoid(obj.critic(recon)), torch.sigmoid(obj.critic(imgs)))
    assert torch.allclose(percep, direct)
    assert torch.allclose(obj(imgs, 0.75, noise), 0.5 * pixel + 0.5 * 3.0 * percep)
    only = M.MAEObjective(mae, obj.critic, alpha=1.0)
    only.c.fill_(3.0)
    assert torch.allclose(only(imgs, 0.75, noise), 3.0 * percep)


def test_critic_gets_no_gradient_and_never_changes():
    mae = small_mae(loss_on_all=True)
    critic = squeezenet_critic()
    before = {k: v.clone() for k, v in critic.state_dict().items()}
    obj = M.MAEObjective(mae, critic, alpha=1.0)
    obj.train()
    assert not critic.training, "the critic must stay in eval mode"
    opt = torch.optim.AdamW(common.param_groups(obj, 0.15), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(3):
        obj(torch.randn(4, 3, 32, 32), 0.75).backward()
        assert all(p.grad is None for p in critic.parameters())
        assert mae.decoder_pred.weight.grad.abs().sum() > 0, "the perceptual term must reach the reconstruction"
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(before[k], v) for k, v in critic.state_dict().items())


def test_uncertainty_weighting_learns_log_variances():
    obj = M.MAEObjective(small_mae(loss_on_all=True), squeezenet_critic(), alpha=0.5, weighting='uncertainty')
    obj(torch.randn(2, 3, 32, 32), 0.75).backward()
    assert obj.log_vars.grad is not None and obj.log_vars.grad.abs().sum() > 0


def test_norm_pix_reconstruction_is_unnormalised_for_the_critic():
    imgs = torch.randn(2, 3, 32, 32)
    mae = small_mae(norm_pix_loss=True, loss_on_all=True)
    target = mae.pixel_target(imgs)  # a perfect per-patch-normalised prediction
    recon, _ = mae.reconstruct(imgs, target, torch.ones(2, 16))
    assert torch.allclose(recon, imgs, atol=1e-4)


def test_terms_equal_right_after_calibration(tmp_path):
    ns, _ = common.configure(vars(pretrain),
                                ['--alpha', '0.5', '--critic', critic_checkpoint(tmp_path / 'c.pt'), '--calib_batches', '1',
                                 '--img_size', '32', '--patch_size', '8', '--out_dir', str(tmp_path / 'o'), '--device', 'cpu'])
    run = common.Run(ns, 'test', lock=False)
    mae = M.build_mae(M.make_config('vit_lite', img_size=32, patch_size=8, loss_on_all=True))
    obj = M.MAEObjective(mae, pretrain.load_critic(ns), ns.alpha, ns.critic_sigmoid, ns.weighting)
    split = data.load_split('demo', 'train')
    loader = data.DeviceLoader(split, batch_size=32, device=torch.device('cpu'), img_size=32)
    pretrain.calibrate(obj, loader, ns, run)
    # the same first batch and masks as the calibration saw (drawn for a global batch of --batch_size)
    x = next(loader.epoch(0))[1][0][0]
    gen = torch.Generator().manual_seed(data.seed_for(ns.seed, 2, 0))
    noise = mae.masking_noise(ns.batch_size, 0.75, generator=gen)[loader.rows(0)]
    pixel, percep, _, _ = obj.loss_terms(x, 0.75, noise)
    assert float(obj.c) > 0
    assert torch.allclose(pixel, obj.c * percep, rtol=1e-4)


@pytest.mark.parametrize('weighting', ['fixed', 'uncertainty'])
def test_smae_run_calibrates_once_and_resume_keeps_c(weighting, tiny, tmp_path, monkeypatch):
    """A resumed SMAE run keeps c (no recalibration) and, with learned weighting, its log-variances: it ends with
    the uninterrupted run's weights."""
    critic = critic_checkpoint(tmp_path / 'critic.pt')
    args = ('--epochs', 2, '--ckpt_every', 1, '--alpha', 0.5, '--critic', critic, '--masking', 'block', '--mask', 0.5,
            '--weighting', weighting)
    with keep_first_checkpoint(tmp_path / 'epoch1.pt') as epoch1:
        assert pretrain.main(tiny(*args)) == 0
    log = [json.loads(l) for l in open(tmp_path / 'run' / 'log.jsonl')]
    calib = [r for r in log if r['event'] == 'calibration']
    assert len(calib) == 1 and calib[0]['c'] > 0
    c1 = torch.load(epoch1, weights_only=True)['objective']['c']
    assert c1 == pytest.approx(calib[0]['c'])

    def no_recalibration(*a, **k):
        raise AssertionError("resume recalibrated c")
    monkeypatch.setattr(pretrain, 'calibrate', no_recalibration)
    os.makedirs(tmp_path / 'resumed')
    shutil.copy(epoch1, tmp_path / 'resumed' / 'ckpt.pt')
    assert pretrain.main(tiny('--resume', 'true', out='resumed')) == 0
    final = torch.load(tmp_path / 'resumed' / 'ckpt.pt', weights_only=True)
    assert final['objective']['c'] == c1
    full = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)
    assert all(torch.equal(full['model'][k], final['model'][k]) for k in full['model']), "resumed SMAE run differs"
    if weighting == 'uncertainty':  # learned, so moved from their start at 0, and carried through the resume
        assert full['objective']['log_vars'].abs().min() > 0
        assert torch.equal(full['objective']['log_vars'], final['objective']['log_vars'])


# --- errors: found before training starts, with the command that trains a critic ---------------------------

def test_alpha_without_critic_says_how_to_train_one(tiny):
    with pytest.raises(common.UserError, match=r'--alpha 0.5 needs a perceptual critic.*python finetune.py --arch squeezenet'):
        pretrain.main(tiny('--alpha', 0.5))


def test_critic_of_wrong_architecture_or_shape(tiny, tmp_path):
    vit = critic_checkpoint(tmp_path / 'vit.pt', arch='vit')
    with pytest.raises(common.UserError, match=r'holds a vit classifier, not a SqueezeNet critic.*finetune.py'):
        pretrain.main(tiny('--alpha', 0.5, '--critic', vit))
    net = M.build_squeezenet(5)
    net.features[0] = torch.nn.Conv2d(3, 32, kernel_size=3, stride=2)  # not SqueezeNet 1.1's first layer
    odd = critic_checkpoint(tmp_path / 'odd.pt', net=net)
    with pytest.raises(common.UserError, match=r'features\.0\.weight.*finetune.py'):
        pretrain.main(tiny('--alpha', 0.5, '--critic', odd))
    with pytest.raises(common.UserError, match=r'does not exist'):
        pretrain.main(tiny('--alpha', 0.5, '--critic', str(tmp_path / 'nope.pt')))
    with pytest.raises(common.UserError, match=r'--alpha must be a number in \[0, 1\]'):
        pretrain.main(tiny('--alpha', 1.5, '--critic', vit))


def test_alexnet_critic_without_its_weights_says_so(tiny, monkeypatch):
    import urllib.error
    import torchvision

    def offline(*a, **k):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(torchvision.models, 'alexnet', offline)
    with pytest.raises(common.UserError, match=r'ImageNet AlexNet weights could not be fetched.*alexnet-owt-7be5be79.pth'):
        pretrain.main(tiny('--alpha', 0.5, '--critic', 'alexnet'))
