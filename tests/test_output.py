"""What a person watching a run sees: a progress line at least every Progress.every seconds by a timer (also inside a
long step or batch), a smoothed rate and ETA, the config as in effect, the warm-up in effect, a resume's real
changes, the learning curves as a picture and TensorBoard's event files."""
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import bench
import common
import dino
import evaluate
import finetune
import model as M
import pretrain
import probe
from conftest import ROOT, script_argv

FAST = 0.2  # the progress period in these tests (Progress.every is 9 s in a run)


def records(out, event):
    return [r for r in map(json.loads, open(os.path.join(out, 'log.jsonl'))) if r['event'] == event]


def progress_lines(text, prefix):
    return [line for line in text.splitlines() if line.startswith('  ' + prefix)]


# --- progress: a timer, not the next step --------------------------------------------------------------------


def test_a_slow_batch_prints_lines_by_timer_while_it_runs(tmp_path, monkeypatch, capsys):
    """A feature extraction whose batches take 5 periods each: the lines come while each batch runs (the timer), not
    once per batch, and never closer together than the period."""
    monkeypatch.setattr(common.Progress, 'every', FAST)
    stamps = []
    real_print = common.Run.print

    def timed_print(self, *a):
        stamps.append(time.monotonic())
        real_print(self, *a)
    monkeypatch.setattr(common.Run, 'print', timed_print)

    class SlowEncoder(torch.nn.Module):  # 5 periods per batch of images
        cfg = SimpleNamespace(img_size=32)

        def forward_features(self, x, pool='cls'):
            time.sleep(5 * FAST)
            return x.flatten(1)[:, :4]
    images = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    with common.Run(SimpleNamespace(out_dir=str(tmp_path), device='cpu'), 'test', training=False) as run:
        feats, _ = probe.extract_features(SlowEncoder(), images, None, run.device, batch_size=32, progress=run)
    assert feats.shape == (64, 4)
    lines = progress_lines(capsys.readouterr().out, 'features: image')
    first, second = [l for l in lines if ' 0/64' in l], [l for l in lines if ' 32/64' in l]
    assert len(first) >= 2 and len(second) >= 2, lines  # about 4 each; a loaded machine may delay a few
    assert 'so far' in first[-1] and 'img/s' in second[-1] and 'since image 32' in second[-1], lines
    assert all(b - a >= FAST * 0.9 for a, b in zip(stamps, stamps[1:])), "lines closer together than the period"


@pytest.mark.parametrize('script', ['pretrain', 'pretrain-benchmark', 'finetune', 'dino'])
def test_the_loops_print_their_status_inside_the_first_step(script, tiny, monkeypatch, capsys):
    """The time before step 1 (compilation on CUDA, DINO's first views and step) is not silent: the status line
    (step 0/N, the phase, the time so far) comes by timer while the first step runs; in a benchmark too (its
    compilation takes a minute on a GPU)."""
    script, benchmark = script.split('-')[0], script.endswith('benchmark')
    module = {'pretrain': pretrain, 'finetune': finetune, 'dino': dino}[script]
    slow_class = {'pretrain': M.MAEObjective, 'finetune': M.VisionTransformer, 'dino': dino.DINO}[script]
    monkeypatch.setattr(common.Progress, 'every', FAST)
    real_forward, calls = slow_class.forward, []

    def forward(self, *a, **kw):  # the first training forward takes 6 periods
        calls.append(1)
        if len(calls) == 1:
            time.sleep(6 * FAST)
        return real_forward(self, *a, **kw)
    monkeypatch.setattr(slow_class, 'forward', forward)
    argv = tiny(*(('--bench_steps', 1, '--bench_warmup', 1) if benchmark else ('--epochs', 1, '--subset', 64,
                                                                               '--knn_bank', 0)))
    result = module.main(script_argv(module, argv))
    assert result['images_per_s'] > 0 if benchmark else result == 0
    lines = progress_lines(capsys.readouterr().out, 'step 0/2')
    assert len(lines) >= 2 and all('the first step' in l and 'so far' in l for l in lines), lines


def test_the_smoothed_rate_stays_within_2x_across_one_slow_interval():
    """A steady run (1 s per step) with one step 30 times slower (a busy moment): the interval's own rate drops 30x,
    the smoothed rate and the ETA move by less than 2x from one line to the next. The first interval (compilation)
    does not weigh on the later figures."""
    now = [0.0]
    meter = common.Progress('step', 200, per=32, clock=lambda: now[0])
    rates, etas, raw = [], [], []
    for step in range(1, 120):
        dt = 60.0 if step == 1 else 30.0 if step == 60 else 1.0  # the first step compiles; step 60 is slow
        now[0] += dt
        meter.update(step)
        rates.append(meter.rate())
        etas.append(meter.eta())
        raw.append(32 / dt)
    assert rates[1] == pytest.approx(32.0), "the first interval still weighs on the rate"
    assert max(a / b for a, b in zip(raw[1:], raw[2:])) >= 30  # what a line showed before
    for figures in (rates[1:], etas[1:-1]):
        assert all(0.5 < b / a < 2 for a, b in zip(figures, figures[1:])), figures
    assert rates[-1] == pytest.approx(32.0, rel=0.05)  # and it recovers
    assert common.Progress('step', 10).rate() is None  # nothing measured yet


def test_time_spent_on_evaluations_and_checkpoints_is_left_out_of_the_rate(tiny, monkeypatch):
    """A 30 s evaluation between two 1 s steps leaves the rate and ETA where they were (skip); counted as an
    interval it would have moved them (a 4x drop was seen after each checkpoint). The loops skip after their
    epoch-end work."""
    now = [0.0]
    meter = common.Progress('step', 200, per=32, clock=lambda: now[0])
    for step in range(1, 21):
        now[0] += 1.0
        meter.update(step)
    now[0] += 30.0  # the evaluation and checkpoint
    meter.skip()
    now[0] += 1.0
    meter.update(21)
    assert meter.rate() == pytest.approx(32.0) and meter.eta() == pytest.approx(179.0)
    skipped = []
    monkeypatch.setattr(common.Progress, 'skip', lambda self: skipped.append(self.done))
    assert pretrain.main(tiny('--epochs', 2, '--subset', 64, '--knn_bank', 0)) == 0
    assert skipped == [2]  # after the first epoch's checkpoint (the last one ends the run)


@pytest.mark.parametrize('script', ['pretrain', 'finetune', 'dino'])
def test_the_log_line_shows_the_smoothed_rate_and_the_record_keeps_both(script, tiny, tmp_path, monkeypatch, capsys):
    """The loops print and log the meter's smoothed rate and ETA (the test above holds the smoothing to 2x); the
    record keeps the interval's own rate beside them."""
    module = {'pretrain': pretrain, 'finetune': finetune, 'dino': dino}[script]
    monkeypatch.setattr(common.Progress, 'rate', lambda self: 12345.0)  # what the smoothing says, whatever it is
    monkeypatch.setattr(common.Progress, 'eta', lambda self: 3723.0)
    assert module.main(script_argv(module, tiny('--epochs', 1, '--subset', 64, '--knn_bank', 0))) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if '| step ' in l]
    train = records(tmp_path / 'run', 'train')
    assert len(lines) == len(train) == 2 and all('| 12,345 img/s' in l and l.endswith('| eta 1h02m') for l in lines)
    assert all(r['images_per_s'] == 12345.0 and r['eta_s'] == 3723 for r in train)
    assert all(0 < r['interval_images_per_s'] != 12345.0 for r in train)


# --- the config line says what is in effect --------------------------------------------------------------------


def test_the_config_line_shows_the_precision_and_compile_in_effect(tiny, capsys):
    assert pretrain.main(tiny('--bench_steps', 1, '--bench_warmup', 0))['images_per_s'] > 0
    config = next(l for l in capsys.readouterr().out.splitlines() if l.startswith('config: '))
    if torch.cuda.is_available():
        assert ' dtype=bfloat16 compile=True compile_mode=reduce-overhead ' in config
    else:
        assert ' dtype=float32 (bfloat16 on CUDA) compile=False (eager on the CPU) compile_mode=None ' in config
        assert ' device=cpu (auto) ' in config
    # on CUDA the settings asked for are the ones in effect (CUDA graphs under torchrun and accumulation too)
    assert common.in_effect(SimpleNamespace(dtype='bfloat16', compile=True, compile_mode='reduce-overhead'), True) == {}


def test_the_config_line_shows_the_values_taken_for_names_left_to_the_preset_or_the_checkpoint(tiny, pre, capsys):
    """A name left at its "from elsewhere" default (0 or '') shows the value in effect and where it came from."""
    assert pretrain.main(tiny('--bench_steps', 1, '--bench_warmup', 0, '--patch_size', 0))['images_per_s'] > 0
    config = next(l for l in capsys.readouterr().out.splitlines() if l.startswith('config: '))
    assert " patch_size=4 (the preset's) " in config and ' img_size=32 ' in config
    assert finetune.main(script_argv(finetune, tiny('--ckpt', pre, '--img_size', 0, '--patch_size', 0, '--epochs', 1,
                                                    '--subset', 32, out='ft'))) == 0
    config = next(l for l in capsys.readouterr().out.splitlines() if l.startswith('config: '))
    assert " lr=0.001 (the recipe's for demo) " in config and " patch_size=8 (the checkpoint's) " in config


def test_bench_header_shows_the_precision_and_compile_in_effect(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, 'measure', lambda *a: dict(error='not measured here'))  # the header only
    assert bench.main(['--device', 'cpu', '--figures', 'mae', '--out_dir', str(tmp_path)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert 'dtype float32 (bfloat16 on CUDA), compile False (eager on the CPU), compile_mode None' in header, header


# --- the warm-up in effect and a resume's changes ------------------------------------------------------------


def test_a_clipped_warmup_is_at_least_one_step_and_shown_in_the_banner(tmp_path, capsys):
    """finetune.py --epochs 2 on 2 steps per epoch: 5% of 4 steps rounds to 0; the warm-up in effect is 1 step, shown
    in the config line (after the banner's first line, nothing before it) and in the start record; curves.png shows
    the run's top-1/top-5."""
    argv = ['--dataset', 'demo', '--img_size', '32', '--patch_size', '8', '--subset', '64', '--batch_size', '32',
            '--epochs', '2', '--log_every', '1', '--out_dir', str(tmp_path / 'ft'), '--data_dir', str(tmp_path / 'data')]
    assert finetune.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith('finetune: torch'), out[:300]
    config = next(l for l in out.splitlines() if l.startswith('config: '))
    assert (" warmup_epochs=0.5 (1 step, 25% of the run: the recipe's 5 warm-up epochs do not fit in 2 epochs) "
            in config), config
    assert records(tmp_path / 'ft', 'start')[0]['in_effect']['warmup_epochs'] == 0.5
    lrs = [r['lr'] for r in records(tmp_path / 'ft', 'train')]
    assert lrs[0] == 0 and lrs[1] == pytest.approx(1e-3 * 32 / 128, rel=1e-6), lrs  # one warm-up step, then the peak
    fig = evaluate.learning_curves(str(tmp_path / 'ft'))
    accuracy = next(ax for ax in fig.axes if ax.get_visible() and ax.get_title() == 'val accuracy')
    evals = records(tmp_path / 'ft', 'eval')
    assert {l.get_label(): list(l.get_ydata()) for l in accuracy.get_lines()} == {
        'top-1': [r['top1'] for r in evals], 'top-5': [r['top5'] for r in evals]}
    assert Image.open(tmp_path / 'ft' / 'curves.png').format == 'PNG'


def test_a_resume_lists_only_the_settings_it_changes(tiny, tmp_path, capsys):
    assert pretrain.main(tiny('--epochs', 1, '--subset', 64, '--knn_bank', 0)) == 0
    capsys.readouterr()
    assert pretrain.main(tiny('--epochs', 2, '--subset', 64, '--knn_bank', 0, '--resume', 'true')) == 0
    changed = [l for l in capsys.readouterr().out.splitlines() if l.startswith('resume: changed')]
    assert changed == ["resume: changed from the checkpoint's config: epochs 1 -> 2"], changed


# --- learning curves and TensorBoard ---------------------------------------------------------------------------


def test_each_checkpoint_writes_curves_png_and_tensorboard_events(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert pretrain.main(tiny('--epochs', 2, '--ckpt_every', 1, '--subset', 64, '--tensorboard', 'true')) == 0
    out = tmp_path / 'run'
    png = Image.open(out / 'curves.png')
    assert png.format == 'PNG' and png.size[0] >= 1000 and png.size[1] >= 600, png.size
    train, checkpoints = records(out, 'train'), records(out, 'checkpoint')
    fig = evaluate.learning_curves(str(out))
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(panels) == {'loss', 'learning rate', 'kNN top-1 on the val images'}
    assert all(ax.get_xlabel() == 'epoch' and ax.get_ylabel() for ax in panels.values())
    loss = {l.get_label(): (list(l.get_xdata()), list(l.get_ydata())) for l in panels['loss'].get_lines()}
    assert loss['train'] == ([r['epoch'] for r in train], [r['loss'] for r in train])
    assert loss['val (masked patches, fixed masks)'][1] == [r['val_loss'] for r in checkpoints]
    knn = {l.get_label(): list(l.get_ydata()) for l in panels['kNN top-1 on the val images'].get_lines()}
    floor = records(out, 'knn')[0]['top1']
    assert knn['kNN top-1'] == [r['knn_top1'] for r in checkpoints] and len(checkpoints) == 2
    assert knn[f"floor: the initial weights ({floor:.1f}%)"] == [floor, floor]  # a horizontal line
    # TensorBoard: every record's numbers at its step, under train/ and val/
    events = EventAccumulator(str(out))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars('train/loss')] == [
        (r['step'], pytest.approx(r['loss'])) for r in train]
    assert [e.value for e in events.Scalars('val/loss')] == [pytest.approx(r['val_loss']) for r in checkpoints]
    assert [e.step for e in events.Scalars('val/knn_top1')] == [0] + [r['step'] for r in checkpoints]


def test_the_curves_of_a_resumed_run_replace_the_steps_it_repeated(tmp_path):
    """A run stopped after step 3 and resumed from its checkpoint at step 2: the records the stopped run wrote after
    step 2 are not drawn (the curve would run back on itself); a torn last line is skipped."""
    log = [dict(event='start', script='pretrain', **{'start step': 0}),
           *[dict(event='train', step=s, epoch=s / 2, loss=1.0 / s, lr=1e-3) for s in (1, 2, 3)],
           dict(event='start', script='pretrain', **{'start step': 2}),
           *[dict(event='train', step=s, epoch=s / 2, loss=0.5 / s, lr=1e-3) for s in (3, 4)]]
    (tmp_path / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in log) + '{"event": "tr')
    fig = evaluate.learning_curves(str(tmp_path))
    loss = next(ax for ax in fig.axes if ax.get_title() == 'loss').get_lines()[0]
    assert list(loss.get_xdata()) == [0.5, 1.0, 1.5, 2.0] and list(loss.get_ydata()) == [1.0, 0.5, 0.5 / 3, 0.125]


def test_a_curves_failure_is_one_line_not_a_lost_run(tmp_path, capsys):
    (tmp_path / 'log.jsonl').write_text(json.dumps(dict(event='start', script='pretrain')) + '\n')
    evaluate.write_learning_curves(str(tmp_path), SimpleNamespace(print=print))
    assert capsys.readouterr().out.startswith('curves.png not written (ValueError: ')
    assert not (tmp_path / 'curves.png').exists()


def test_tensorboard_without_its_package_is_one_line_before_anything_is_written(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'tensorboard', None)  # as if not installed: torch's writer cannot import it
    monkeypatch.delitem(sys.modules, 'torch.utils.tensorboard', raising=False)
    with pytest.raises(common.UserError, match='--tensorboard true needs the tensorboard package: pip install'):
        pretrain.main(tiny('--epochs', 1, '--tensorboard', 'true'))
    assert not (tmp_path / 'run').exists()


# --- the README's setup leaves git clean ---------------------------------------------------------------------


def test_the_readme_virtual_environment_is_ignored_by_git():
    for folder in ('.venv', 'venv'):
        path = f"{folder}/lib/python3/site-packages/torch/__init__.py"
        if os.path.exists(os.path.join(ROOT, '.git')):
            done = subprocess.run(['git', 'check-ignore', '--no-index', '-q', path], cwd=ROOT)
            assert done.returncode == 0, f"git does not ignore {folder}/"
        else:  # a copy without git: the rule itself
            assert f"{folder}/" in open(os.path.join(ROOT, '.gitignore')).read().split()
