"""probe.py: end to end on demo data, the frozen encoder is the checkpoint's and stays unchanged, the head
learns, out_dir protection and one-line errors."""
import json
import os
import shutil

import pytest
import torch

import common
import data
import model as M
import probe
from conftest import script_argv
from test_reliability import one_line_error, run_cli


@pytest.fixture
def pr(tiny, pre):
    """probe argv: TINY (what probe knows of it: 256 train images, 32 px) with the tiny checkpoint, plus extras."""
    def make(*extra, out='run'):
        return script_argv(probe, tiny('--ckpt', pre, *extra, out=out))
    return make


def test_probe_end_to_end_beats_chance(pr, tmp_path):
    assert probe.main(pr('--epochs', 30, '--log_every', 10)) == 0
    out = tmp_path / 'run'
    res = json.load(open(out / 'results.json'))
    assert {'top1', 'top5', 'best_top1', 'epoch', 'config', 'history'} <= set(res) and len(res['history']) == 30
    assert res['num_classes'] == 8 and res['train_images'] == 256 and res['val_images'] == 384
    assert res['top1'] > 2 * 100 / 8, res['top1']   # 8 demo classes: chance is 12.5%
    ck = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ck['kind'] == 'probe' and ck['model_config']['patch_size'] == 8 and ck['num_classes'] == 8
    assert set(ck['model']) == {'0.running_mean', '0.running_var', '0.num_batches_tracked', '1.weight', '1.bias'}
    head = probe.make_head(256, 8)
    head.load_state_dict(ck['model'])
    assert head[0].affine is False and head[0].eps == 1e-6
    lines = [json.loads(r) for r in open(out / 'log.jsonl')]
    assert [r['epoch'] for r in lines if r['event'] == 'probe'] == list(range(1, 31))
    assert not (out / '.lock').exists()
    # the out_dir now holds a finished probe run: refused without --resume, and with --resume unless it is extended
    before = (out / 'results.json').read_bytes()
    with pytest.raises(common.UserError, match='already holds a finished run'):
        probe.main(pr('--epochs', 2))
    with pytest.raises(common.UserError, match='is a finished run of 30 epochs.*--epochs N with N > 30'):
        probe.main(pr('--resume', 'true'))
    assert (out / 'results.json').read_bytes() == before, "a finished run was rewritten"
    assert probe.main(pr('--epochs', 32, '--subset', 32, '--resume', 'true')) == 0  # extended: rerun with more epochs
    res = json.load(open(out / 'results.json'))
    assert res['epoch'] == 32 and res['train_images'] == 32


def test_encoder_is_the_checkpoints_and_stays_frozen(pre, tmp_path):
    encoder, _ = common.load_encoder(pre, num_classes=0)
    enc_sd = M.encoder_state_dict(torch.load(pre, weights_only=True)['model'])
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    assert set(before) == set(enc_sd) and all(torch.equal(before[k], enc_sd[k]) for k in before)

    split = data.load_split('demo', 'train', str(tmp_path / 'data'))
    imgs, labels = split.images[::12], split.labels[::12]     # 128 images, all 8 classes
    cpu = torch.device('cpu')
    f, y = probe.extract_features(encoder, imgs, labels, cpu, batch_size=50)
    assert f.shape == (128, 256) and f.dtype == torch.float32 and torch.equal(y, labels) and not encoder.training
    f2, _ = probe.extract_features(encoder, imgs, labels, cpu, batch_size=128)
    assert torch.allclose(f, f2, atol=1e-5)                  # batching does not matter
    fm, _ = probe.extract_features(encoder, imgs, None, cpu, pool='mean')
    assert fm.shape == f.shape and not torch.allclose(fm, f)
    out = probe.train_linear_head(f, y, f, y, 8, epochs=3, warmup_epochs=1, batch_size=32)
    assert len(out['history']) == 3 and not out['head'].training
    after = encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the probe changed the encoder"
    assert all(p.grad is None for p in encoder.parameters())

    # a perturbed checkpoint weight changes the features
    ck = torch.load(pre, weights_only=True)
    ck['model']['blocks.0.attn.qkv.weight'] += 0.5
    torch.save(ck, tmp_path / 'perturbed.pt')
    other, _ = common.load_encoder(str(tmp_path / 'perturbed.pt'), num_classes=0)
    fp, _ = probe.extract_features(other, imgs, labels, cpu)
    assert not torch.allclose(fp, f, atol=1e-3)


def test_train_linear_head_is_deterministic_and_learns():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(400) % 4
    x = centres[y] + torch.randn(400, 16, generator=g)
    runs = [probe.train_linear_head(x[:300], y[:300], x[300:], y[300:], 4, epochs=5, warmup_epochs=1, batch_size=64,
                                    seed=1) for _ in range(2)]
    assert runs[0]['history'] == runs[1]['history'] and runs[0]['top1'] > 90
    logged = []
    probe.train_linear_head(x, y, x, y, 4, epochs=2, warmup_epochs=0, log=lambda r, line: logged.append((r, line)))
    assert [r['epoch'] for r, _ in logged] == [1, 2] and 'top-1' in logged[0][1]


def test_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5], [0.3, 0.4, 0.2]])
    labels = torch.tensor([1, 1, 2, 0])
    top1, top2, top5 = probe.accuracy(logits, labels, topk=(1, 2, 5))  # top-5 is capped at 3 classes
    assert (top1, top2, top5) == (50.0, 75.0, 100.0)
    assert probe.accuracy(logits, labels) == [50.0, 100.0]


def test_out_dir_of_another_run_is_refused(pr, pre, tmp_path):
    os.makedirs(tmp_path / 'busy')
    shutil.copy(pre, tmp_path / 'busy' / 'ckpt.pt')
    with pytest.raises(common.UserError, match='already holds a pretrain.py run'):
        probe.main(pr('--epochs', 1, out='busy'))
    with pytest.raises(common.UserError, match='holds a pretrain.py run, not a probe.py run'):
        probe.main(pr('--epochs', 1, '--resume', 'true', out='busy'))
    assert not (tmp_path / 'busy' / 'results.json').exists()
    assert (tmp_path / 'busy' / 'ckpt.pt').read_bytes() == open(pre, 'rb').read(), "the other run's checkpoint changed"


def test_errors_name_the_file(pr, pre, tmp_path, tiny):
    def fails(match, argv):
        with pytest.raises(common.UserError, match=match):
            probe.main(argv)
        out = argv[argv.index('--out_dir') + 1]
        assert not os.path.exists(os.path.join(out, 'ckpt.pt')) and not os.path.exists(os.path.join(out, 'results.json'))
    n = iter(range(1, 100))
    fails('probe.py needs --ckpt', script_argv(probe, tiny('--epochs', 1, out='e0')))
    missing = str(tmp_path / 'nope.pt')
    fails(f'checkpoint {missing} does not exist', pr('--ckpt', missing, out=f'e{next(n)}'))
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(os.urandom(256))
    fails(f'{garbage} is not a readable checkpoint', pr('--ckpt', str(garbage), out=f'e{next(n)}'))
    other = tmp_path / 'finetuned.pt'
    torch.save({'kind': 'finetune', 'model': {}, 'config': {}}, other)
    fails(f'{other} is a finetune.py checkpoint, but a pretrain.py or dino.py checkpoint is expected',
          pr('--ckpt', str(other), out=f'e{next(n)}'))
    fails(f'{pre} holds a vit_lite encoder but --model is vit_small', pr('--model', 'vit_small', out=f'e{next(n)}'))
    fails("--pool must be one of cls, mean, got 'max'", pr('--pool', 'max', out=f'e{next(n)}'))


# --- defaults that follow the checkpoint, a batch capped at the data, the floor ------------------------------

def test_defaults_follow_the_checkpoint_and_nothing_is_created_before_the_data_is_found(pre, tmp_path, capsys,
                                                                                        monkeypatch):
    """Given only --ckpt, the probe takes the dataset and image size the checkpoint was trained on (demo, 32 px) and
    says so; a dataset that is not on disk is one line, and no out_dir is left behind."""
    out = tmp_path / 'probe'
    assert probe.main(['--ckpt', pre, '--out_dir', str(out), '--epochs', 1, '--floor', 'false']) == 0
    assert 'from the checkpoint: dataset demo, img_size 32' in capsys.readouterr().out
    res = json.load(open(out / 'results.json'))
    assert (res['dataset'], res['config']['img_size'], res['val_images']) == ('demo', 32, 384)
    code, err = run_cli(probe.main, ['--ckpt', pre, '--dataset', 'tin', '--data_dir', tmp_path / 'nodata',
                                     '--out_dir', tmp_path / 'p2'], capsys, monkeypatch, script='probe.py')
    one_line_error(code, err, 'tin: dataset folder', 'not found', '--download true')
    assert code == 2 and not os.path.exists(tmp_path / 'p2') and not os.path.exists(tmp_path / 'nodata')
    damaged = torch.load(pre, weights_only=True)
    damaged['config']['dataset'] = 'imagenet'
    torch.save(damaged, tmp_path / 'damaged.pt')
    code, err = run_cli(probe.main, ['--ckpt', tmp_path / 'damaged.pt', '--out_dir', tmp_path / 'p3'], capsys,
                        monkeypatch, script='probe.py')
    one_line_error(code, err, f"{tmp_path / 'damaged.pt'}: its stored dataset 'imagenet' is not one of tin, cub",
                   'pass --dataset')
    assert not os.path.exists(tmp_path / 'p3')


def test_batch_and_lr_follow_the_batch_actually_used():
    assert probe.batch_and_lr(1000, 128, 1e-3) == (128, 1e-3, None)
    batch, lr, note = probe.batch_and_lr(40, 128, 1e-3)
    assert (batch, lr) == (40, 1e-3 * 40 / 128)
    assert note == 'batch: 128 is more than the 40 training images, so the head trains on batches of 40, with the lr ' \
                   'scaled to that batch (0.001 x 40/128)'


def test_a_batch_capped_at_the_data_scales_the_lr_and_the_floor_stands_beside_the_top1(pr, pre, tmp_path, capsys):
    """--subset 40 with --batch_size 128: the head trains on batches of 40 with the lr for 40 (and says so). The
    floor, the same probe on the run's initial (random) encoder, is printed beside the top-1 and stored; it is what
    evaluate.py reports as its random-init probe floor for the same recipe."""
    assert probe.main(pr('--epochs', 3, '--subset', 40, '--batch_size', 128)) == 0
    printed = capsys.readouterr().out
    assert 'batch: 128 is more than the 40 training images, so the head trains on batches of 40' in printed
    res = json.load(open(tmp_path / 'run' / 'results.json'))
    assert res['batch_size'] == 40 and res['peak_lr'] == pytest.approx(1e-3 * 40 / 128)
    logged = [json.loads(line) for line in open(tmp_path / 'run' / 'log.jsonl')]
    assert [r['lr'] for r in logged if r['event'] == 'probe'][0] == res['peak_lr']  # (no warm-up in TINY)
    floor = res['floor']
    assert floor['features'] == "the run's initial (random) encoder" and 0 <= floor['top1'] <= floor['top5'] <= 100
    done = printed.strip().splitlines()[-1]
    assert f"linear probe val top-1 {res['top1']:.2f}%" in done and \
        f"floor (the run's initial random encoder) top-1 {floor['top1']:.2f}%" in done
    # the floor is the run's own initial encoder: the same probe on it, built as pretrain.py built it
    split = data.subset(data.load_split('demo', 'train'), 40, 0)
    val = data.load_split('demo', 'val')
    ck = torch.load(pre, weights_only=True)
    torch.manual_seed(ck['config']['seed'])
    initial = M.build_mae(M.ViTConfig(**ck['model_config']))
    encoder = common.load_encoder(pre)[0]
    encoder.load_state_dict(M.encoder_state_dict(initial.state_dict()))
    feats = [probe.extract_features(encoder, s.images, s.labels, torch.device('cpu')) for s in (split, val)]
    again = probe.train_linear_head(*feats[0], *feats[1], 8, epochs=3, warmup_epochs=0, batch_size=40,
                                    lr=res['peak_lr'])
    assert again['top1'] == floor['top1']
