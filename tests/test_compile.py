"""What the CPU can show of CUDA-graph capture: the real pre-training, SMAE, fine-tuning and DINO steps compile with
fullgraph=True (a graph break raises) into one graph each, and an lr change, an epoch boundary, a checkpoint, a
val pass, pictures and kNN never make dynamo compile the step again. On CUDA the same graph is what
mode='reduce-overhead' captures; a recompilation there would mean a second capture (or a silent fallback)."""
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import bench
import common
import dino
import finetune
import pretrain
from conftest import script_argv


@pytest.fixture
def counted(monkeypatch):
    """torch.compile as the scripts call it, but with fullgraph=True and a backend that counts the graphs."""
    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(common, 'compile_mode', lambda cfg, run: 'default')  # compile on the CPU too
    monkeypatch.setattr(torch, 'compile', lambda model, mode=None: real_compile(model, backend=counter, fullgraph=True))
    torch._dynamo.reset()
    yield counter
    torch._dynamo.reset()


# 64 images in batches of 32: 2 steps an epoch, 4 in all; after the first (compiled) step come an lr change each
# step, a checkpoint with its val pass, picture and kNN, and an epoch boundary
RUN = ('--subset', 64, '--epochs', 2, '--warmup_epochs', 1, '--ckpt_every', 1, '--picture_every', 1, '--log_every', 3)


def test_pretrain_step_is_one_graph(counted, tiny):
    assert pretrain.main(tiny(*RUN, '--knn_bank', 64)) == 0
    assert counted.frame_count == 1, f"{counted.frame_count} graphs: a graph break or a recompilation"


def test_smae_step_is_one_graph(counted, tiny, tmp_path):
    args = bench.command(common.configure(vars(bench), [])[0], 'smae', 32, str(tmp_path))[1]
    critic = args[args.index('--critic') + 1]  # the random critic bench.py's SMAE job uses
    assert pretrain.main(tiny(*RUN, '--alpha', 0.5, '--critic', critic, '--calib_batches', 1, '--knn_bank', 0)) == 0
    assert counted.frame_count == 1


def test_finetune_step_is_one_graph(counted, tiny, pre):
    argv = script_argv(finetune, tiny(*RUN, '--eval_every', 1, '--ckpt', pre, '--mixup', 0.8, '--cutmix', 1.0,
                                      '--drop_path', 0.1))
    assert finetune.main(argv) == 0
    assert counted.frame_count == 1


def test_dino_step_is_one_graph(counted, tiny):
    """Both networks and the loss in one graph; the teacher temperature (a buffer filled each step), the teacher's EMA
    and the centre update outside it never recompile it."""
    argv = script_argv(dino, tiny(*RUN, '--local_crops_number', 2, '--warmup_teacher_temp_epochs', 1, '--knn_bank', 64))
    assert dino.main(argv) == 0
    assert counted.frame_count == 1, f"{counted.frame_count} graphs: a graph break or a recompilation"
