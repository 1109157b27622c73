"""pretrain.py: files it writes, learning, config overrides and resume (torchrun: tests/test_ddp.py)."""
import json
import os
import shutil

import pytest
import torch

import common
import model as M
import pretrain
from conftest import keep_first_checkpoint, script_argv, signal_as_the_loop_starts


def records(out, event):
    return [r for r in map(json.loads, open(os.path.join(out, 'log.jsonl'))) if r['event'] == event]


def test_few_steps_write_checkpoint_log_and_png(tiny, tmp_path):
    assert pretrain.main(tiny('--epochs', 1, '--picture_every', 1)) == 0
    out = tmp_path / 'run'
    ck = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ck['kind'] == 'pretrain' and ck['step'] == 8 and ck['config']['mask'] == 0.75
    assert {'model', 'optimizer', 'scaler', 'rng', 'model_config'} <= set(ck)
    assert len(records(out, 'train')) == 8 and records(out, 'start')[0]['config']['dataset'] == 'demo'
    assert (out / 'recon_ep0001.png').stat().st_size > 1000
    assert not (out / '.lock').exists(), "the out_dir lock outlived the run"
    summary = json.load(open(out / 'results.json'))
    assert summary['steps'] == 8 and summary['val_loss'] == ck['val_loss'] and summary['final_loss'] > 0
    # the encoder weights load into a classifier as they are (what finetune.py and probe.py do)
    clf = M.build_classifier(M.ViTConfig(**ck['model_config']), num_classes=5)
    sd = M.encoder_state_dict(ck['model'])
    sd.update({k: v for k, v in clf.state_dict().items() if k.startswith('head.')})
    M.load_weights(clf, sd)
    assert torch.equal(clf.blocks[0].attn.qkv.weight, ck['model']['blocks.0.attn.qkv.weight'])


def test_loss_falls_on_demo(tiny, tmp_path):
    assert pretrain.main(tiny('--epochs', 4, '--lr', 2e-3, '--ckpt_every', 100, '--picture_every', 100)) == 0
    losses = [r['loss'] for r in records(tmp_path / 'run', 'train')]
    assert len(losses) == 32
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4, losses


def test_block_masking_and_norm_pix_run(tiny, tmp_path):
    assert pretrain.main(tiny('--epochs', 1, '--masking', 'block', '--mask', 0.5, '--norm_pix_loss', 'true')) == 0
    ck = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)
    assert ck['model_config']['masking'] == 'block' and ck['model_config']['norm_pix_loss'] is True


# --- config overrides -----------------------------------------------------------------------------------

DEFAULTS = dict(mask=0.75, epochs=400, compile=True, model='vit_lite', masking='random')


def test_overrides_both_spellings_and_types():
    cfg, given = common.configure(DEFAULTS, ['--mask', '0.5', '--epochs=3', '--compile', 'false', '--model=vit_tiny'])
    assert (cfg.mask, cfg.epochs, cfg.compile, cfg.model) == (0.5, 3, False, 'vit_tiny')
    assert given == {'mask', 'epochs', 'compile', 'model'}
    assert cfg.masking == 'random'
    cfg, _ = common.configure(dict(lr=5e-4), ['--lr', '1'])  # an int where a float is expected is fine
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)


@pytest.mark.parametrize('argv, msg', [
    (['--epochs', '2.5'], r'--epochs expects an integer \(default 400\), got .2\.5.'),
    (['--mask', 'lots'], r'--mask expects a number'),
    (['--compile', 'maybe'], r'--compile expects true or false'),
    (['--maks', '0.5'], r'unknown config name --maks: did you mean --mask( or --masking)?\?'),
    (['--epochs'], r'--epochs needs a value'),
    (['epochs=3'], r'unexpected argument'),
])
def test_override_errors(argv, msg):
    with pytest.raises(common.UserError, match=msg):
        common.configure(DEFAULTS, argv)


def test_every_documented_name_exists():
    names = common.defaults(vars(pretrain))
    for n in ('dataset', 'data_dir', 'out_dir', 'model', 'epochs', 'batch_size', 'mask', 'masking',
              'norm_pix_loss', 'seed', 'device', 'dtype', 'compile', 'resume'):
        assert n in names
    # the study's recipe (its Table 6) is the default
    assert (names['model'], names['mask'], names['masking'], names['norm_pix_loss']) == ('vit_lite', 0.75, 'random', False)
    assert (names['lr'], names['batch_size'], names['weight_decay'], names['beta1'], names['beta2']) == (5e-4, 128, 0.15, 0.9, 0.95)
    assert (names['epochs'], names['warmup_epochs'], names['augment'], names['dataset']) == (400, 20, False, 'tin')


def test_lr_schedule():
    assert common.get_lr(0, 100, 10, 1.0) == 0.0
    assert common.get_lr(5, 100, 10, 1.0) == 0.5
    assert common.get_lr(10, 100, 10, 1.0) == 1.0
    assert abs(common.get_lr(55, 100, 10, 1.0) - 0.5) < 1e-9
    assert common.get_lr(100, 100, 10, 1.0, min_lr=0.1) == pytest.approx(0.1)


# --- resume ----------------------------------------------------------------------------------------

def test_resume_continues_the_same_loss_sequence(tiny, tmp_path):
    with keep_first_checkpoint(tmp_path / 'epoch1.pt') as epoch1:
        assert pretrain.main(tiny('--epochs', 3, '--ckpt_every', 1)) == 0
    full = [(r['step'], r['loss']) for r in records(tmp_path / 'run', 'train')]

    os.makedirs(tmp_path / 'resumed')
    shutil.copy(epoch1, tmp_path / 'resumed' / 'ckpt.pt')
    assert pretrain.main(tiny('--resume', 'true', out='resumed')) == 0
    resumed = [(r['step'], r['loss']) for r in records(tmp_path / 'resumed', 'train')]
    assert resumed[0][0] == 9 and resumed == full[8:]
    a = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)['model']
    b = torch.load(tmp_path / 'resumed' / 'ckpt.pt', weights_only=True)['model']
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


def test_benchmark_mode_times_the_loop_and_writes_nothing(tiny, tmp_path):
    """--bench_steps returns the figures of the real loop; a warm-up of 0 steps times from the first step."""
    for warmup in (0, 1):
        result = pretrain.main(tiny('--bench_steps', 2, '--bench_warmup', warmup))
        assert result['images_per_s'] > 0 and result['step_ms'] > 0 and result['batch_size'] == 32
    assert not (tmp_path / 'run').exists()


def test_a_default_warmup_longer_than_the_run_is_clipped_with_a_line(tmp_path, capsys):
    argv = ['--dataset', 'demo', '--img_size', '32', '--patch_size', '8', '--subset', '64', '--batch_size', '32',
            '--epochs', '2', '--val_images', '32', '--out_dir', str(tmp_path / 'run')]  # warmup_epochs: the recipe's 20
    assert pretrain.main(argv) == 0
    out = capsys.readouterr().out
    assert " warmup_epochs=0.5 (1 step, 25% of the run: the recipe's 20 warm-up epochs do not fit in 2 epochs) " in out
    lrs = [r['lr'] for r in records(tmp_path / 'run', 'train')]
    assert max(lrs) > 0.9 * 5e-4 * 32 / 128, "the lr never reached its peak"


def test_benchmark_mode_stops_on_a_signal(tiny, monkeypatch):
    import signal
    signal_as_the_loop_starts(monkeypatch, signal.SIGTERM)  # a timeout or a scheduler, as the benchmark starts
    assert pretrain.main(tiny('--bench_steps', 1000, '--bench_warmup', 1)) == 128 + signal.SIGTERM


@pytest.mark.parametrize('script', ['pretrain', 'finetune'])
def test_grad_clip_bounds_the_gradient_the_optimizer_step_uses(script, tiny, tmp_path):
    """--grad_clip clips the gradient norm before the optimizer step. One AdamW step moves a parameter without weight
    decay by lr * g / (|g| + 1e-8): about the lr when unclipped; clipped to a norm of 1e-12, under 1e-4 of it."""
    import finetune
    module = {'pretrain': pretrain, 'finetune': finetune}[script]
    biases = {}
    for name, lr, clip in (('start', 1e-30, 0), ('free', 1e-3, 0), ('clipped', 1e-3, 1e-12)):  # one step each
        argv = tiny('--subset', 32, '--epochs', 1, '--knn_bank', 0, '--lr', lr, '--grad_clip', clip, out=name)
        assert module.main(script_argv(module, argv)) == 0
        sd = torch.load(tmp_path / name / 'ckpt.pt', weights_only=True)['model']
        biases[name] = torch.cat([v.flatten() for k, v in sd.items() if k.endswith('.bias')])
    step_lr = 1e-3 * 32 / 128
    assert (biases['free'] - biases['start']).abs().max() > 0.5 * step_lr
    assert (biases['clipped'] - biases['start']).abs().max() < 1e-4 * step_lr
