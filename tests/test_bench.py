"""bench.py runs (figures are printed, never asserted: speed is measured on a GPU, not in tests)."""
import json
import subprocess

import bench


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
