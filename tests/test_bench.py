"""bench.py runs (figures are printed, never asserted: speed is measured on a GPU, not in tests)."""
import json
import signal
import subprocess
import time

import bench
from test_reliability import start


def test_bench_runs_each_configuration_in_its_own_process_and_writes_its_figures(tmp_path, monkeypatch):
    started, real_run = [], subprocess.run

    def run(cmd, **kw):  # record every process bench.py starts
        started.append(cmd)
        return real_run(cmd, **kw)
    monkeypatch.setattr(subprocess, 'run', run)
    argv = ['--device', 'cpu', '--steps', '2', '--warmup', '1', '--img_size', '32', '--patch_size', '8',
            '--batch_sizes', '32', '--dataset', 'demo', '--peer', 'false', '--out_dir', str(tmp_path)]
    assert bench.main(argv) == 0
    row = json.load(open(tmp_path / 'bench.json'))['results'][0]
    assert row['batch'] == 32 and row['mae']['images_per_s'] > 0 and row['smae_step_ratio'] > 0
    assert row['finetune']['images_per_s'] > 0 and row['loader']['images_per_s'] > 0 and row['loader_over_finetune'] > 0
    # MAE, SMAE, fine-tuning and the loader: four fresh processes, so no figure comes from a recompiled graph
    assert [cmd[1].rsplit('/', 1)[1] for cmd in started] == ['pretrain.py', 'pretrain.py', 'finetune.py', 'bench.py']


PROFILE = ['--only', 'profile', '--device', 'cpu', '--warmup', '1', '--img_size', '32', '--patch_size', '8',
           '--batch_sizes', '32', '--dataset', 'demo']


def test_profile_writes_the_step_figures_and_the_operator_table(tmp_path):
    assert bench.main(PROFILE + ['--steps', '2', '--out_dir', str(tmp_path)]) == 0
    text = open(tmp_path / 'profile.txt').read()
    assert 'images/s' in text.splitlines()[0] and 'Self CPU' in text and 'aten::' in text


def test_profile_stopped_by_a_timeout_still_writes_its_table(tmp_path):
    """gpu_check.sh runs the profile under `timeout`: its SIGTERM ends the step loop, and the table of the steps that
    ran is still written (a time-boxed GPU session keeps it), with exit 128 + SIGTERM."""
    proc = start('bench.py', PROFILE + ['--steps', '100000', '--out_dir', str(tmp_path)])
    for line in proc.stdout:  # the pretrain.py banner ends with the config line: its loop is about to start
        if line.startswith('config:'):
            break
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    text = open(tmp_path / 'profile.txt').read()
    assert text.startswith('stopped by a signal') and 'aten::' in text
