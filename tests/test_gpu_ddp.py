"""Two ranks on the one GPU keep CUDA graphs (a step of the GPU check): pretrain.py with torchrun's environment for
two ranks that share the GPU, so common.Run talks over gloo, in its default compile mode (CUDA graphs) and with
--accum_steps 2; a CUDA graph that is skipped is an error, every rank replays captured graphs, both ranks average
the same gradient, and the loss curve is the one process's. Without CUDA it skips, or with GPU_DRY_RUN=1 (./gpu_check.sh's
CPU dry run) it is a dry run of the same calls on the CPU (eager, small), with the CUDA-only assertions left out.

    python3 -m pytest -q tests/test_gpu_ddp.py      # on one H100/H200: expected about 2 minutes (not yet run on
                                                    # a GPU: three processes compile; the ranks are given 300 s)
"""
import json
import os

import pytest
import torch

import pretrain
from test_ddp import instrument, job_records, launch, wait_all

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA and os.environ.get('GPU_DRY_RUN') != '1', reason=(
    "no CUDA device; GPU_DRY_RUN=1 runs it as a dry run on the CPU, as ./gpu_check.sh does without a GPU"))
RUN = ['--dataset', 'demo', '--epochs', '1', '--warmup_epochs', '0', '--log_every', '1', '--knn_bank', '0',
       '--val_images', '64', '--picture_every', '100']  # 1,536 demo images in batches of 128: 12 steps
SMALL = [] if CUDA else ['--img_size', '32', '--patch_size', '8', '--subset', '128', '--batch_size', '32']


def force_cuda_graphs(patch, record):
    """In a rank: a CUDA-graph skip is an error where this torch has triton.cudagraph_or_error (added in September
    2025, pytorch#163220: in 2.11 and 2.14), and every replay of a captured graph is counted (cudagraph trees call
    torch.cuda.CUDAGraph.replay), since a graph can go uncaptured without counting as a skip (pytorch#193044)."""
    import torch._inductor.config as inductor_config
    if hasattr(inductor_config.triton, 'cudagraph_or_error'):
        patch(inductor_config.triton, 'cudagraph_or_error', True)
    record['replays'], real_replay = 0, torch.cuda.CUDAGraph.replay

    def replay(self):
        record['replays'] += 1
        return real_replay(self)
    patch(torch.cuda.CUDAGraph, 'replay', replay)


def finish_record(record):
    """At a rank's end: inductor's count of skipped CUDA graphs (in every torch 2.x)."""
    from torch._dynamo.utils import counters
    record['cudagraph_skips'] = counters['inductor']['cudagraph_skips']


def train_losses(out):
    return [r['loss'] for r in map(json.loads, open(os.path.join(out, 'log.jsonl'))) if r['event'] == 'train']


def test_two_ranks_on_one_gpu_keep_cuda_graphs_and_the_loss_curve(tmp_path):
    argv = RUN + SMALL + ['--data_dir', str(tmp_path / 'data')]
    two, one = str(tmp_path / 'two'), str(tmp_path / 'one')
    procs = launch([dict(name='ranks', script='pretrain', argv=argv + ['--accum_steps', '2', '--out_dir', two],
                         cudagraphs=True)], str(tmp_path))
    with pytest.MonkeyPatch.context() as mp:  # meanwhile, one process without accumulation, in the same mode
        single = instrument(mp.setattr)
        try:
            assert pretrain.main(argv + ['--out_dir', one]) == 0
        finally:
            single.pop('hook').remove()
    wait_all(procs, str(tmp_path), timeout=300)
    ranks = job_records(str(tmp_path), 'ranks')

    steps = len(single['steps'])
    for rank, rec in enumerate(ranks):
        assert [s['reduces'] for s in rec['steps']] == [1] * steps, f"rank {rank}: not one all-reduce per step"
        assert all(s['elsewhere'] == 0 for s in rec['steps']), f"rank {rank}: a gradient outside the flat buffer"
        if CUDA:  # each of the 2 x steps micro-steps replays a forward and a backward graph once captured
            assert rec['cudagraph_skips'] == 0, f"rank {rank} skipped CUDA graphs"
            assert rec['replays'] >= 2 * (2 * steps - 2), f"rank {rank}: {rec['replays']} CUDA graph replays"
    assert torch.equal(ranks[0]['first_grads'], ranks[1]['first_grads']), "the ranks averaged different gradients"
    g2, g1 = ranks[0]['first_grads'], single['first_grads']
    # bf16 autocast on other batch shapes rounds differently (a few 1e-3); a half batch's gradient is far off
    assert (g2 - g1).norm() < 0.05 * g1.norm(), f"the ranks' gradient is {(g2 - g1).norm() / g1.norm():.3f} off"
    curve2, curve1 = train_losses(two), train_losses(one)
    assert len(curve2) == len(curve1) == steps
    assert all(abs(a - b) < 0.02 * b for a, b in zip(curve2, curve1)), list(zip(curve2, curve1))
    start = [json.loads(line) for line in open(os.path.join(two, 'log.jsonl')) if '"start"' in line][0]
    assert (start['world_size'], start['backend']) == (2, 'gloo')  # two ranks, one GPU (or the CPU): gloo
    if CUDA:
        assert start['config']['compile_mode'] == 'reduce-overhead'
