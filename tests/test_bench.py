"""bench.py runs (figures are printed, never asserted: speed is measured on a GPU, not in tests): each figure in a
process of its own, written the moment it exists with its warm-up apart and its CUDA-graph status; a per-figure time
limit that ends the figure's whole process group; the profile after warm-up; the summary gpu_check.sh writes; CUDA
graphs proven where a compile mode asks for them."""
import errno
import importlib.util
import json
import os
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

import bench
import common
from test_reliability import one_line_error, run_cli, start

SMALL = ['--device', 'cpu', '--steps', '2', '--warmup', '1', '--img_size', '32', '--patch_size', '8',
         '--batch_sizes', '32', '--dataset', 'demo']


def cmdline(pid):
    try:
        return open(f'/proc/{pid}/cmdline').read()
    except OSError:  # it ended meanwhile
        return ''


def lines(path):
    return [json.loads(line) for line in open(path)]


def test_bench_runs_each_figure_in_its_own_process_and_writes_it_as_it_comes(tmp_path, monkeypatch, capsys):
    started, real_popen = [], subprocess.Popen

    def popen(cmd, **kw):  # record every process bench.py starts
        started.append(cmd)
        return real_popen(cmd, **kw)
    monkeypatch.setattr(subprocess, 'Popen', popen)
    # (every script a figure runs in; the SMAE figure is pretrain.py's step with bench.command's critic, which
    # test_compile.py and test_gpu.py run)
    assert bench.main(SMALL + ['--figures', 'mae,finetune,dino,loader', '--out_dir', str(tmp_path)]) == 0
    # MAE, fine-tuning, DINO and the loader: four fresh processes, so no figure comes from a recompiled graph
    assert [cmd[1].rsplit('/', 1)[1] for cmd in started] == ['pretrain.py', 'finetune.py', 'dino.py', 'bench.py']
    figures = lines(tmp_path / 'bench.jsonl')
    assert [f['figure'] for f in figures] == ['mae', 'finetune', 'dino', 'loader']
    for f in figures:  # the steady state, the warm-up apart, and what was compiled how (eager on a CPU)
        assert f['images_per_s'] > 0 and f['step_ms'] > 0 and f['warmup_s'] > 0 and f['process_s'] >= f['warmup_s']
        assert f['batch_size'] == 32 and f['compile_mode'] == 'eager' and f['cudagraphs'] is False
    table = capsys.readouterr().out.split('| figure |', 1)[1]
    assert all(f"| {key} | 32 | eager | no |" in table for key in ['mae', 'finetune', 'dino', 'loader'])


def test_a_missing_peer_is_one_line_and_not_a_failure(tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'transformers' else real_find_spec(name, *a))
    monkeypatch.setattr(subprocess, 'Popen', None)  # nothing is started for it
    assert bench.main(SMALL + ['--batch_sizes', '32,64', '--figures', 'peer', '--out_dir', str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if 'peer' in line] == [
        "peer skipped: transformers is not installed (pip install transformers to time its ViTMAE beside ours)"]
    assert 'failed' not in out
    assert lines(tmp_path / 'bench.jsonl') == [dict(figure='peer', skipped='transformers is not installed',
                                                     device='cpu', torch=torch.__version__)]


def test_an_out_dir_that_is_a_file_is_one_line_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    (tmp_path / 'taken').write_text('a file of the user')
    for extra in ([], ['--only', 'profile'], ['--only', 'summary']):
        code, err = run_cli(bench.main, SMALL + extra + ['--out_dir', tmp_path / 'taken'], capsys, monkeypatch,
                            script='bench.py')
        one_line_error(code, err, f'--out_dir {tmp_path / "taken"} is a file, not a folder', 'choose another --out_dir')
        assert code == 2
    assert os.listdir(tmp_path) == ['taken'] and (tmp_path / 'taken').read_text() == 'a file of the user'


def test_a_missing_dataset_is_one_line_before_any_figure_starts(tmp_path, capsys, monkeypatch):
    """Not a process per figure, each failing on it after its start-up, then exit 0: one line, exit 2, nothing made."""
    monkeypatch.setattr(subprocess, 'Popen', None)  # nothing may start
    for extra in ([], ['--only', 'profile']):
        code, err = run_cli(bench.main, SMALL + extra + ['--dataset', 'tin', '--data_dir', tmp_path / 'data',
                                                         '--out_dir', tmp_path / 'b'], capsys, monkeypatch,
                            script='bench.py')
        one_line_error(code, err, f"tin: dataset folder {tmp_path / 'data' / 'tiny-imagenet-200'} not found")
        assert code == 2 and os.listdir(tmp_path) == []


def test_files_bench_did_not_write_are_never_replaced_and_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    """A user's profile.txt or bench.jsonl in the out_dir is refused and left as it was (bench.py's own begin as
    bench.py writes them); appending to its own bench.jsonl on a full disk is one line, and the earlier lines stay."""
    for name, extra in (('profile.txt', ['--only', 'profile']), ('bench.jsonl', ['--figures', 'loader'])):
        (tmp_path / name).write_text('x,y\n1,2\n')
        code, err = run_cli(bench.main, SMALL + extra + ['--out_dir', tmp_path], capsys, monkeypatch,
                            script='bench.py')
        one_line_error(code, err, f"{tmp_path / name} was not written by bench.py", 'choose another --out_dir')
        assert os.listdir(tmp_path) == [name] and (tmp_path / name).read_text() == 'x,y\n1,2\n'
        (tmp_path / name).unlink()
    ours = json.dumps(dict(figure='mae', batch=32, error='an earlier figure')) + '\n'
    (tmp_path / 'bench.jsonl').write_text(ours)
    real_find_spec, real_write = importlib.util.find_spec, os.write
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'transformers' else real_find_spec(name, *a))
    monkeypatch.setattr(subprocess, 'Popen', None)  # the peer is skipped: a line is appended, nothing is started

    def full_disk(fd, data):
        if os.readlink(f'/proc/self/fd/{fd}').endswith('bench.jsonl'):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)
    monkeypatch.setattr(os, 'write', full_disk)
    code, err = run_cli(bench.main, SMALL + ['--figures', 'peer', '--out_dir', tmp_path], capsys, monkeypatch,
                        script='bench.py')
    one_line_error(code, err, f"could not append to {tmp_path / 'bench.jsonl'} (No space left on device); its "
                              f"earlier lines are intact")
    assert (tmp_path / 'bench.jsonl').read_text() == ours


HANG = """import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
worker = subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])
open(sys.argv[1], 'w').write(f"{os.getpid()} {worker.pid}")
time.sleep(600)
"""


def test_a_figure_past_its_time_limit_is_killed_with_its_whole_process_group(tmp_path):
    """The figure's process ignores SIGTERM and has started a worker (as torch.compile's pool) that ignores it too:
    both end at the timeout, and the figure is an error line, not a hang."""
    (tmp_path / 'hang.py').write_text(HANG)
    pids = tmp_path / 'pids'
    t0 = time.monotonic()
    got = bench.measure(str(tmp_path / "hang.py"), [pids], timeout=5)
    assert time.monotonic() - t0 < 20
    assert got['error'].startswith('timed out after 5 s') and 'process group killed' in got['error']
    time.sleep(0.5)
    survivors = [pid for pid in map(int, pids.read_text().split()) if os.path.exists(f'/proc/{pid}')
                 and open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z']
    for pid in survivors:  # leave nothing behind, even when this fails
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"{survivors} outlived the figure's time limit"


def test_sigterm_to_bench_ends_the_figure_and_says_so(tmp_path):
    """A stage's time limit sends bench.py SIGTERM: the figure's process group is killed, and its line and the line
    of the figure after it say why they have no numbers."""
    proc = start('bench.py', SMALL + ['--steps', '100000', '--figures', 'mae,loader', '--out_dir', str(tmp_path)])
    children, t0 = [], time.time()
    while not children and time.time() - t0 < 60 and proc.poll() is None:  # (importing torch runs ldconfig: not it)
        children = [int(p) for p in open(f'/proc/{proc.pid}/task/{proc.pid}/children').read().split()
                    if 'pretrain.py' in cmdline(p)]
        time.sleep(0.05)
    assert children, "bench.py started no figure's process"
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    time.sleep(0.5)
    assert not any(os.path.exists(f'/proc/{c}') and open(f'/proc/{c}/stat').read().split()[2] != 'Z' for c in children)
    assert lines(tmp_path / 'bench.jsonl') == [
        dict(figure='mae', batch=32, compile=True, compile_mode_asked='reduce-overhead', device='cpu',
             torch=torch.__version__, error='stopped by a signal (a time limit, Ctrl-C) before it ended'),
        dict(figure='loader', batch=32, error='not started: stopped before its turn')]


PROFILE = ['--only', 'profile', '--device', 'cpu', '--img_size', '32', '--patch_size', '8', '--dataset', 'demo']


def test_profile_starts_after_warm_up_and_writes_a_summary_and_the_table(tmp_path):
    assert bench.main(PROFILE + ['--batch_sizes', '32', '--warmup', '2', '--steps', '3', '--out_dir', str(tmp_path)]) == 0
    text = open(tmp_path / 'profile.txt').read().splitlines()
    assert '3 steps profiled after 2 warm-up steps and 2 profiler warm-up steps' in text[0]
    assert 'images/s' in text[1] and text[2].startswith('per step: host (CPU) ')
    assert 'Self CPU' in '\n'.join(text) and 'aten::' in '\n'.join(text)
    record = lines(tmp_path / 'bench.jsonl')[-1]
    assert record['figure'] == 'profile' and record['steps_profiled'] == 3 and record['host_ms_per_step'] > 0
    assert record['device_ms_per_step'] is None and record['top'][0][0].startswith('aten::')  # (no GPU: CPU operators)


def test_profile_stopped_by_a_time_limit_still_writes_what_it_profiled(tmp_path):
    """gpu_check.sh stops the profile at its limit with SIGTERM: the step loop ends, and the summary and table of
    the steps profiled so far are still written, with exit 128 + SIGTERM."""
    proc = start('bench.py', PROFILE + ['--batch_sizes', '64', '--warmup', '0', '--steps', '100000',
                                        '--out_dir', str(tmp_path)])
    for line in proc.stdout:  # the pretrain.py banner ends with the config line: its loop is about to start
        if line.startswith('config:'):
            break
    time.sleep(1)  # past the 2 profiler warm-up steps (about 0.1 s each at batch 64 here); not many steps more:
    # turning each profiled step into tables takes about 0.5 s on a CPU
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    text = open(tmp_path / 'profile.txt').read()
    assert text.splitlines()[1].startswith('stopped by a signal') and 'aten::' in text
    record = lines(tmp_path / 'bench.jsonl')[-1]
    assert record['stopped'] and record['steps_profiled'] >= 1


def test_summary_quotes_the_figures_the_two_gpu_bound_the_profile_and_what_went_wrong(tmp_path):
    """summary.md from the files a check wrote (here made by hand): a stage cut at its limit, a failed test, a
    figure that timed out and a skipped peer are named; the two-GPU bound is twice the per-rank figures."""
    def figure(mode, graphs, batch, ips):
        return dict(figure='mae', batch=batch, batch_size=batch, compile_mode=mode, cudagraphs=graphs,
                    cudagraphs_recorded=2 if graphs else 0, images_per_s=ips, step_ms=1000 * batch / ips, mfu=0.1,
                    peak_mem_gb=1.5, warmup_s=41.0)
    (tmp_path / 'env.json').write_text(json.dumps(dict(gpu='NVIDIA H200', torch='2.11.0', cuda='13.0', cache_warm=False)))
    records = [figure('reduce-overhead', True, 128, 30000), figure('default', False, 64, 9000),
               figure('reduce-overhead', True, 64, 20000),
               dict(figure='smae', batch=128, compile_mode_asked='reduce-overhead', error='timed out after 30 s'),
               dict(figure='peer', skipped='transformers is not installed'),
               dict(figure='profile', batch=128, compile_mode='default', steps_profiled=10, host_ms_per_step=5.5,
                    device_ms_per_step=2.5, kernels_per_step=221, top=[['triton_fused_gelu', 0.4, 0.16]])]
    (tmp_path / 'bench.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records) + '{"figure": "cut by a ki')
    (tmp_path / 'stages.jsonl').write_text(
        json.dumps(dict(stage='headline', limit_s=85, seconds=40.2, exit=0, stopped_at_limit=False)) + '\n'
        + json.dumps(dict(stage='others', limit_s=80, seconds=81.0, exit=-9, stopped_at_limit=True, killed=True)) + '\n')
    (tmp_path / 'tests.jsonl').write_text(
        json.dumps(dict(test='tests/test_gpu.py::test_a', outcome='passed')) + '\n'
        + json.dumps(dict(test='tests/test_gpu.py::test_b', outcome='failed', message='AssertionError: boom')) + '\n')
    assert bench.main(['--only', 'summary', '--out_dir', str(tmp_path)]) == 0
    text = open(tmp_path / 'summary.md').read()
    assert text.startswith('# GPU check: NVIDIA H200, torch 2.11.0, CUDA 13.0, compile cache cold')
    assert 'others stopped at its 80 s limit, then killed' in text and '1 passed, 1 failed' in text and 'test_b: AssertionError: boom' in text
    assert '| mae | 128 | reduce-overhead | yes (2 recorded) | 30,000 |' in text and '| mae | 64 | default | no | 9,000 |' in text
    assert ('at most 40,000 images/s with CUDA graphs on both ranks, 18,000 in the default compile mode; one GPU at batch '
            '128: 30,000 with CUDA graphs.') in text
    assert 'error: timed out after 30 s' in text and 'skipped: transformers is not installed' in text
    assert 'host 5.50 ms a step, device 2.50 ms, 221 kernel launches' in text and 'triton_fused_gelu 16%' in text


@pytest.fixture
def no_cudagraph_counts():
    counters['inductor'].clear()
    yield
    counters['inductor'].clear()


def test_cuda_graphs_asked_for_but_skipped_or_never_recorded_stop_the_benchmark(no_cudagraph_counts):
    """bench_start proves CUDA graphs where the compile mode asks for them: a skip that inductor counted, or no
    forward and backward graph recorded, is an error (here on a CPU, where no graph can be recorded)."""
    run = SimpleNamespace(cuda=False, device=torch.device('cpu'))
    with pytest.raises(RuntimeError, match='no forward graph was recorded after warm-up'):
        common.bench_start(run, time.time(), cudagraphs=True)
    counters['inductor']['cudagraph_skips'] += 1  # as inductor counts a graph it does not capture
    with pytest.raises(RuntimeError, match='inductor skipped them 1 time'):
        common.bench_start(run, time.time(), cudagraphs=True)
    t0, figures = common.bench_start(run, time.time() - 3, cudagraphs=False)  # a mode without graphs: nothing to prove
    assert figures['cudagraphs'] is False and 3 <= figures['warmup_s'] < 60


def test_a_benchmark_that_asks_for_cuda_graphs_turns_a_skip_into_an_error(monkeypatch):
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config.triton, 'cudagraph_or_error', False)
    cuda_run = SimpleNamespace(cuda=True, ddp=False)
    train = SimpleNamespace(compile=True, compile_mode='reduce-overhead', accum_steps=1, bench_steps=0)
    assert common.compile_mode(train, cuda_run) == 'reduce-overhead' and not inductor_config.triton.cudagraph_or_error
    bench_run = SimpleNamespace(**{**vars(train), 'bench_steps': 10})
    assert common.compile_mode(bench_run, cuda_run) == 'reduce-overhead' and inductor_config.triton.cudagraph_or_error
