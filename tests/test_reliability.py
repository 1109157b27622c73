"""Reliability: a killed run loses nothing, bad input gets one clear line and a non-zero exit, no good file is
overwritten. Each row of the README's bad-input table has a test here (or in the test file named beside it)."""
import hashlib
import importlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import common
import model as M
import pretrain
from conftest import ROOT, script_argv


def weights(out):
    return torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['model']


def same_weights(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def start(script, argv):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONUNBUFFERED='1')
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script)] + argv, env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_log(out, predicate, proc, timeout=120):
    path = os.path.join(out, 'log.jsonl')
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
        if os.path.exists(path):
            for line in open(path).read().splitlines():
                try:
                    if predicate(json.loads(line)):
                        return
                except json.JSONDecodeError:
                    pass  # a line being written
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the log")


# --- kill and resume --------------------------------------------------------------------------------------

RUN = ('--epochs', 3, '--ckpt_every', 1, '--picture_every', 100)


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
    """The uninterrupted reference run's folder, shared by the kill tests."""
    from conftest import TINY
    out = tmp_path_factory.mktemp('straight')
    argv = TINY + ['--out_dir', str(out), '--data_dir', str(out / 'data')] + [str(a) for a in RUN]
    assert pretrain.main(argv) == 0
    return out


@pytest.fixture(scope='module')
def straight(straight_run):
    """The uninterrupted reference run's final weights."""
    return weights(straight_run)


@pytest.fixture
def finished(tmp_path, straight_run):
    """A copy of the finished reference run (3 epochs) as tmp_path/run: tiny('--resume', 'true', '--epochs', 4)
    extends it by one epoch."""
    shutil.copytree(straight_run, tmp_path / 'run', ignore=shutil.ignore_patterns('data'))
    return tmp_path / 'run'


def test_sigkill_at_any_moment_then_resume_matches_uninterrupted(tiny, tmp_path, straight):
    args = RUN
    killed = tmp_path / 'killed'
    proc = start('pretrain.py', tiny(*args, out='killed'))
    wait_for_log(killed, lambda r: r['event'] == 'checkpoint', proc)
    time.sleep(np.random.default_rng().uniform(0.0, 0.5))  # somewhere in epoch 2, perhaps inside a save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert pretrain.main(tiny('--resume', 'true', out='killed')) == 0  # the killed run's stale lock is taken over
    assert same_weights(straight, weights(killed))


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT], ids=['sigterm', 'ctrl_c'])
def test_a_stop_signal_saves_mid_epoch_prints_the_resume_command_and_resume_matches(sig, tiny, tmp_path, straight):
    """SIGTERM (pre-emption) and Ctrl-C save a checkpoint where the run is, exit 128 + signal, and say how to go on."""
    out = tmp_path / 'stopped'
    proc = start('pretrain.py', tiny(*RUN, out='stopped'))
    wait_for_log(out, lambda r: r['event'] == 'train' and r['step'] >= 3, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-2000:]
    assert 'stopped by signal' in stdout and f'--resume true --out_dir {out}' in stdout
    ck = torch.load(out / 'ckpt.pt', weights_only=True)
    assert 3 <= ck['step'] < 24
    assert pretrain.main(tiny('--resume', 'true', out='stopped')) == 0
    assert same_weights(straight, weights(out))


# --- bad input: one clear line, non-zero exit, nothing lost ------------------------------------------------

def run_cli(main, argv, capsys, monkeypatch, script='pretrain.py'):
    """Run a script's main the way `python script.py ...` does; return (exit code, stderr lines)."""
    monkeypatch.setattr(sys, 'argv', [script] + [str(a) for a in argv])
    with pytest.raises(SystemExit) as exit_info:
        common.cli(main)
    err = capsys.readouterr().err.strip().splitlines()
    return exit_info.value.code, err


def one_line_error(code, err, *needles):
    assert code not in (0, None), "a bad input must give a non-zero exit"
    assert len(err) == 1, f"expected one line on stderr, got: {err}"
    for n in needles:
        assert n in err[0], f"{n!r} not in {err[0]!r}"


@pytest.mark.parametrize('extra, needles', [
    (('--maks', 0.5), ['unknown config name --maks', 'did you mean --mask']),
    (('--epochs', 'two'), ['--epochs expects an integer']),
    (('--mask', 1.5), ['--mask must be a number in (0, 1)', 'got 1.5']),
    (('--img_size', 30), ['img_size 30 is not divisible by patch_size 8']),
    (('--alpha', 0.5), ['needs a perceptual critic', 'finetune.py --arch squeezenet']),
    (('--resume', 'true'), ['no checkpoint at', 'run without --resume']),
    (('--alpha', 0.5, '--critic', '/nonexistent.pt'), ['--critic: checkpoint /nonexistent.pt does not exist',
                                                       'train one with: python finetune.py --arch squeezenet']),
])
def test_bad_config_rows(extra, needles, tiny, tmp_path, capsys, monkeypatch):
    one_line_error(*run_cli(pretrain.main, tiny('--epochs', 1, *extra), capsys, monkeypatch), *needles)
    nothing_written(tmp_path / 'run')


def nothing_written(out):
    """A refused run leaves no checkpoint, results, log or lock behind."""
    left = set(os.listdir(out)) if os.path.isdir(out) else set()
    assert not left & {'ckpt.pt', 'results.json', 'log.jsonl', '.lock'}, f"a refused run left {left}"


def test_missing_dataset_row(tmp_path, capsys, monkeypatch):
    code, err = run_cli(pretrain.main, ['--dataset', 'tin', '--data_dir', tmp_path / 'nothing',
                                        '--out_dir', tmp_path / 'o'], capsys, monkeypatch)
    one_line_error(code, err, 'tiny-imagenet-200', '--download true')


def write_tin(root, corrupt=False, annotations=True):
    """A two-class Tiny ImageNet in the official layout."""
    wnids = ['n01443537', 'n01629819']
    os.makedirs(root / 'val' / 'images')
    (root / 'wnids.txt').write_text('\n'.join(wnids) + '\n')
    rows = []
    for c, w in enumerate(wnids):
        os.makedirs(root / 'train' / w / 'images')
        for i in range(3):
            Image.fromarray(np.full((64, 64, 3), 40 * i + c, np.uint8)).save(root / 'train' / w / 'images' / f'{w}_{i}.JPEG')
        Image.fromarray(np.full((64, 64, 3), 9, np.uint8)).save(root / 'val' / 'images' / f'val_{c}.JPEG')
        rows.append(f'val_{c}.JPEG\t{w}\t0\t0\t63\t63')
    if annotations:
        (root / 'val' / 'val_annotations.txt').write_text('\n'.join(rows) + '\n')
    if corrupt:
        (root / 'train' / wnids[1] / 'images' / f'{wnids[1]}_1.JPEG').write_bytes(b'not a jpeg at all')


def test_missing_annotation_file_row(tmp_path, capsys, monkeypatch):
    write_tin(tmp_path / 'data' / 'tiny-imagenet-200', annotations=False)
    code, err = run_cli(pretrain.main, ['--dataset', 'tin', '--data_dir', tmp_path / 'data', '--out_dir', tmp_path / 'o',
                                        '--batch_size', 2], capsys, monkeypatch)
    one_line_error(code, err, 'val_annotations.txt')


def test_corrupt_image_row(tmp_path, capsys, monkeypatch):
    write_tin(tmp_path / 'data' / 'tiny-imagenet-200', corrupt=True)
    code, err = run_cli(pretrain.main, ['--dataset', 'tin', '--data_dir', tmp_path / 'data', '--out_dir', tmp_path / 'o',
                                        '--batch_size', 2], capsys, monkeypatch)
    one_line_error(code, err, 'n01629819_1.JPEG')
    assert not [f for f in os.listdir(tmp_path / 'data' / 'tiny-imagenet-200') if 'cache' in f], "a partial cache was left"


def test_out_dir_not_writable_row(tmp_path, capsys, monkeypatch, tiny):
    (tmp_path / 'a_file').write_text('x')
    argv = tiny('--epochs', 1) + ['--out_dir', str(tmp_path / 'a_file' / 'run')]  # a path under a file (works as root too)
    one_line_error(*run_cli(pretrain.main, argv, capsys, monkeypatch), 'is not writable', '--out_dir')


def test_truncated_and_foreign_checkpoint_on_resume_row(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'run'
    os.makedirs(out)
    (out / 'ckpt.pt').write_bytes(b'PK\x03\x04 truncated')
    one_line_error(*run_cli(pretrain.main, tiny('--resume', 'true'), capsys, monkeypatch), str(out / 'ckpt.pt'), 'not a readable checkpoint')
    assert (out / 'ckpt.pt').read_bytes() == b'PK\x03\x04 truncated', "the user's file was changed"
    torch.save({'state_dict': {}}, out / 'ckpt.pt')
    foreign = (out / 'ckpt.pt').read_bytes()
    one_line_error(*run_cli(pretrain.main, tiny('--resume', 'true'), capsys, monkeypatch), 'not a checkpoint of this toolkit')
    assert (out / 'ckpt.pt').read_bytes() == foreign and sorted(os.listdir(out)) == ['ckpt.pt']


def test_non_finite_loss_row_keeps_last_good_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    assert pretrain.main(tiny('--epochs', 1)) == 0
    good = (tmp_path / 'run' / 'ckpt.pt').read_bytes()
    real_forward = M.MAEObjective.forward
    monkeypatch.setattr(M.MAEObjective, 'forward', lambda self, *a: real_forward(self, *a) * float('nan'))
    code, err = run_cli(pretrain.main, tiny('--resume', 'true', '--epochs', 2), capsys, monkeypatch)
    assert code == 1
    one_line_error(code, err, 'loss became nan', 'untouched')
    assert (tmp_path / 'run' / 'ckpt.pt').read_bytes() == good


@pytest.mark.parametrize('script', ['finetune', 'dino'])
def test_non_finite_loss_in_finetune_and_dino_is_one_line_and_writes_no_checkpoint(script, tiny, tmp_path, capsys,
                                                                                   monkeypatch):
    import dino
    import finetune
    if script == 'finetune':  # NaN logits
        real = M.VisionTransformer.forward
        monkeypatch.setattr(M.VisionTransformer, 'forward', lambda self, x: real(self, x) * float('nan'))
    else:                     # a NaN DINO loss
        real = dino.dino_loss
        monkeypatch.setattr(dino, 'dino_loss', lambda *a: (real(*a)[0] * float('nan'), real(*a)[1]))
    module = {'finetune': finetune, 'dino': dino}[script]
    code, err = run_cli(module.main, script_argv(module, tiny('--epochs', 1)), capsys, monkeypatch, script=f'{script}.py')
    assert code == 1
    one_line_error(code, err, 'loss became nan at step 1', 'no checkpoint was written', '--lr')
    assert not (tmp_path / 'run' / 'ckpt.pt').exists()


def test_fresh_run_never_overwrites_a_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    """Refused, with what --resume true would do: continue a stopped run; nothing, for a finished run or another
    script's (so the line does not send the user to a second refusal)."""
    assert pretrain.main(tiny('--epochs', 1)) == 0
    good = (tmp_path / 'run' / 'ckpt.pt').read_bytes()
    one_line_error(*run_cli(pretrain.main, tiny('--epochs', 1), capsys, monkeypatch),
                   'already holds a finished run (results.json is beside it): choose another --out_dir, or train it '
                   'further with --resume true --epochs N')
    os.rename(tmp_path / 'run' / 'results.json', tmp_path / 'results.json')  # as a run stopped before its end
    one_line_error(*run_cli(pretrain.main, tiny('--epochs', 1), capsys, monkeypatch), 'already holds a checkpoint',
                   'pass --resume true to continue that run')
    import finetune
    one_line_error(*run_cli(finetune.main, script_argv(finetune, tiny('--epochs', 1)), capsys, monkeypatch,
                            script='finetune.py'), 'already holds a pretrain.py run: choose another --out_dir')
    assert (tmp_path / 'run' / 'ckpt.pt').read_bytes() == good


def test_resume_with_contradicting_architecture_is_refused(tiny, tmp_path, capsys, monkeypatch):
    assert pretrain.main(tiny('--epochs', 1)) == 0
    one_line_error(*run_cli(pretrain.main, tiny('--resume', 'true', '--model', 'vit_tiny'), capsys, monkeypatch),
                   'contradicts the checkpoint', 'model')
    # a non-architecture change is allowed and reported
    assert pretrain.main(tiny('--resume', 'true', '--epochs', 2)) == 0


def _hold_the_lock(out, ready, release):
    common.lock_out_dir(out, 'finetune')
    ready.set()
    release.wait(120)


def test_two_runs_in_one_out_dir_are_refused(tiny, tmp_path, capsys, monkeypatch):
    """Another process holds the out_dir: the second run names it (from /proc/locks) and changes nothing."""
    import multiprocessing
    ctx = multiprocessing.get_context('fork')
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_the_lock, args=(str(tmp_path / 'run'), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        before = snapshot(tmp_path / 'run')
        one_line_error(*run_cli(pretrain.main, tiny('--epochs', 1), capsys, monkeypatch), 'is in use by',
                       f'(pid {holder.pid})', 'wait for it or choose another --out_dir')
        assert snapshot(tmp_path / 'run') == before == {}, "the refused run wrote into the folder"
    finally:
        release.set()
        holder.join(60)
    # the holder is gone, its lock with it: the folder is free again
    common.unlock_out_dir(common.lock_out_dir(str(tmp_path / 'run'), 'pretrain'), str(tmp_path / 'run'))


def _race_for_the_lock(out, barrier, results):
    barrier.wait()  # both processes ask at the same instant
    try:
        common.lock_out_dir(out, 'race')
        results.put('got it')
        time.sleep(0.1)  # hold it while the other one asks (both start at the barrier)
    except common.UserError:
        results.put('refused')


def test_the_lock_is_atomic_under_simultaneous_starts(tmp_path):
    import multiprocessing
    ctx = multiprocessing.get_context('fork')
    for trial in range(24):
        out, barrier, results = str(tmp_path / f'race{trial}'), ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_race_for_the_lock, args=(out, barrier, results)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert sorted(results.get(timeout=5) for _ in range(2)) == ['got it', 'refused'], f"trial {trial}"


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    common.save_atomic({'kind': 'pretrain', 'model': {}, 'v': 1}, path)
    real = torch.save

    def dies_halfway(obj, f, *a, **k):
        f.write(b'PK partial')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', dies_halfway)
    with pytest.raises(common.UserError, match=r'No space left on device\); the previous ckpt.pt is intact'):
        common.save_atomic({'kind': 'pretrain', 'model': {}, 'v': 2}, path)
    monkeypatch.setattr(torch, 'save', real)
    assert torch.load(path, weights_only=True)['v'] == 1, "the good checkpoint was damaged"
    assert os.listdir(tmp_path) == ['ckpt.pt'], "a temporary file was left behind"


# --- the second catalogue: every value checked before anything runs, and nothing lost -----------------------

@pytest.mark.parametrize('extra, needles', [
    (('--accum_steps', -1), ['--accum_steps must be an integer >= 1, got -1']),
    (('--batch_size', 0), ['--batch_size must be an integer >= 1, got 0']),
    (('--epochs', 0), ['--epochs must be an integer >= 1, got 0']),
    (('--lr', 'nan'), ['--lr must be a finite number > 0', 'got nan']),
    (('--lr', -1e-3), ['--lr must be a finite number > 0']),
    (('--beta2', 1.0), ['--beta2 must be a number in [0, 1), got 1.0']),
    (('--weight_decay', 'inf'), ['--weight_decay must be a finite number >= 0']),
    (('--ckpt_every', 0), ['--ckpt_every must be an integer >= 1, got 0']),
    (('--picture_every', 0), ['--picture_every must be an integer >= 1, got 0']),
    (('--val_images', 0), ['--val_images must be an integer >= 1, got 0']),
    (('--calib_batches', 0), ['--calib_batches must be an integer >= 1, got 0']),
    (('--device', 'gpu0'), ["--device must be auto, cpu, cuda or cuda:N, got 'gpu0'"]),
    (('--dataset', ''), ["--dataset must be one of tin, cub, demo, synthetic, got ''"]),
    (('--seed', -1), ['--seed must be an integer in [0, 2^63), got -1']),
    (('--mask', 0.99), ['mask ratio (--mask) 0.99 leaves no visible patch on a 4x4 patch grid']),
    (('--warmup_epochs', 3), ['--warmup_epochs 3 is not shorter than --epochs 1']),
    (('--weighting', 'uncertainty'), ['--weighting uncertainty mixes the pixel and the perceptual loss', '--alpha 0']),
])
def test_bad_value_rows(extra, needles, tiny, tmp_path, capsys, monkeypatch):
    one_line_error(*run_cli(pretrain.main, tiny('--epochs', 1, *extra), capsys, monkeypatch), *needles)
    assert not os.path.exists(tmp_path / 'run'), 'a bad value must be refused before anything is written'


def test_help_row(capsys, monkeypatch):
    code, err = run_cli(pretrain.main, ['--help'], capsys, monkeypatch)
    assert code == 0 and not err


def test_finished_run_is_never_rewritten_row(tiny, tmp_path, capsys, monkeypatch):
    assert pretrain.main(tiny('--epochs', 1)) == 0
    out = tmp_path / 'run'
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    one_line_error(*run_cli(pretrain.main, tiny('--resume', 'true'), capsys, monkeypatch),
                   'is a finished run of 1 epochs', '--epochs N with N > 1')
    # a resume may not change the batch: the stored step counts batches of the old size
    one_line_error(*run_cli(pretrain.main, tiny('--resume', 'true', '--epochs', 2, '--batch_size', 64), capsys, monkeypatch),
                   'batch_size=32 in the checkpoint vs 64')
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before, "a refused resume changed a file"


def test_out_of_memory_row(tiny, tmp_path, capsys, monkeypatch):
    def too_big(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(M, 'build_mae', too_big)
    one_line_error(*run_cli(pretrain.main, tiny('--epochs', 1), capsys, monkeypatch),
                   'out of memory', 'smaller --batch_size', '--accum_steps')
    nothing_written(tmp_path / 'run')


def test_full_disk_while_saving_row(tiny, tmp_path, capsys, monkeypatch):
    assert pretrain.main(tiny('--epochs', 1, '--ckpt_every', 1)) == 0
    good = (tmp_path / 'run' / 'ckpt.pt').read_bytes()

    def disk_full(obj, f, *a, **k):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', disk_full)
    one_line_error(*run_cli(pretrain.main, tiny('--resume', 'true', '--epochs', 2), capsys, monkeypatch),
                   'No space left on device', 'the previous ckpt.pt is intact')
    assert (tmp_path / 'run' / 'ckpt.pt').read_bytes() == good
    assert not [f for f in os.listdir(tmp_path / 'run') if '.tmp.' in f]


def test_download_into_a_file_row(tmp_path, capsys, monkeypatch):
    (tmp_path / 'a_file').write_text('x')
    code, err = run_cli(pretrain.main, ['--dataset', 'tin', '--download', 'true', '--data_dir', tmp_path / 'a_file',
                                        '--out_dir', tmp_path / 'o'], capsys, monkeypatch)
    one_line_error(code, err, 'cannot download into', 'choose a writable --data_dir')


def test_malformed_model_config_row(pre, tmp_path, capsys, monkeypatch):
    import finetune
    ck = torch.load(pre, weights_only=True)
    for bad, needle in (({'bogus_field': 1}, "stored model config is missing or malformed (no img_size;"),
                        (None, "is damaged: its 'model_config' should be a dict of the model's sizes, but holds None")):
        ck['model_config'] = bad
        path = tmp_path / 'odd.pt'
        torch.save(ck, path)
        code, err = run_cli(finetune.main, ['--ckpt', path, '--dataset', 'demo', '--out_dir', tmp_path / 'ft'],
                            capsys, monkeypatch, script='finetune.py')
        one_line_error(code, err, str(path), needle)
        nothing_written(tmp_path / 'ft')


@pytest.mark.parametrize('script', ['finetune', 'probe', 'evaluate'])
def test_weights_that_do_not_fit_the_stored_architecture_row(script, pre, tmp_path, capsys, monkeypatch):
    """A checkpoint whose weights lost a tensor or gained one: each script that loads an encoder names both keys."""
    module = importlib.import_module(script)
    ck = torch.load(pre, weights_only=True)
    del ck['model']['blocks.0.attn.qkv.weight']
    ck['model']['extra.weight'] = torch.zeros(2)
    torch.save(ck, tmp_path / 'damaged.pt')
    argv = ['--ckpt', tmp_path / 'damaged.pt', '--dataset', 'demo', '--out_dir', tmp_path / 'out']
    code, err = run_cli(module.main, argv, capsys, monkeypatch, script=f'{script}.py')
    one_line_error(code, err, 'damaged.pt does not fit this model', "missing keys ['blocks.0.attn.qkv.weight']",
                   "unexpected keys ['extra.weight']")
    nothing_written(tmp_path / 'out')


def test_evaluation_of_another_checkpoint_is_never_replaced_row(pre, tmp_path, capsys, monkeypatch):
    import evaluate
    out = tmp_path / 'ev'
    os.makedirs(out)
    (out / 'eval.json').write_text(json.dumps({'checkpoint_id': '/elsewhere/ckpt.pt at step 8'}))
    code, err = run_cli(evaluate.main, ['--ckpt', pre, '--dataset', 'demo', '--out_dir', out], capsys, monkeypatch,
                        script='evaluate.py')
    one_line_error(code, err, 'holds an evaluation of another checkpoint', '/elsewhere/ckpt.pt')
    assert sorted(os.listdir(out)) == ['eval.json']


def test_more_evaluation_workers_than_cores_row(pre, tmp_path, capsys, monkeypatch):
    import evaluate
    code, err = run_cli(evaluate.main, ['--ckpt', pre, '--workers', 10_000, '--out_dir', tmp_path / 'ev'], capsys,
                        monkeypatch, script='evaluate.py')
    one_line_error(code, err, f'--workers must be an integer from 0 to the {os.cpu_count()} CPU cores', 'got 10000')
    assert not os.path.exists(tmp_path / 'ev')


# --- the third catalogue: foreign files, a lock without a gap, stops at the edges, damaged checkpoints, lost output,
# --- contradicting values, messages that blame the right thing ------------------------------------------------------

def snapshot(folder):
    """{path under folder: sha256 (or the target of a link)} of every file in it: the 'nothing changed' check."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = ('link ' + os.readlink(path) if os.path.islink(path) else
                                                    hashlib.sha256(open(path, 'rb').read()).hexdigest())
    return found


def without_log(files):
    """A snapshot without log.jsonl, which a resumed run appends to before it fails."""
    return {k: v for k, v in files.items() if k != 'log.jsonl'}


def cli_run(main, argv, capsys, monkeypatch, script='pretrain.py'):
    """run_cli that also returns the stdout lines: (exit code, stdout lines, stderr lines)."""
    monkeypatch.setattr(sys, 'argv', [script] + [str(a) for a in argv])
    with pytest.raises(SystemExit) as exit_info:
        common.cli(main)
    out, err = capsys.readouterr()
    return exit_info.value.code, out.strip().splitlines(), err.strip().splitlines()


def dead_pid():
    """The id of a process that has ended."""
    proc = subprocess.Popen(['true'])
    proc.wait()
    return proc.pid


def test_a_run_removes_only_temporary_files_it_can_prove_are_its_own(tiny, tmp_path, capsys, monkeypatch):
    """The out_dir clean-up removes a temporary file only when its name is one of this script's outputs + .tmp. + the
    id of a process that has ended; a user's files that merely look alike, and no lock file, are ever touched."""
    out, gone = tmp_path / 'run', dead_pid()
    os.makedirs(out)
    (tmp_path / 'target').write_text('a file a link points at')
    foreign = {'.lock': 'my own lock file', 'notes.tmp.123': 'my notes', f'data.tmp.{gone}': 'mine too',
               'ckpt.pt.tmp.1': 'a save of a process still alive (pid 1)', f'eval.json.tmp.{gone}': "evaluate.py's",
               f'ckpt.pt.tmp.{gone}.bak': 'my backup', f'ckpt.pt.tmp.{gone}x': 'not a pid'}
    for name, text in foreign.items():
        (out / name).write_text(text)
    os.symlink(tmp_path / 'target', out / f'recon_ep0003.png.tmp.{gone}')  # a link is never ours
    os.makedirs(out / f'recon_ep0002.png.tmp.{gone}')                     # nor a folder
    ours = [f'ckpt.pt.tmp.{gone}', f'results.json.tmp.{gone}', f'recon_ep0001.png.tmp.{gone}.png']
    for name in ours:
        (out / name).write_bytes(b'PK half a save')
    before = snapshot(out)
    code, _, err = cli_run(pretrain.main, tiny('--epochs', 1), capsys, monkeypatch)
    assert code == 0, err
    after = snapshot(out)
    kept = {k: v for k, v in before.items() if k not in ours}
    assert {k: after.get(k) for k in kept} == kept, "a file the run did not write was changed or removed"
    assert os.path.isdir(out / f'recon_ep0002.png.tmp.{gone}')
    assert not [name for name in ours if (out / name).exists()], "a temporary file of a killed save was left"
    assert set(after) - set(before) == {'ckpt.pt', 'curves.png', 'log.jsonl', 'recon_ep0001.png', 'results.json'}


def test_the_lock_is_taken_before_the_folder_is_checked(tiny, tmp_path, capsys, monkeypatch):
    """A second run that starts while the first is between its checks and its first write (here: loading its critic,
    slowly) is refused and changes nothing; it can no longer pass the check first and write later."""
    out, seen = tmp_path / 'run', {}
    real = pretrain.load_critic

    def slow_critic(cfg):
        seen['before'] = snapshot(out)
        second = subprocess.run([sys.executable, os.path.join(ROOT, 'pretrain.py')] + tiny('--epochs', 1, '--subset', 64),
                                cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                                timeout=600)
        seen.update(code=second.returncode, err=second.stderr.strip().splitlines(), after=snapshot(out))
        return real(cfg)
    monkeypatch.setattr(pretrain, 'load_critic', slow_critic)
    code, _, err = cli_run(pretrain.main, tiny('--epochs', 1, '--subset', 64), capsys, monkeypatch)
    assert code == 0, err
    one_line_error(seen['code'], seen['err'], f'out_dir {out} is in use by', f'(pid {os.getpid()})')
    assert seen['code'] == 2 and seen['after'] == seen['before'], "the second run wrote into the folder"


@pytest.mark.parametrize('script, extra, needle', [
    ('pretrain', ('--resume', 'true'), 'no checkpoint at'),
    ('finetune', ('--ckpt', 'TMP'), 'is a directory, not a file'),
    ('probe', ('--ckpt', 'TMP/nothing.pt'), 'does not exist'),
    ('dino', ('--local_crops_number', 2, '--local_crops_size', 12), '--local_crops_size 12 must be a multiple of'),
])
def test_a_run_refused_after_taking_the_lock_leaves_no_folder_behind(script, extra, needle, tiny, tmp_path, capsys,
                                                                     monkeypatch):
    module = importlib.import_module(script)
    extra = [str(a).replace('TMP', str(tmp_path)) for a in extra]
    argv = script_argv(module, tiny('--epochs', 1, *extra, out='new/deeper/run'))
    one_line_error(*run_cli(module.main, argv, capsys, monkeypatch, script=f'{script}.py'), needle)
    assert not (tmp_path / 'new').exists(), "the refused run left the folders it created"


def test_a_stop_signal_before_the_loop_ends_the_run_at_once_with_nothing_to_save(tiny, tmp_path, capsys, monkeypatch):
    """SIGTERM while a run prepares (decoding a dataset, the kNN floor: minutes for TIN's first decode) ends it at
    once, exit 143 and one line: there is nothing to save yet, and the same command starts it again."""
    import evaluate

    def slow_floor(*args, **kwargs):  # the signal arrives in the middle of the kNN floor
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(20)
        raise AssertionError("the stop signal did not end the run")
    monkeypatch.setattr(evaluate, 'knn_top1', slow_floor)
    t0 = time.time()
    code, _, err = cli_run(pretrain.main, tiny('--epochs', 1), capsys, monkeypatch)
    assert code == 143 and err == ['pretrain.py: stopped by SIGTERM'] and time.time() - t0 < 15
    assert not (tmp_path / 'run' / 'ckpt.pt').exists()
    monkeypatch.undo()
    assert pretrain.main(tiny('--epochs', 1)) == 0  # the same command starts it again


def test_sigterm_at_the_last_step_then_the_printed_command_finishes_the_run(tiny, tmp_path, straight, capsys,
                                                                           monkeypatch):
    """SIGTERM in the last step saves a checkpoint at the end of the schedule, before the end-of-run work; the
    printed command (its path quoted: it has a space) finishes the run, with the uninterrupted run's weights."""
    out, real = tmp_path / 'stopped run', common.get_lr

    def lr_then_sigterm(step, total_steps, *a):
        if step == total_steps - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, total_steps, *a)
    with monkeypatch.context() as m:
        m.setattr(common, 'get_lr', lr_then_sigterm)
        code, stdout, err = cli_run(pretrain.main, tiny(*RUN, out='stopped run'), capsys, monkeypatch)
    assert code == 128 + signal.SIGTERM, err
    assert torch.load(out / 'ckpt.pt', weights_only=True)['step'] == 24 and not (out / 'results.json').exists()
    command = shlex.split(next(line for line in stdout if 'continue with: ' in line).split('continue with: ')[1])
    assert command[:2] == ['python', 'pretrain.py'] and command[command.index('--out_dir') + 1] == str(out)
    code, stdout, err = cli_run(pretrain.main, command[2:], capsys, monkeypatch)
    assert code == 0, err
    assert any('finishing it' in line for line in stdout)
    assert json.load(open(out / 'results.json'))['steps'] == 24 and (out / 'recon_ep0003.png').exists()
    assert same_weights(straight, weights(out))
    one_line_error(*run_cli(pretrain.main, command[2:], capsys, monkeypatch), 'is a finished run of 3 epochs')


KILLED_WHILE_THE_FINAL_PICTURE_IS_WRITTEN = """
import os, signal, sys
import common, evaluate, pretrain
real = evaluate.reconstruction_grid

def killed_mid_write(mae, imgs, mask, masking, seed, path, title):
    if path.endswith('recon_ep0001.png'):  # the final picture of a 1-epoch run
        open(f"{path}.tmp.{os.getpid()}.png", 'wb').write(b'half a picture')
        os.kill(os.getpid(), signal.SIGKILL)
    return real(mae, imgs, mask, masking, seed, path, title)
evaluate.reconstruction_grid = killed_mid_write
sys.argv[0] = 'pretrain.py'
common.cli(pretrain.main)
"""


def test_a_kill_between_the_final_checkpoint_and_results_json_then_resume_finishes(tiny, tmp_path, capsys,
                                                                                   monkeypatch):
    out = tmp_path / 'killed'
    run = ('--epochs', 1, '--subset', 64, '--picture_every', 100)  # 2 steps
    killed = subprocess.run([sys.executable, '-c', KILLED_WHILE_THE_FINAL_PICTURE_IS_WRITTEN] + tiny(*run, out='killed'),
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    final = torch.load(out / 'ckpt.pt', weights_only=True)
    assert final['step'] == 2 and not (out / 'results.json').exists()
    assert [f for f in os.listdir(out) if '.tmp.' in f], "the kill left no half-written picture (the test is wrong)"
    # reproduce.sh's rule: no results.json, a ckpt.pt: resume
    code, _, err = cli_run(pretrain.main, tiny(*run, '--resume', 'true', out='killed'), capsys, monkeypatch)
    assert code == 0, err
    assert (out / 'results.json').exists() and (out / 'recon_ep0001.png').exists()
    assert not [f for f in os.listdir(out) if '.tmp.' in f], "the killed save's temporary file was left"
    assert same_weights(final['model'], weights(out)), "the resume trained on past the end of the schedule"


@pytest.mark.parametrize('script', ['finetune', 'dino'])
def test_sigterm_at_the_last_step_of_finetune_and_dino_then_resume_finishes(script, tiny, tmp_path, capsys,
                                                                            monkeypatch):
    module, real = importlib.import_module(script), common.get_lr

    def lr_then_sigterm(step, total_steps, *a):
        if step == total_steps - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, total_steps, *a)
    argv = script_argv(module, tiny('--epochs', 1, '--subset', 64, '--knn_bank', 0))
    with monkeypatch.context() as m:
        m.setattr(common, 'get_lr', lr_then_sigterm)
        code, stdout, err = cli_run(module.main, argv, capsys, monkeypatch, script=f'{script}.py')
    assert code == 128 + signal.SIGTERM, err
    assert not (tmp_path / 'run' / 'results.json').exists()
    command = shlex.split(next(line for line in stdout if 'continue with: ' in line).split('continue with: ')[1])
    code, stdout, err = cli_run(module.main, command[2:], capsys, monkeypatch, script=f'{script}.py')
    assert code == 0, err
    results = json.load(open(tmp_path / 'run' / 'results.json'))
    assert results['step' if script == 'finetune' else 'steps'] == 2
    if script == 'finetune':  # the final evaluation ran at the last step
        assert results['history'][-1]['step'] == 2


# damaged checkpoints: (what is changed in a copy of a pretrain.py checkpoint, what the line says)
DAMAGED = {
    'no_optimizer': (lambda ck: ck.pop('optimizer'), "it has no 'optimizer', which a resume needs"),
    'no_rng': (lambda ck: ck.pop('rng'), "it has no 'rng'"),
    'no_step': (lambda ck: ck.pop('step'), "it has no 'step'"),
    'no_scaler': (lambda ck: ck.pop('scaler'), "it has no 'scaler'"),
    'rng_not_bytes': (lambda ck: ck.update(rng={'torch': torch.zeros(3)}), "its 'rng' should be the RNG states"),
    'weights_not_tensors': (lambda ck: ck['model'].update({'blocks.0.norm1.weight': [1.0]}),
                            "its 'model' should be a dict of weight tensors, but holds 'blocks.0.norm1.weight': list"),
    'model_config_nan': (lambda ck: ck['model_config'].update(mlp_ratio=float('nan')),
                         'mlp_ratio=nan, not a finite number'),
    'model_config_no_depth': (lambda ck: ck['model_config'].pop('depth'),
                              'stored model config is missing or malformed (no depth)'),
    'model_config_wrong_type': (lambda ck: ck['model_config'].update(depth='7'), "depth='7', not an integer"),
    'config_nan': (lambda ck: ck['config'].update(lr=float('nan')),
                   'its stored config has lr=nan, but --lr must be a finite number > 0, got nan; pass --lr VALUE'),
    'config_no_batch_size': (lambda ck: ck['config'].pop('batch_size'), 'its stored config has no batch_size'),
    'config_wrong_type': (lambda ck: ck['config'].update(seed=1.5), '--seed must be an integer, got 1.5'),
    # parts that do not fit the run they resume (found once the model, optimizer and data are built)
    'weight_of_another_shape': (lambda ck: ck['model'].update({'decoder_pred.weight': torch.zeros(3, 3)}),
                                'shape mismatch decoder_pred.weight: (3, 3)'),
    'weight_missing': (lambda ck: ck['model'].pop('decoder_pred.weight'), "missing keys ['decoder_pred.weight']"),
    'optimizer_groups_cut': (lambda ck: ck['optimizer'].update(param_groups=ck['optimizer']['param_groups'][:1]),
                             'different number of parameter groups'),
    'optimizer_moment_of_another_shape': (lambda ck: ck['optimizer']['state'][0].update(exp_avg=torch.zeros(3)),
                                          "the optimizer's 'exp_avg' has shape (3,)"),
    'rng_of_another_size': (lambda ck: ck['rng'].update(torch=torch.zeros(10, dtype=torch.uint8)),
                            'does not fit this run'),
    'step_not_its_epoch': (lambda ck: ck.update(step=10 ** 6),
                           "its step 1000000 is not its epoch 1 at this run's 2 steps an epoch (64 training images)"),
}


@pytest.mark.parametrize('damage', DAMAGED)
def test_a_damaged_checkpoint_on_resume_is_one_line_naming_it(damage, pre, tmp_path, capsys, monkeypatch):
    change, needle = DAMAGED[damage]
    out = tmp_path / 'run'
    os.makedirs(out)
    ck = torch.load(pre, weights_only=True)
    change(ck)
    torch.save(ck, out / 'ckpt.pt')
    before = snapshot(out)
    code, err = run_cli(pretrain.main, ['--resume', 'true', '--epochs', 2, '--data_dir', tmp_path / 'data',
                                        '--out_dir', out], capsys, monkeypatch)
    one_line_error(code, err, str(out / 'ckpt.pt'), needle)
    assert code == 2 and snapshot(out) == before


@pytest.mark.parametrize('script', ['finetune', 'probe', 'evaluate'])
@pytest.mark.parametrize('damage', ['weights_not_tensors', 'model_config_nan', 'model_config_no_depth',
                                    'model_config_wrong_type'])
def test_a_damaged_ckpt_to_load_is_one_line_naming_it(script, damage, pre, tmp_path, capsys, monkeypatch):
    module, (change, needle) = importlib.import_module(script), DAMAGED[damage]
    ck = torch.load(pre, weights_only=True)
    change(ck)
    torch.save(ck, tmp_path / 'damaged.pt')
    before = snapshot(tmp_path)
    argv = ['--ckpt', tmp_path / 'damaged.pt', '--dataset', 'demo', '--out_dir', tmp_path / 'out']
    code, err = run_cli(module.main, argv, capsys, monkeypatch, script=f'{script}.py')
    one_line_error(code, err, str(tmp_path / 'damaged.pt'), needle)
    assert code == 2 and snapshot(tmp_path) == before and not (tmp_path / 'out').exists()


def test_a_damaged_dino_checkpoint_a_damaged_critic_and_directories_are_one_line(pre, tiny, tmp_path, capsys,
                                                                                  monkeypatch):
    import dino
    import finetune
    ck = torch.load(pre, weights_only=True)
    ck['kind'] = 'dino'  # a DINO run's checkpoint without its student, teacher head and centre
    os.makedirs(tmp_path / 'dino')
    torch.save(ck, tmp_path / 'dino' / 'ckpt.pt')
    # a critic whose stored config has no class count, and one whose weights are not tensors
    torch.save({'kind': 'finetune', 'model': {'features.0.weight': torch.zeros(1)}, 'model_config': {},
                'config': {'arch': 'squeezenet'}}, tmp_path / 'critic.pt')
    torch.save({'kind': 'finetune', 'model': {'features.0.weight': 'zeros'}, 'model_config': {'num_classes': 8},
                'config': {'arch': 'squeezenet'}}, tmp_path / 'critic2.pt')
    os.makedirs(tmp_path / 'odd' / 'ckpt.pt')  # an out_dir whose ckpt.pt is a folder
    before = snapshot(tmp_path)
    one_line_error(*run_cli(dino.main, ['--resume', 'true', '--out_dir', tmp_path / 'dino'], capsys, monkeypatch,
                            script='dino.py'),
                   str(tmp_path / 'dino' / 'ckpt.pt'),
                   "it has no 'student', 'teacher_head', 'center', which a resume needs")
    for critic, needle in (('critic.pt', 'num_classes=None, not an integer >= 1'),
                           ('critic2.pt', "'features.0.weight': str")):
        one_line_error(*run_cli(pretrain.main, tiny('--alpha', 0.5, '--critic', tmp_path / critic), capsys, monkeypatch),
                       str(tmp_path / critic), needle)
    one_line_error(*run_cli(finetune.main, ['--ckpt', tmp_path / 'dino', '--out_dir', tmp_path / 'ft'], capsys,
                            monkeypatch, script='finetune.py'),
                   f'checkpoint {tmp_path / "dino"} is a directory, not a file')
    one_line_error(*run_cli(pretrain.main, tiny('--epochs', 1, out='odd'), capsys, monkeypatch),
                   f'{tmp_path / "odd" / "ckpt.pt"} is a directory, not a checkpoint')
    assert snapshot(tmp_path) == before and not (tmp_path / 'ft').exists() and not (tmp_path / 'run').exists()


@pytest.mark.parametrize('where', ['closed_pipe', 'full_device'])
def test_losing_stdout_never_loses_the_run(where, tiny, tmp_path):
    """stdout piped into `head` (EPIPE) or on a full device (ENOSPC, /dev/full): one line on stderr, no traceback,
    and the run goes on to its checkpoint, results and complete log."""
    argv = [sys.executable, os.path.join(ROOT, 'pretrain.py')] + tiny('--epochs', 1, '--subset', 64)
    env = dict(os.environ, PYTHONPATH=ROOT)
    if where == 'closed_pipe':
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.stdout.readline()
        proc.stdout.close()  # what `| head -1` does
        err = proc.stderr.read()
        proc.wait(600)
    else:
        if not os.path.exists('/dev/full'):
            pytest.skip('no /dev/full on this system')
        with open('/dev/full', 'w') as full:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=full, stderr=subprocess.PIPE, text=True)
            err = proc.communicate(timeout=600)[1]
    assert proc.returncode == 0, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and 'pretrain.py: stdout is' in lines[0] and 'the run goes on' in lines[0], err[-2000:]
    assert ('closed by its reader' if where == 'closed_pipe' else 'No space left on device') in lines[0]
    out = tmp_path / 'run'
    assert (out / 'results.json').exists() and (out / 'ckpt.pt').exists()
    log = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert [r['step'] for r in log if r['event'] == 'train'] == [1, 2]


WITH_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
import common, pretrain
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as one on a full disk does
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv[0] = 'pretrain.py'
common.cli(pretrain.main)
"""


@pytest.mark.parametrize('full_at', ['log', 'checkpoint'])
def test_a_write_that_fails_is_one_line_and_keeps_every_earlier_file(full_at, tiny, finished):
    """Real failing writes (a file size limit: the kernel refuses the bytes past it, as on a full disk): appending to
    log.jsonl, or writing the checkpoint. One line, exit 2, and every file as it was (the log without a half line)."""
    out, before = finished, snapshot(finished)
    limit = os.path.getsize(out / 'log.jsonl') + 100 if full_at == 'log' else 1_000_000  # ckpt.pt is ~15 MB
    argv = [sys.executable, '-c', WITH_A_FILE_SIZE_LIMIT, str(limit)] + tiny('--resume', 'true', '--epochs', 4)
    proc = subprocess.run(argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    if full_at == 'log':
        assert f"could not append to {out / 'log.jsonl'} (File too large); its earlier lines are intact" in lines[0]
        assert snapshot(out) == before
    else:
        assert f"could not write {out / 'ckpt.pt'} (File too large); the previous ckpt.pt is intact" in lines[0]
        assert without_log(snapshot(out)) == without_log(before)


def test_a_full_disk_inside_torch_save_is_one_line_and_other_runtime_errors_stay_bugs(tiny, finished, capsys,
                                                                                      monkeypatch):
    """torch.save's zip writer reports a full disk as a RuntimeError (what it raises writing to /dev/full by path)."""
    out, before = finished, snapshot(finished)

    def zip_writer_fails(obj, f, *a, **k):
        f.write(b'PK\x03\x04 half')
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')
    monkeypatch.setattr(torch, 'save', zip_writer_fails)
    one_line_error(*run_cli(pretrain.main, tiny('--resume', 'true', '--epochs', 4), capsys, monkeypatch),
                   f"could not write {out / 'ckpt.pt'} (the write failed, a full disk?",
                   'the previous ckpt.pt is intact')
    assert without_log(snapshot(out)) == without_log(before)

    def a_bug(obj, f, *a, **k):
        raise RuntimeError('a bug in the code')
    monkeypatch.setattr(torch, 'save', a_bug)
    with pytest.raises(RuntimeError, match='a bug in the code'):
        common.save_atomic({'model': {}}, str(out / 'other.pt'))
    assert not [f for f in os.listdir(out) if '.tmp.' in f or f == 'other.pt']


@pytest.mark.parametrize('script, extra, needles', [
    ('pretrain', ('--min_lr', 1e-3), ['--min_lr 0.001 is above the peak lr (--lr 0.0005 x --batch_size 32 / 128)',
                                      'at most the peak lr']),
    ('finetune', ('--min_lr', 1e-3), ['--min_lr 0.001 is above the peak lr', 'the recipe']),
    ('dino', ('--min_lr', 1e-3), ['--min_lr 0.001 is above the peak lr (--lr 0.0005 x --batch_size 32 / 256)']),
    ('dino', ('--warmup_teacher_temp_epochs', 5), ["--warmup_teacher_temp_epochs 5 is longer than the run's 1 epoch",
                                                  'choose at most 1']),
    ('finetune', ('--arch', 'squeezenet', '--img_size', 16),
     ['--img_size 16 is too small for SqueezeNet 1.1', '--img_size 17 or more']),
    ('pretrain', ('--critic', 'out/critic/ckpt.pt'), ['--critic out/critic/ckpt.pt is unused with --alpha 0']),
    ('pretrain', ('--accum_steps', 3), ['--batch_size 32 does not split into 1 process x --accum_steps 3',
                                        'a multiple of 3 (e.g. 30)']),
    ('pretrain', ('--alpha', 0.5, '--critic', 'c.pt', '--img_size', 4, '--patch_size', 2),
     ['img_size 4 is too small for the SMAE critic', '--img_size 5 or more']),
])
def test_values_that_contradict_each_other_are_refused_before_anything_is_written(script, extra, needles, tiny,
                                                                                 tmp_path, capsys, monkeypatch):
    module = importlib.import_module(script)
    argv = script_argv(module, tiny('--epochs', 1, *extra))
    one_line_error(*run_cli(module.main, argv, capsys, monkeypatch, script=f'{script}.py'), *needles)
    assert not (tmp_path / 'run').exists()


def test_the_smallest_images_the_squeezenets_take_are_the_refusals_thresholds():
    import finetune
    net = M.build_squeezenet(4).eval()
    with torch.no_grad():
        net(torch.zeros(1, 3, finetune.SQUEEZENET_MIN_SIZE, finetune.SQUEEZENET_MIN_SIZE))
        net.features[:5](torch.zeros(1, 3, pretrain.CRITIC_MIN_SIZE, pretrain.CRITIC_MIN_SIZE))  # the SMAE critic
        with pytest.raises(RuntimeError):
            net(torch.zeros(1, 3, finetune.SQUEEZENET_MIN_SIZE - 1, finetune.SQUEEZENET_MIN_SIZE - 1))
        with pytest.raises(RuntimeError):
            net.features[:5](torch.zeros(1, 3, pretrain.CRITIC_MIN_SIZE - 1, pretrain.CRITIC_MIN_SIZE - 1))


def test_on_resume_the_rules_between_values_hold_for_the_stored_config(pre, tmp_path, capsys, monkeypatch):
    """A resume's config is the checkpoint's with the given names changed: the rules between values apply to that
    (here the stored lr 5e-4 at batch 32, a peak of 1.25e-4), not to the script's defaults."""
    out = tmp_path / 'run'
    os.makedirs(out)
    shutil.copy(pre, out / 'ckpt.pt')
    before = snapshot(out)
    one_line_error(*run_cli(pretrain.main, ['--resume', 'true', '--epochs', 2, '--min_lr', 2e-4, '--out_dir', out],
                            capsys, monkeypatch),
                   '--min_lr 0.0002 is above the peak lr (--lr 0.0005 x --batch_size 32 / 128)',
                   f"(with the config stored in {out / 'ckpt.pt'})")
    assert snapshot(out) == before


@pytest.mark.parametrize('script', ['finetune', 'probe'])
def test_an_img_size_the_checkpoint_cannot_take_is_the_users_value_not_a_damaged_file(script, pre, tmp_path, capsys,
                                                                                     monkeypatch):
    module = importlib.import_module(script)
    argv = ['--ckpt', pre, '--img_size', 30, '--dataset', 'demo', '--out_dir', tmp_path / 'out']
    code, err = run_cli(module.main, argv, capsys, monkeypatch, script=f'{script}.py')
    one_line_error(code, err, f'--img_size 30 does not fit the model stored in {pre}',
                   'img_size 30 is not divisible by patch_size 8')
    assert 'malformed' not in err[0] and 'damaged' not in err[0] and not (tmp_path / 'out').exists()


def test_out_of_memory_with_a_large_image_size_names_the_image_size(tiny, tmp_path, capsys, monkeypatch):
    def too_big(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(M, 'build_mae', too_big)
    one_line_error(*run_cli(pretrain.main, tiny('--epochs', 1, '--img_size', 128), capsys, monkeypatch),
                   "--img_size 128 is above the preset's 64", 'use a smaller --img_size, or a smaller --batch_size')
    assert not (tmp_path / 'run').exists()


# --- the fourth pass: files of our names that we did not write, a finished run trained further, resume states that
# --- do not fit ---------------------------------------------------------------------------------------------------

def test_a_fresh_run_never_overwrites_files_of_its_names_that_it_did_not_write(tiny, tmp_path, capsys, monkeypatch):
    """A folder holding results.json or curves.png that no pretrain.py run wrote (no log.jsonl of pretrain.py beside
    them) is refused, unchanged; beside an earlier pretrain.py run's own log (a run stopped before its first
    checkpoint) they are that run's, and a fresh run goes on. Files of other names are never touched."""
    out = tmp_path / 'run'
    os.makedirs(out)
    for name in ('results.json', 'curves.png', 'notes.txt'):
        (out / name).write_text('mine')
    before = snapshot(out)
    one_line_error(*run_cli(pretrain.main, tiny('--epochs', 1, '--subset', 64), capsys, monkeypatch),
                   f"out_dir {out} holds curves.png, results.json, which pretrain.py did not write (no pretrain.py "
                   f"log.jsonl beside them)", 'choose another --out_dir')
    assert snapshot(out) == before
    (out / 'log.jsonl').write_text(json.dumps(dict(event='start', script='finetune')) + '\n')
    one_line_error(*run_cli(pretrain.main, tiny('--epochs', 1, '--subset', 64), capsys, monkeypatch),
                   "(its log.jsonl is finetune.py's)")
    (out / 'log.jsonl').write_text(json.dumps(dict(event='start', script='pretrain')) + '\n')
    assert pretrain.main(tiny('--epochs', 1, '--subset', 64)) == 0
    assert (out / 'notes.txt').read_text() == 'mine' and json.load(open(out / 'results.json'))['steps'] == 2


def test_evaluate_never_replaces_files_of_its_names_that_it_did_not_write_row(pre, tmp_path, capsys, monkeypatch):
    import evaluate
    out = tmp_path / 'figs'
    os.makedirs(out)
    (out / 'recon.png').write_text('my figure')
    (out / 'eval.md').write_text('my notes')
    before = snapshot(out)
    code, err = run_cli(evaluate.main, ['--ckpt', pre, '--probe_epochs', 0, '--out_dir', out], capsys, monkeypatch,
                        script='evaluate.py')
    one_line_error(code, err, f"out_dir {out} holds files evaluate.py did not write (eval.md, recon.png without "
                              f"evaluate.py's log.jsonl)")
    assert snapshot(out) == before


def test_a_finished_run_trained_further_and_stopped_at_its_last_step_is_finished_by_the_printed_command(
        tiny, finished, capsys, monkeypatch):
    """--epochs 4 on a finished 3-epoch run removes its results.json as it writes its first checkpoint (it would no
    longer describe ckpt.pt, and reproduce.sh takes a results.json for a finished step; a resume that fails before,
    e.g. on a full disk, leaves the finished run as it was: test_a_write_that_fails_...); SIGTERM in the new last
    step then leaves a run that the printed command finishes."""
    real = common.get_lr

    def lr_then_sigterm(step, total_steps, *a):
        if step == total_steps - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, total_steps, *a)
    with monkeypatch.context() as m:
        m.setattr(common, 'get_lr', lr_then_sigterm)
        code, stdout, err = cli_run(pretrain.main, tiny('--resume', 'true', '--epochs', 4), capsys, monkeypatch)
    assert code == 128 + signal.SIGTERM, err
    assert any('training the finished 3-epoch run on to 4 epochs; its results.json is removed at the first '
               'checkpoint' in line for line in stdout), stdout
    assert torch.load(finished / 'ckpt.pt', weights_only=True)['step'] == 32
    assert not (finished / 'results.json').exists()
    command = shlex.split(next(line for line in stdout if 'continue with: ' in line).split('continue with: ')[1])
    code, stdout, err = cli_run(pretrain.main, command[2:], capsys, monkeypatch)
    assert code == 0, err
    assert any('finishing it' in line for line in stdout)
    assert json.load(open(finished / 'results.json'))['steps'] == 32 and (finished / 'recon_ep0004.png').exists()


def test_on_resume_a_warmup_as_long_as_the_run_and_a_batch_that_does_not_split_are_refused(pre, tmp_path, capsys,
                                                                                          monkeypatch):
    """configure's rules between values, on the resumed run's own epochs and batch (the batch cannot change)."""
    out = tmp_path / 'run'
    os.makedirs(out)
    shutil.copy(pre, out / 'ckpt.pt')
    before = snapshot(out)
    resume = ['--resume', 'true', '--out_dir', out]  # (the stored run has 1 epoch)
    one_line_error(*run_cli(pretrain.main, resume + ['--warmup_epochs', 5], capsys, monkeypatch),
                   "--warmup_epochs 5 is not shorter than the run's 1 epoch", 'choose fewer than 1')
    one_line_error(*run_cli(pretrain.main, resume + ['--epochs', 2, '--accum_steps', 3], capsys, monkeypatch),
                   "the run's batch of 32 does not split into 1 process x --accum_steps 3",
                   'choose --accum_steps from 1, 2, 4, 8, 16, 32')
    assert snapshot(out) == before
