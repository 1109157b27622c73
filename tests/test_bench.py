"""bench.py runs (figures are printed, never asserted: speed is measured on a GPU, not in tests)."""
import json

import bench


def test_bench_runs_on_cpu_and_writes_its_figures(tmp_path):
    argv = ['--device', 'cpu', '--steps', '2', '--warmup', '1', '--img_size', '32', '--patch_size', '8',
            '--batch_sizes', '32', '--dataset', 'demo', '--peer', 'false', '--out_dir', str(tmp_path)]
    assert bench.main(argv) == 0
    out = json.load(open(tmp_path / 'bench.json'))
    row = out['results'][0]
    assert row['batch'] == 32 and row['mae']['images_per_s'] > 0 and row['smae_step_ratio'] > 0
    assert row['finetune']['images_per_s'] > 0 and row['loader_finetune_augment'] > 0
