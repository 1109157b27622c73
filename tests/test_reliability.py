"""Reliability: a killed run loses nothing, bad input gets one clear line and a non-zero exit, no good file is
overwritten. Each row of the README's bad-input table has a test here (or in the test file named beside it)."""
import importlib
import json
import os
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
def straight(tmp_path_factory):
    """The uninterrupted reference run, shared by the kill tests."""
    from conftest import TINY
    out = tmp_path_factory.mktemp('straight')
    argv = TINY + ['--out_dir', str(out), '--data_dir', str(out / 'data')] + [str(a) for a in RUN]
    assert pretrain.main(argv) == 0
    return weights(out)


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
    assert pretrain.main(tiny('--epochs', 1)) == 0
    good = (tmp_path / 'run' / 'ckpt.pt').read_bytes()
    one_line_error(*run_cli(pretrain.main, tiny('--epochs', 1), capsys, monkeypatch), 'already holds a checkpoint', '--resume true')
    assert (tmp_path / 'run' / 'ckpt.pt').read_bytes() == good


def test_resume_with_contradicting_architecture_is_refused(tiny, tmp_path, capsys, monkeypatch):
    assert pretrain.main(tiny('--epochs', 1)) == 0
    one_line_error(*run_cli(pretrain.main, tiny('--resume', 'true', '--model', 'vit_tiny'), capsys, monkeypatch),
                   'contradicts the checkpoint', 'model')
    # a non-architecture change is allowed and reported
    assert pretrain.main(tiny('--resume', 'true', '--epochs', 2)) == 0


def test_two_runs_in_one_out_dir_are_refused(tiny, tmp_path, capsys, monkeypatch):
    held = common.lock_out_dir(str(tmp_path / 'run'), 'finetune')  # another run holds the out_dir
    one_line_error(*run_cli(pretrain.main, tiny('--epochs', 1), capsys, monkeypatch), 'is in use by finetune (pid')
    assert not (tmp_path / 'run' / 'ckpt.pt').exists()
    common.unlock_out_dir(held, str(tmp_path / 'run'))
    # what a killed run leaves (its .lock note, a half-written save) does not block the next one, which cleans up
    (tmp_path / 'run' / '.lock').write_text("pretrain (pid 999999999)")
    (tmp_path / 'run' / 'ckpt.pt.tmp.999999999').write_bytes(b'PK partial')
    assert pretrain.main(tiny('--epochs', 1)) == 0
    assert sorted(os.listdir(tmp_path / 'run')) == ['ckpt.pt', 'curves.png', 'log.jsonl', 'recon_ep0001.png', 'results.json']


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
    assert common.load_checkpoint(path)['v'] == 1, "the good checkpoint was damaged"
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
    for bad in ({'bogus_field': 1}, None):
        ck['model_config'] = bad
        path = tmp_path / 'odd.pt'
        torch.save(ck, path)
        code, err = run_cli(finetune.main, ['--ckpt', path, '--dataset', 'demo', '--out_dir', tmp_path / 'ft'],
                            capsys, monkeypatch, script='finetune.py')
        one_line_error(code, err, str(path), 'stored model config is missing or malformed')
        nothing_written(tmp_path / 'ft')


@pytest.mark.parametrize('script', ['finetune', 'probe', 'evaluate'])
def test_weights_that_do_not_fit_the_stored_architecture_row(script, pre, tmp_path, capsys, monkeypatch):
    """A checkpoint whose weights lost a tensor or gained one: each script that loads an encoder names both keys."""
    module = importlib.import_module(script)
    ck = torch.load(pre, weights_only=True)
    del ck['model']['blocks.0.attn.qkv.weight']
    ck['model']['extra.weight'] = torch.zeros(2)
    torch.save(ck, tmp_path / 'damaged.pt')
    code, err = run_cli(module.main, ['--ckpt', tmp_path / 'damaged.pt', '--dataset', 'demo', '--out_dir', tmp_path / 'out'],
                        capsys, monkeypatch, script=f'{script}.py')
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


def test_sigterm_to_evaluate_ends_its_worker_processes(pre, tmp_path):
    out = tmp_path / 'ev'
    proc = start('evaluate.py', [str(a) for a in ['--ckpt', pre, '--dataset', 'demo', '--workers', 2, '--feature_batch', 8,
                                                  '--probe_epochs', 0, '--use_lpips', 'false', '--out_dir', out]])
    children = []
    t0 = time.time()
    while time.time() - t0 < 120 and len(children) < 2 and proc.poll() is None:
        children = [int(p) for p in open(f'/proc/{proc.pid}/task/{proc.pid}/children').read().split()]
        time.sleep(0.05)
    assert len(children) >= 2, "the pool never started"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    time.sleep(1)
    alive = [c for c in children if os.path.exists(f'/proc/{c}') and open(f'/proc/{c}/stat').read().split()[2] != 'Z']
    assert not alive, f"worker processes {alive} outlived evaluate.py"


def test_more_evaluation_workers_than_cores_row(pre, tmp_path, capsys, monkeypatch):
    import evaluate
    code, err = run_cli(evaluate.main, ['--ckpt', pre, '--workers', 10_000, '--out_dir', tmp_path / 'ev'], capsys,
                        monkeypatch, script='evaluate.py')
    one_line_error(code, err, f'--workers must be an integer from 0 to the {os.cpu_count()} CPU cores', 'got 10000')
    assert not os.path.exists(tmp_path / 'ev')
