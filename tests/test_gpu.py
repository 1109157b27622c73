"""Checks that need a GPU; they skip cleanly without CUDA. A session with a GPU runs them with
    python3 -m pytest -q tests/test_gpu.py
and the figures with `python3 bench.py` (speed is printed by benchmarks, never asserted by tests)."""
import json
import os

import pytest
import torch

import bench
import evaluate
import finetune
import model as M
import pretrain
import probe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEMO = ['--dataset', 'demo', '--warmup_epochs', '1', '--log_every', '5']


def log(out, event):
    return [r for r in map(json.loads, open(os.path.join(out, 'log.jsonl'))) if r['event'] == event]


def test_pretrain_default_cuda_path_bf16_compiled_cuda_graphs(tmp_path):
    """The defaults on CUDA: bf16 autocast, TF32, torch.compile with CUDA graphs, dataset on the GPU; loss falls."""
    assert pretrain.main(DEMO + ['--epochs', '6', '--lr', '2e-3', '--out_dir', str(tmp_path / 'pt')]) == 0
    start = log(tmp_path / 'pt', 'start')[0]
    assert start['dtype'] == 'bfloat16' and start['config']['compile'] is True
    assert torch.backends.cuda.matmul.allow_tf32
    losses = [r['loss'] for r in log(tmp_path / 'pt', 'train')]
    assert losses[-1] < 0.7 * losses[0]
    ck = torch.load(tmp_path / 'pt' / 'ckpt.pt', weights_only=True)
    assert not any(k.startswith(('_orig_mod', 'module')) for k in ck['model']), "a wrapped model was saved"


def test_compiled_objective_matches_eager_on_cuda():
    torch.manual_seed(0)
    mae = M.build_mae(M.make_config('vit_lite')).cuda()
    obj = M.MAEObjective(mae)
    x, noise = torch.randn(8, 3, 64, 64, device='cuda'), torch.rand(8, 256, device='cuda')
    ref = obj(x, 0.75, noise)
    out = torch.compile(obj)(x, 0.75, noise)
    assert torch.allclose(ref, out, rtol=1e-3, atol=1e-4)


def test_fp16_with_grad_scaler_and_block_masking(tmp_path):
    assert pretrain.main(DEMO + ['--epochs', '2', '--dtype', 'float16', '--masking', 'block', '--mask', '0.5',
                                 '--out_dir', str(tmp_path / 'fp16')]) == 0
    ck = torch.load(tmp_path / 'fp16' / 'ckpt.pt', weights_only=True)
    assert ck['scaler'] and ck['scaler'].get('scale', 0) > 0


def test_resume_on_cuda_continues(tmp_path):
    out = str(tmp_path / 'r')
    assert pretrain.main(DEMO + ['--epochs', '1', '--out_dir', out]) == 0
    assert pretrain.main(['--resume', 'true', '--epochs', '2', '--out_dir', out]) == 0
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['epoch'] == 2


def test_finetune_probe_evaluate_on_cuda(tmp_path, pre):
    assert finetune.main(['--ckpt', pre, '--dataset', 'demo', '--epochs', '2', '--warmup_epochs', '1',
                          '--out_dir', str(tmp_path / 'ft')]) == 0
    assert json.load(open(tmp_path / 'ft' / 'results.json'))['top1'] > 0
    assert probe.main(['--ckpt', pre, '--dataset', 'demo', '--epochs', '5', '--out_dir', str(tmp_path / 'pr')]) == 0
    assert evaluate.main(['--ckpt', pre, '--dataset', 'demo', '--probe_epochs', '5', '--out_dir', str(tmp_path / 'ev')]) == 0
    ev = json.load(open(tmp_path / 'ev' / 'eval.json'))
    assert ev is not None


def test_smae_on_cuda(tmp_path):
    critic = bench.critic_checkpoint(str(tmp_path / 'critic.pt'))
    assert pretrain.main(DEMO + ['--epochs', '1', '--alpha', '0.5', '--critic', critic,
                                 '--out_dir', str(tmp_path / 'smae')]) == 0
    assert log(tmp_path / 'smae', 'calibration')[0]['c'] > 0


def test_bench_prints_figures_on_cuda(tmp_path):
    argv = ['--batch_sizes', '128', '--steps', '20', '--warmup', '10', '--dataset', 'demo', '--peer', 'false',
            '--out_dir', str(tmp_path)]
    assert bench.main(argv) == 0
    row = json.load(open(tmp_path / 'bench.json'))['results'][0]
    assert row['mae']['images_per_s'] > 0 and row['mae']['peak_mem_gb'] > 0
