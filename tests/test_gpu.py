"""The CUDA path end to end: bf16 autocast, torch.compile with CUDA graphs, accumulation, an fp16 resume, SMAE, DINO,
fine-tuning, probing and evaluation on the GPU. A session with a GPU runs them through
    ./gpu_check.sh OUT_DIR
which also runs the benchmark (speed is printed by benchmarks, never asserted by tests). Each test has 120 s; where a
compile mode asks for CUDA graphs, a skip fails the test. Nothing here needs the network (the GPU machine has none).
Without CUDA they skip, or, with GPU_DRY_RUN=1 (what ./gpu_check.sh sets: run its CPU dry run before a GPU session),
run as a dry run of the same calls, small and on the CPU, with the CUDA-only assertions left out: a GPU session,
which has minutes, must never find a test that fails for a reason a CPU could have shown."""
import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

import bench
import common
import dino
import evaluate
import finetune
import model as M
import pretrain
import probe
from conftest import script_argv

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA and os.environ.get('GPU_DRY_RUN') != '1', reason=(
    "no CUDA device; GPU_DRY_RUN=1 runs these as a dry run on the CPU, as ./gpu_check.sh does without a GPU"))
SMALL = [] if CUDA else ['--img_size', '32', '--patch_size', '8', '--subset', '64', '--batch_size', '32',
                         '--val_images', '64', '--knn_bank', '64', '--max_images', '64', '--use_lpips', 'false']
DEMO = ['--dataset', 'demo', '--warmup_epochs', '1', '--log_every', '5', '--knn_bank', '512']


def small(script, argv):
    """argv, and on a CPU the SMALL settings that `script` has (given last, so they win)."""
    return argv + script_argv(script, SMALL)


@pytest.fixture(autouse=True)
def time_limit():
    """A test that hangs (a stuck compile or graph capture) fails after 120 s instead of eating the GPU session."""
    def expire(signum, frame):
        raise TimeoutError("this CUDA test took more than 120 s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(autouse=True)
def cuda_graphs_or_error():
    """Where a compile mode asks for CUDA graphs, a skip is an error: inductor raises at compile time
    (cudagraph_or_error, where this torch has it) and the skips it counted must stay 0."""
    import torch._inductor.config as inductor_config
    counters['inductor'].clear()
    strict = {'triton.cudagraph_or_error': True} if hasattr(inductor_config.triton, 'cudagraph_or_error') else {}
    with inductor_config.patch(strict):
        yield
    assert counters['inductor']['cudagraph_skips'] == 0, "inductor skipped CUDA graphs (its log says why)"


def log(out, event):
    return [r for r in map(json.loads, open(os.path.join(out, 'log.jsonl'))) if r['event'] == event]


def test_pretrain_default_cuda_path_bf16_compiled_cuda_graphs(tmp_path):
    """The defaults on CUDA: bf16 autocast, TF32, torch.compile with CUDA graphs, dataset on the GPU; loss falls."""
    assert pretrain.main(small(pretrain, DEMO + ['--epochs', '6', '--lr', '2e-3', '--out_dir', str(tmp_path / 'pt')])) == 0
    start = log(tmp_path / 'pt', 'start')[0]
    assert start['config']['compile'] is True
    if CUDA:
        assert start['dtype'] == 'bfloat16' and torch.backends.cuda.matmul.allow_tf32
        graphs = common.cudagraph_proof(SimpleNamespace(cuda=True, device=torch.device('cuda')))
        assert graphs is None or graphs >= 2  # a forward and a backward graph recorded (None: unreadable here)
    losses = [r['loss'] for r in log(tmp_path / 'pt', 'train')]
    assert losses[-1] < 0.7 * losses[0]
    assert len(log(tmp_path / 'pt', 'knn')) == 2  # the floor at the start, and at the last checkpoint
    ck = torch.load(tmp_path / 'pt' / 'ckpt.pt', weights_only=True)
    assert not any(k.startswith(('_orig_mod', 'module')) for k in ck['model']), "a wrapped model was saved"


@pytest.mark.skipif(not CUDA, reason='needs a CUDA GPU')
def test_compiled_objective_matches_eager_on_cuda():
    torch.manual_seed(0)
    mae = M.build_mae(M.make_config('vit_lite')).cuda()
    obj = M.MAEObjective(mae)
    x, noise = torch.randn(8, 3, 64, 64, device='cuda'), torch.rand(8, 256, device='cuda')
    ref = obj(x, 0.75, noise)
    out = torch.compile(obj)(x, 0.75, noise)
    assert torch.allclose(ref, out, rtol=1e-3, atol=1e-4)


def test_accumulation_with_cuda_graphs_and_fp16_resume_from_bf16(tmp_path):
    """--accum_steps 2 with CUDA graphs (each micro-step's backward adds into the gradient buffer, outside the graph
    pool: common.FlatGrads), then resuming that bf16 run in fp16 (a fresh GradScaler, not an empty state)."""
    out = str(tmp_path / 'acc')
    assert pretrain.main(small(pretrain, DEMO + ['--epochs', '1', '--warmup_epochs', '0', '--accum_steps', '2',
                                                 '--masking', 'block', '--mask', '0.5', '--out_dir', out])) == 0
    assert pretrain.main(['--resume', 'true', '--epochs', '2', '--dtype', 'float16', '--out_dir', out]) == 0
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ck['epoch'] == 2 and (ck['scaler'].get('scale', 0) > 0 or not CUDA)  # (the CPU runs float32: no scaler)
    assert all(torch.isfinite(v).all() for v in ck['model'].values() if v.is_floating_point())


def test_finetune_probe_evaluate_on_cuda(tmp_path, pre):
    assert finetune.main(small(finetune, ['--ckpt', pre, '--dataset', 'demo', '--epochs', '2', '--warmup_epochs', '1',
                                          '--mixup', '0.8', '--cutmix', '1.0', '--out_dir', str(tmp_path / 'ft')])) == 0
    assert json.load(open(tmp_path / 'ft' / 'results.json'))['top1'] > 0
    assert probe.main(small(probe, ['--ckpt', pre, '--dataset', 'demo', '--epochs', '5', '--warmup_epochs', '1',
                                    '--out_dir', str(tmp_path / 'pr')])) == 0
    # LPIPS off: it fetches AlexNet's weights, and the GPU machine has no network
    assert evaluate.main(small(evaluate, ['--ckpt', pre, '--dataset', 'demo', '--probe_epochs', '5', '--use_lpips', 'false',
                                          '--out_dir', str(tmp_path / 'ev')])) == 0
    ev = json.load(open(tmp_path / 'ev' / 'eval.json'))
    assert ev['reconstruction']['model']['psnr'] > 0 and ev['representation']['demo']['model']['probe']['top1'] >= 0


def test_smae_on_cuda(tmp_path):
    args = bench.command(common.configure(vars(bench), [])[0], 'smae', 32, str(tmp_path))[1]
    critic = args[args.index('--critic') + 1]  # the random critic bench.py's SMAE job uses
    assert pretrain.main(small(pretrain, DEMO + ['--epochs', '1', '--warmup_epochs', '0', '--alpha', '0.5',
                                                 '--critic', critic, '--out_dir', str(tmp_path / 'smae')])) == 0
    assert log(tmp_path / 'smae', 'calibration')[0]['c'] > 0


def test_dino_on_cuda(tmp_path):
    out = tmp_path / 'dino'
    assert dino.main(small(dino, ['--dataset', 'demo', '--epochs', '2', '--warmup_epochs', '1',
                                  '--warmup_teacher_temp_epochs', '1', '--local_crops_number', '2', '--knn_bank', '512',
                                  '--log_every', '5', '--out_dir', str(out)])) == 0
    assert log(out, 'start')[0]['dtype'] == ('bfloat16' if CUDA else 'float32')
    assert all(r['loss'] == r['loss'] for r in log(out, 'train'))  # finite, no NaN
    assert finetune.main(small(finetune, ['--ckpt', str(out / 'ckpt.pt'), '--dataset', 'demo', '--epochs', '1',
                                          '--warmup_epochs', '0', '--out_dir', str(tmp_path / 'ft')])) == 0
