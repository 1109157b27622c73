"""finetune.py: runs from a pre-training checkpoint, from scratch and as the SqueezeNet critic; the checkpoint's
weights are the ones trained; layer-wise lr decay; exact resume; SIGTERM; one-line errors naming the file."""
import json
import os
import shutil
import signal
from types import SimpleNamespace

import pytest
import torch

import common
import finetune
import model as M
import pretrain
from conftest import keep_first_checkpoint, script_argv, signal_as_the_loop_starts
from test_reliability import one_line_error, run_cli


@pytest.fixture
def ft(tiny):
    """finetune argv: TINY (what finetune knows of it) on 64 images (2 steps an epoch) plus extras."""
    def make(*extra, out='run'):
        return script_argv(finetune, tiny('--subset', 64, *extra, out=out))
    return make


def records(out, event):
    return [r for r in map(json.loads, open(os.path.join(out, 'log.jsonl'))) if r['event'] == event]


def results(out):
    with open(os.path.join(out, 'results.json')) as f:
        return json.load(f)


def perturbed_copy(path, dst):
    ck = torch.load(path, weights_only=True)
    ck['model']['blocks.0.attn.qkv.weight'] += 0.5
    torch.save(ck, dst)
    return str(dst)


# --- end to end --------------------------------------------------------------------------------------

def test_from_pretrain_ckpt_trains_exactly_the_checkpoints_encoder(ft, pre, tmp_path):
    # lr 1e-30: an update moves a weight by about 1e-30 at most, below float32's resolution for any weight that is not
    # exactly 0 (a key bias is: its gradient is 0 in exact arithmetic, and rounding leaves a tiny one), so the final
    # weights are the loaded ones to within 1e-25
    assert finetune.main(ft('--ckpt', pre, '--epochs', 1, '--lr', 1e-30)) == 0
    out = tmp_path / 'run'
    res = results(out)
    assert {'top1', 'top5', 'epoch', 'config', 'best_top1'} <= set(res) and res['epoch'] == 1
    assert 0 <= res['top1'] <= res['top5'] <= 100 and res['config']['ckpt'] == pre and res['num_classes'] == 8
    ck = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ck['kind'] == 'finetune' and ck['step'] == 2 and ck['config']['arch'] == 'vit'
    assert ck['model_config']['num_classes'] == 8 and ck['model_config']['patch_size'] == 8
    assert {'optimizer', 'scaler', 'rng', 'history'} <= set(ck)
    enc = M.encoder_state_dict(torch.load(pre, weights_only=True)['model'])
    assert set(ck['model']) - set(enc) == {'head.weight', 'head.bias'}
    for k, v in enc.items():
        assert (ck['model'][k] - v).abs().max() < 1e-25, f"{k} is not the pre-trained checkpoint's"
    assert len(records(out, 'eval')) == 1 and not (out / '.lock').exists()

    # a perturbed encoder weight changes the very first loss (measured before any update)
    bad = perturbed_copy(pre, tmp_path / 'perturbed.pt')
    assert finetune.main(ft('--ckpt', bad, '--epochs', 1, '--lr', 1e-30, out='perturbed')) == 0
    first = [records(tmp_path / d, 'train')[0]['loss'] for d in ('run', 'perturbed')]
    assert first[0] != first[1], first


def test_from_scratch_and_the_squeezenet_critic(ft, tmp_path):
    assert finetune.main(ft('--epochs', 1)) == 0
    res = results(tmp_path / 'run')
    assert res['init'].startswith('random') and res['model'] == 'vit_lite' and 0 <= res['top1'] <= 100

    assert finetune.main(ft('--arch', 'squeezenet', '--epochs', 1, out='critic')) == 0
    res = results(tmp_path / 'critic')
    assert res['arch'] == 'squeezenet' and 0 <= res['top1'] <= res['top5'] <= 100
    # pretrain.py's SMAE loads it as its perceptual critic
    path = str(tmp_path / 'critic' / 'ckpt.pt')
    ck = torch.load(path, weights_only=True)
    assert ck['kind'] == 'finetune' and ck['config']['arch'] == 'squeezenet' and ck['model_config']['num_classes'] == 8
    cfg = SimpleNamespace(alpha=0.5, weighting='fixed', critic=path, critic_sigmoid=True)
    critic = pretrain.load_critic(cfg)
    assert torch.equal(critic[0].weight, ck['model']['features.0.weight'])


def test_layer_decay_scales():
    net = M.build_classifier(M.make_config('vit_lite'), 10)  # depth 7
    cfg = SimpleNamespace(arch='vit', layer_decay=0.75, weight_decay=0.05)
    groups = finetune.optimizer_groups(net, cfg)
    scale = {id(p): g['lr_scale'] for g in groups for p in g['params']}
    decay = {id(p): g['weight_decay'] for g in groups for p in g['params']}
    named = dict(net.named_parameters())
    expect = {'patch_embed.proj.weight': 0.75 ** 8, 'cls_token': 0.75 ** 8, 'blocks.0.attn.qkv.weight': 0.75 ** 7,
              'blocks.0.norm1.bias': 0.75 ** 7, 'blocks.6.mlp.fc2.weight': 0.75, 'norm.weight': 1.0,
              'head.weight': 1.0, 'head.bias': 1.0}
    for name, s in expect.items():
        assert scale[id(named[name])] == pytest.approx(s), name
    assert decay[id(named['head.bias'])] == 0.0 and decay[id(named['head.weight'])] == 0.05
    assert len(scale) == len(named)  # every parameter is in exactly one group
    opt = torch.optim.AdamW(groups, lr=1.0)
    for group in opt.param_groups:  # what the loop does each step
        group['lr'] = 2.0 * group['lr_scale']
    assert sorted({g['lr'] for g in opt.param_groups}) == pytest.approx(sorted({2.0 * 0.75 ** k for k in range(9)}))
    # off: one scale
    assert {g['lr_scale'] for g in finetune.optimizer_groups(net, SimpleNamespace(arch='vit', layer_decay=1.0,
                                                                                   weight_decay=0.05))} == {1.0}


# --- resume and signals ------------------------------------------------------------------------------

def test_resume_is_bit_identical(ft, pre, tmp_path):
    # augmentation, mixup/cutmix and drop path on: every random stream must continue exactly
    extra = ('--ckpt', pre, '--ckpt_every', 1, '--eval_every', 10, '--drop_path', 0.1, '--mixup', 0.8,
             '--cutmix', 1.0, '--label_smoothing', 0.1, '--layer_decay', 0.75)
    with keep_first_checkpoint(tmp_path / 'epoch1.pt') as epoch1:
        assert finetune.main(ft('--epochs', 3, *extra)) == 0
    full = [(r['step'], r['loss']) for r in records(tmp_path / 'run', 'train')]

    os.makedirs(tmp_path / 'resumed')
    shutil.copy(epoch1, tmp_path / 'resumed' / 'ckpt.pt')
    assert finetune.main(ft('--resume', 'true', out='resumed')) == 0
    resumed = [(r['step'], r['loss']) for r in records(tmp_path / 'resumed', 'train')]
    assert resumed[0][0] == 3 and resumed == full[2:]
    a = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)['model']
    b = torch.load(tmp_path / 'resumed' / 'ckpt.pt', weights_only=True)['model']
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert results(tmp_path / 'run')['top1'] == results(tmp_path / 'resumed')['top1']


def test_sigterm_saves_and_exits_preempted(ft, tmp_path, monkeypatch):
    signal_as_the_loop_starts(monkeypatch, signal.SIGTERM)  # as if SIGTERM arrives during the first step
    assert finetune.main(ft('--epochs', 2)) == 128 + signal.SIGTERM
    ck = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)
    assert ck['step'] == 1 and not (tmp_path / 'run' / 'results.json').exists()


# --- errors --------------------------------------------------------------------------------------------

def test_errors_name_the_file(ft, pre, tmp_path):
    def fails(match, *extra):
        out = f'err{len(os.listdir(tmp_path))}'
        with pytest.raises(common.UserError, match=match):
            finetune.main(ft('--epochs', 1, *extra, out=out))
        assert not os.path.exists(tmp_path / out / 'ckpt.pt') and not os.path.exists(tmp_path / out / '.lock')

    missing = str(tmp_path / 'nope.pt')
    fails(f'checkpoint {missing} does not exist', '--ckpt', missing)
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(os.urandom(256))
    fails(f'{garbage} is not a readable checkpoint', '--ckpt', str(garbage))
    other = tmp_path / 'finetuned.pt'
    torch.save({'kind': 'finetune', 'model': {}, 'config': {}}, other)
    fails(f'{other} is a finetune.py checkpoint, but a pretrain.py or dino.py checkpoint is expected', '--ckpt', str(other))
    fails(f'--arch squeezenet .*no MAE pre-training.*--ckpt {pre}', '--arch', 'squeezenet', '--ckpt', pre)
    fails(f'{pre} holds a vit_lite encoder but --model is vit_small', '--ckpt', pre, '--model', 'vit_small')
    fails("--arch must be one of vit, squeezenet, got 'resnet'", '--arch', 'resnet')
    # an out_dir holding another run's checkpoint is refused
    os.makedirs(tmp_path / 'busy')
    shutil.copy(pre, tmp_path / 'busy' / 'ckpt.pt')
    with pytest.raises(common.UserError, match='already holds a pretrain.py run'):
        finetune.main(ft('--epochs', 1, out='busy'))
    with pytest.raises(common.UserError, match='holds a pretrain.py run, not a finetune.py run'):
        finetune.main(ft('--epochs', 1, '--resume', 'true', out='busy'))
    assert (tmp_path / 'busy' / 'ckpt.pt').read_bytes() == open(pre, 'rb').read(), "the other run's checkpoint changed"


def test_defaults_are_the_papers_recipe():
    d = common.defaults(vars(finetune))
    assert (d['dataset'], d['epochs'], d['warmup_epochs'], d['batch_size'], d['augment']) == ('tin', 100, 5, 128, True)
    assert (d['weight_decay'], d['beta1'], d['beta2'], d['layer_decay'], d['arch'], d['ckpt']) == (0.05, 0.9, 0.999, 1.0, 'vit', '')
    assert d['lr'] == 0.0
    base = lambda **kw: finetune.base_lr(SimpleNamespace(**{**dict(lr=0.0, dataset='tin'), **kw}))
    assert (base(), base(dataset='cub'), base(lr=2e-3, dataset='cub')) == (1e-3, 5e-4, 2e-3)


def test_defaults_follow_the_checkpoint_and_transfer_is_one_flag_away(pre, tmp_path, capsys, monkeypatch):
    """Given only --ckpt, fine-tuning takes the checkpoint's dataset and image size and says so; --dataset chooses
    another (the study's transfer), and a dataset not on disk is one line with no out_dir left behind."""
    out = tmp_path / 'ft'
    assert finetune.main(['--ckpt', pre, '--out_dir', str(out), '--epochs', 1, '--subset', 64, '--batch_size', 32,
                          '--warmup_epochs', 0]) == 0
    assert 'from the checkpoint: dataset demo, img_size 32' in capsys.readouterr().out
    res = results(out)
    assert (res['dataset'], res['img_size'], res['num_classes'], res['val_images']) == ('demo', 32, 8, 384)
    code, err = run_cli(finetune.main, ['--ckpt', pre, '--dataset', 'cub', '--data_dir', tmp_path / 'nodata',
                                        '--out_dir', tmp_path / 'ft_cub'], capsys, monkeypatch, script='finetune.py')
    one_line_error(code, err, 'cub: dataset folder', 'not found', '--download true')
    assert code == 2 and not os.path.exists(tmp_path / 'ft_cub')
