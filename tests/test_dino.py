"""dino.py: learning and no collapse on demo data, the teacher is the student's EMA, centring and the temperature
schedule are DINO's formulas, the views, the checkpoint feeds finetune / probe / evaluate, exact resume after
kill -9 and SIGTERM, one-line errors (two ranks equal one process: tests/test_ddp.py)."""
import json
import os
import signal
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import data
import dino
import evaluate
import finetune
import model as M
import probe
from conftest import TINY
from test_reliability import one_line_error, run_cli, same_weights, start, wait_for_log

# 64 demo images in batches of 32 (2 steps an epoch), two local crops, an lr, a teacher momentum and a teacher
# temperature (0.02 to 0.025: the recipe's warm-up, clipped to these 4 epochs) at which a few steps learn; a checkpoint
# (and kNN) every epoch. Shared by the learning, checkpoint and kill tests.
RUN = ('--subset', 64, '--epochs', 4, '--teacher_temp', 0.025, '--ckpt_every', 1, '--lr', 1e-2,
       '--momentum_teacher', 0.99, '--local_crops_number', 2)


def records(out, event):
    return [r for r in map(json.loads, open(os.path.join(out, 'log.jsonl'))) if r['event'] == event]


def state(out):
    """Everything a DINO checkpoint holds that training changes: both networks and the centre."""
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    return {**{'model.' + k: v for k, v in ck['model'].items()}, **{'student.' + k: v for k, v in ck['student'].items()},
            **{'teacher_head.' + k: v for k, v in ck['teacher_head'].items()}, 'center': ck['center']}


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    """The uninterrupted run: its out_dir."""
    out = tmp_path_factory.mktemp('straight')
    assert dino.main(TINY + ['--out_dir', str(out), '--data_dir', str(out / 'data')] + [str(a) for a in RUN]) == 0
    return out


# --- learning ----------------------------------------------------------------------------------------------

def test_loss_falls_knn_beside_its_floor_and_no_collapse(straight):
    train = records(straight, 'train')
    losses = [r['loss'] for r in train]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    # no collapse: the teacher's output entropy stays away from 0 (one dimension) and log K (uniform)
    log_k = np.log(1024)
    entropies = [r['teacher_entropy'] for r in train]
    assert all(0.05 * log_k < e < 0.9 * log_k for e in entropies), (entropies, log_k)
    knn = records(straight, 'knn')
    assert knn[0]['what'].startswith('floor') and knn[0]['step'] == 0 and len(knn) == 5  # floor + every epoch
    res = json.load(open(straight / 'results.json'))
    assert res['knn_floor'] == knn[0]['top1'] and res['knn_top1'] == knn[-1]['top1'] and res['steps'] == 8
    print(f"\ndemo: loss {losses[0]:.3f} -> {losses[-1]:.3f}; teacher entropy {entropies[0]:.2f} -> {entropies[-1]:.2f} "
          f"(log K {log_k:.2f}); kNN top-1 floor {knn[0]['top1']:.1f}% -> {knn[-1]['top1']:.1f}%")
    ck = torch.load(straight / 'ckpt.pt', weights_only=True)
    assert ck['kind'] == 'dino' and ck['step'] == 8 and ck['epoch'] == 4 and ck['config']['dataset'] == 'demo'
    assert {'model', 'model_config', 'student', 'teacher_head', 'center', 'optimizer', 'scaler', 'rng'} <= set(ck)
    assert set(ck['model']) == {k[len('encoder.'):] for k in ck['student'] if k.startswith('encoder.')}
    # the teacher temperature the loop used is the schedule's (the recipe's warm-up, clipped to the run)
    cfg = SimpleNamespace(**ck['config'])
    assert [r['teacher_temp'] for r in train] == [dino.teacher_temp_at((r['step'] - 1) // 2, cfg) for r in train]


def test_curves_show_the_entropy_beside_log_k_and_the_knn_beside_its_floor(straight):
    """curves.png, redrawn at each checkpoint, draws what the log holds: the teacher's entropy with log K (a uniform
    output) as a line, the kNN top-1 with its floor as a line."""
    assert (straight / 'curves.png').stat().st_size > 10_000
    panels = {ax.get_title(): ax for ax in evaluate.learning_curves(str(straight)).axes if ax.get_visible()}
    assert set(panels) == {'loss', 'learning rate', 'teacher entropy', 'kNN top-1 on the val images'}
    entropy = {l.get_label(): list(l.get_ydata()) for l in panels['teacher entropy'].get_lines()}
    assert entropy["teacher's output"] == [r['teacher_entropy'] for r in records(straight, 'train')]
    assert entropy[f"log K = {np.log(1024):.2f} (a uniform output)"] == pytest.approx([np.log(1024)] * 2, abs=1e-3)
    knn = {l.get_label(): list(l.get_ydata()) for l in panels['kNN top-1 on the val images'].get_lines()}
    floor = records(straight, 'knn')[0]['top1']
    assert knn['kNN top-1'] == [r['knn_top1'] for r in records(straight, 'checkpoint')]
    assert knn[f"floor: the initial weights ({floor:.1f}%)"] == [floor, floor]


def test_first_step_teacher_is_ema_centre_and_loss_are_the_formulas(tiny, tmp_path):
    """One step from the initial weights, recomputed here: the views of (seed, step 0), the loss DINO's on them, the
    centre the EMA of the teacher's outputs, the teacher the EMA of the student; the last layer stays frozen."""
    argv = tiny('--subset', 32, '--epochs', 1, '--momentum_teacher', 0.5, '--knn_bank', 0, '--local_crops_number', 2)
    assert dino.main(argv) == 0
    ck = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)
    cfg, _ = common.configure(vars(dino), argv)
    mcfg = common.model_config(ck, 'ckpt')
    torch.manual_seed(cfg.seed)
    init = dino.build(mcfg, cfg, dino.local_view_size(cfg, mcfg))  # the initial weights
    split = data.subset(data.load_split('demo', 'train', cfg.data_dir), 32, cfg.seed)
    loader = data.DeviceLoader(split, batch_size=32, device='cpu', seed=cfg.seed, img_size=32)
    x = next(loader.epoch(0))[1][0][0]
    views = dino.Views(cfg, 32, 16, torch.device('cpu'))
    g, loc = views(data.denormalize(x), views.draw(0))
    with torch.no_grad():
        t, s = init.teacher(g), init.student(g, loc)
    loss, _ = dino.dino_loss(s, t, torch.zeros(1024), dino.teacher_temp_at(0, cfg), cfg.student_temp)
    assert records(tmp_path / 'run', 'train')[0]['loss'] == pytest.approx(loss.item(), rel=1e-5)
    assert torch.allclose(ck['center'], 0.1 * t.mean(0), atol=1e-6)  # centre 0, momentum 0.9
    # teacher = m * initial + (1 - m) * student after the step, m = momentum_teacher at step 0
    before = init.teacher.state_dict()
    after = {**{'encoder.' + k: v for k, v in ck['model'].items()}, **{'head.' + k: v for k, v in ck['teacher_head'].items()}}
    for k, v in after.items():
        assert torch.allclose(v, 0.5 * before[k] + 0.5 * ck['student'][k], atol=1e-6), k
    assert torch.equal(ck['student']['head.last_layer.weight'], before['head.last_layer.weight'])  # freeze_last_layer
    assert not torch.equal(ck['student']['head.mlp.0.weight'], before['head.mlp.0.weight'])


def test_teacher_gets_no_gradient():
    cfg, _ = common.configure(vars(dino), ['--img_size', 32, '--patch_size', 8, '--out_dim', 64])
    net = dino.build(M.make_config('vit_lite', img_size=32, patch_size=8), cfg, 16)
    loss, _, _ = net(torch.randn(4, 3, 32, 32))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in net.teacher.parameters())
    assert all(p.grad is not None for p in net.student.parameters())


# --- formulas ----------------------------------------------------------------------------------------------

def test_temperature_schedule_and_centre_equal_dinos_formulas():
    cfg, _ = common.configure(vars(dino), [])
    official = np.concatenate((np.linspace(0.02, 0.04, 30), np.ones(70) * 0.04))  # main_dino.py's DINOLoss
    assert [dino.teacher_temp_at(e, cfg) for e in range(100)] == pytest.approx(official.tolist(), abs=1e-12)
    short, _ = common.configure(vars(dino), ['--epochs', 4])  # the recipe's 30 warm-up epochs, clipped to the run's 4
    assert [dino.teacher_temp_at(e, short) for e in range(4)] == pytest.approx(np.linspace(0.02, 0.04, 4).tolist())
    g = torch.Generator().manual_seed(0)
    center, teacher = torch.randn(16, generator=g), torch.randn(10, 16, generator=g)
    expected = center * 0.9 + teacher.mean(0, keepdim=True)[0] * 0.1
    dino.update_center(center, teacher.sum(0), 10, 0.9)
    assert torch.allclose(center, expected, atol=1e-6)
    # the teacher momentum and the weight decay: DINO's cosine schedules, from the shared formula
    m = [common.get_lr(s, 100, 0, 0.9995, 1.0) for s in range(100)]
    assert m[0] == 0.9995 and m[50] == pytest.approx(0.99975) and all(a <= b for a, b in zip(m, m[1:]))


def test_loss_equals_dinos_loop():
    """dino_loss against main_dino.py's DINOLoss.forward, written out (2 global + 3 local views)."""
    g = torch.Generator().manual_seed(0)
    n, K = 6, 32
    s, t, center = torch.randn(5 * n, K, generator=g), torch.randn(2 * n, K, generator=g), torch.randn(K, generator=g)
    student_out = (s / 0.1).chunk(5)
    teacher_out = F.softmax((t - center) / 0.04, dim=-1).chunk(2)
    total, terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            terms += 1
    loss, entropy = dino.dino_loss(s, t, center, 0.04, 0.1)
    assert loss.item() == pytest.approx((total / terms).item(), rel=1e-5)
    q = torch.cat(teacher_out)
    assert entropy.item() == pytest.approx(-torch.special.xlogy(q, q).sum(-1).mean().item(), rel=1e-4)


def test_views_differ_per_sample_and_reproduce_from_seed_and_step():
    cfg, _ = common.configure(vars(dino), ['--batch_size', 8, '--local_crops_number', 2])
    views = dino.Views(cfg, 32, 16, torch.device('cpu'))
    img = data.load_split('demo', 'train').images[:1].float() / 255
    x = F.interpolate(img, size=32, mode='bilinear', antialias=True).expand(8, -1, -1, -1)  # one image, 8 times
    u = views.draw(3)
    g, loc = views(x, u)
    assert g.shape == (16, 3, 32, 32) and loc.shape == (16, 3, 16, 16)
    for v in (g, loc):
        flat = v.flatten(1)
        assert torch.cdist(flat, flat).add(torch.eye(16) * 1e9).min() > 1.0, "two views of the same image are equal"
    again = views(x, views.draw(3))
    assert torch.equal(again[0], g) and torch.equal(again[1], loc)
    assert not torch.equal(views(x, views.draw(4))[0], g)
    # a rank's rows: the views of rows 1, 3, 5, 7 (rank 1 of 2) are those rows of the whole batch's views
    rows = torch.arange(1, 8, 2)
    part = views(x[rows], u[:, rows])
    assert torch.equal(part[0], g.view(2, 8, 3, 32, 32)[:, rows].flatten(0, 1))
    assert torch.equal(part[1], loc.view(2, 8, 3, 16, 16)[:, rows].flatten(0, 1))
    # without jitter, blur, grayscale and solarisation, a whole-image unflipped crop is the image
    u0 = torch.full((1, 1, sum(dino.U_SIZES)), 0.99)
    u0[..., 2 * data.RRC_TRIES:2 * data.RRC_TRIES + 2] = 0.5  # centred
    u0[..., :data.RRC_TRIES] = 1.0  # the whole area (ratio 4/3 does not fit, ratio ~1 does: the first try fits)
    u0[..., data.RRC_TRIES:2 * data.RRC_TRIES] = 0.5
    same = views.augment(x[:1], u0[0], 32, (1.0, 1.0), torch.zeros(1, 2))
    assert torch.allclose(data.denormalize(same), x[:1], atol=1e-5)


# --- the checkpoint feeds the other scripts -----------------------------------------------------------------

def test_checkpoint_feeds_finetune_probe_and_evaluate(straight, tmp_path):
    ck_path = str(straight / 'ckpt.pt')
    common_args = ['--dataset', 'demo', '--data_dir', str(tmp_path / 'data'), '--ckpt', ck_path]
    assert finetune.main(common_args + ['--subset', 64, '--batch_size', 32, '--epochs', 1, '--warmup_epochs', 0,
                                        '--out_dir', str(tmp_path / 'ft')]) == 0
    assert json.load(open(tmp_path / 'ft' / 'results.json'))['config']['ckpt'] == ck_path
    assert probe.main(common_args + ['--subset', 64, '--epochs', 2, '--warmup_epochs', 0, '--out_dir', str(tmp_path / 'pr')]) == 0
    assert 0 <= json.load(open(tmp_path / 'pr' / 'results.json'))['top1'] <= 100
    assert evaluate.main(['--ckpt', ck_path, '--data_dir', str(tmp_path / 'data'), '--max_images', 32, '--subset', 64,
                          '--probe_epochs', 0, '--transfer_dataset', 'none', '--workers', 1,
                          '--out_dir', str(tmp_path / 'ev')]) == 0
    res = json.load(open(tmp_path / 'ev' / 'eval.json'))
    assert res['kind'] == 'dino' and 'skipped' in res['reconstruction'] and res['dataset'] == 'demo'
    # what they all load: the teacher's encoder
    encoder, _ = common.load_encoder(ck_path)
    teacher = torch.load(ck_path, weights_only=True)['model']
    assert all(torch.equal(v, teacher[k]) for k, v in encoder.state_dict().items())


# --- reliability --------------------------------------------------------------------------------------------

def test_kill_and_sigterm_then_resume_match_the_uninterrupted_run(tiny, tmp_path, straight, monkeypatch, capsys):
    killed = start('dino.py', tiny(*RUN, out='killed'))
    try:
        # meanwhile, here: a real SIGTERM to this process during step 3, through Run's handler
        real_update, steps = dino.update_center, []

        def update_then_sigterm(*args):
            real_update(*args)
            steps.append(1)
            if len(steps) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
        with monkeypatch.context() as m:
            m.setattr(dino, 'update_center', update_then_sigterm)
            assert dino.main(tiny(*RUN, out='term')) == 128 + signal.SIGTERM
        out = capsys.readouterr().out
        assert 'stopped by signal at step 3' in out and '--resume true' in out
        assert torch.load(tmp_path / 'term' / 'ckpt.pt', weights_only=True)['step'] == 3
        wait_for_log(tmp_path / 'killed', lambda r: r['event'] == 'checkpoint', killed)
        time.sleep(np.random.default_rng().uniform(0.0, 0.5))  # somewhere in epoch 2, perhaps inside a save
        killed.send_signal(signal.SIGKILL)
    finally:
        killed.kill()
        killed.wait()
    assert killed.returncode == -signal.SIGKILL
    reference = state(straight)
    for name in ('killed', 'term'):
        assert dino.main(tiny(*RUN, '--resume', 'true', out=name)) == 0
        assert same_weights(reference, state(tmp_path / name)), f"{name}: resumed run differs from the uninterrupted one"


def test_benchmark_mode_times_the_loop_and_writes_nothing(tiny, tmp_path):
    result = dino.main(tiny('--subset', 64, '--local_crops_number', 2, '--bench_steps', 2, '--bench_warmup', 1))
    assert result['images_per_s'] > 0 and result['batch_size'] == 32 and np.isfinite(result['loss'])
    assert not (tmp_path / 'run').exists()


# --- config ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('extra, needles', [
    (('--momentum_teacher', 1.5), ['--momentum_teacher must be a number in [0, 1], got 1.5']),
    (('--teacher_temp', 0), ['--teacher_temp must be a finite number > 0']),
    (('--out_dim', 0), ['--out_dim must be an integer >= 1']),
    (('--local_crops_number', 2, '--local_crops_min', 0.7), ['--local_crops_min 0.7 must be in (0, --global_crops_min 0.6)']),
    (('--local_crops_number', 2, '--local_crops_size', 12), ['--local_crops_size 12 must be a multiple of the patch size 8']),
    (('--momentum_teachr', 0.9), ['did you mean --momentum_teacher']),
])
def test_bad_values_are_one_line(extra, needles, tiny, tmp_path, capsys, monkeypatch):
    one_line_error(*run_cli(dino.main, tiny('--epochs', 1, *extra), capsys, monkeypatch, script='dino.py'), *needles)
    assert not os.path.exists(tmp_path / 'run' / 'ckpt.pt') and not os.path.exists(tmp_path / 'run' / '.lock')


def test_defaults_are_the_studys_dino_and_documented():
    d = common.defaults(vars(dino))
    assert (d['batch_size'], d['epochs'], d['momentum_teacher'], d['out_dim'], d['head_hidden'], d['head_bottleneck']) \
        == (128, 100, 0.9995, 1024, 512, 128)
    assert (d['global_crops_min'], d['local_crops_number'], d['local_crops_min']) == (0.6, 0, 0.2)
    assert (d['warmup_teacher_temp'], d['teacher_temp'], d['warmup_teacher_temp_epochs'], d['student_temp']) == (0.02, 0.04, 30, 0.1)
    assert (d['center_momentum'], d['lr'], d['warmup_epochs'], d['min_lr']) == (0.9, 5e-4, 10, 1e-6)
    assert (d['weight_decay'], d['weight_decay_end'], d['freeze_last_layer'], d['grad_clip']) == (0.04, 0.4, 1, 3.0)
    page = common.help_text(vars(dino))
    assert all(f"--{name} " in page for name in d), "a constant without its comment is missing from --help"
