"""No training step reads a device value on the host between log points, so the CPU can queue steps ahead of the
GPU. Each loop runs on the CPU, eagerly (what the step runs when not compiled; a compiled graph holds the same
ops), under two modes that see every op of the step, backward included:
- a TorchDispatchMode: aten._local_scalar_dense (item(), float(), bool(), int(), a tensor in an f-string), torch.equal,
  and the ops whose output shape depends on the data, which wait for the GPU on CUDA (nonzero, masked_select, unique,
  indexing with a boolean mask, repeat_interleave without output_size, ...);
- a TorchFunctionMode: tolist(), numpy(), cpu(), and torch.tensor / as_tensor with a device (a blocking host-to-device
  copy, after which PyTorch waits for the stream).
Each read is attributed to the training step in progress: a step runs from the loop's request for its batch to
the request for the next one (DeviceLoader.epoch) and holds one optimizer step (SMAE's calibration batches, which
have none, are not steps); it is a log point when it writes a 'train' log record. A log point reads anyway (its
loss; at an epoch's end its val pass and checkpoint; the first step also fills the constant tables' caches); every
other step must not read at all. The optimizer is AdamW fused, as on CUDA: unfused, it reads its step count, a host
tensor."""
import functools
import os
import traceback

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import bench
import common
import data
import dino
import finetune
import model as M
import pretrain
from conftest import ROOT, script_argv

aten = torch.ops.aten
SCALAR_READS = {aten._local_scalar_dense.default, aten.equal.default}
SHAPE_FROM_DATA = {aten.nonzero, aten.masked_select, aten._unique, aten._unique2, aten.unique_dim,
                   aten.unique_consecutive, aten.bincount, aten.histc}  # output sizes the host must read first
HOST_COPIES = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__array__}
STEPS = 12                  # training steps per run: 96 images in batches of 8, one epoch
# vit_lite at 32 px, patch 8; log lines at steps 1, 2, 4, 8 and 12 (the epoch's end): 3, 5, 6, 7, 9, 10, 11 are quiet
RUN = ('--subset', 96, '--batch_size', 8, '--epochs', 1, '--log_every', 1000, '--val_images', 32)


def where_in_our_code():
    """file:line of the innermost frame in this repository's scripts (not torch, not this test)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(ROOT) and '/tests/' not in frame.filename:
            return f"{os.path.basename(frame.filename)}:{frame.lineno} ({frame.name})"
    return '?'


class Step:
    def __init__(self):
        self.stepped = self.logged = False     # an optimizer step done; a 'train' log record written
        self.reads = []                        # host reads, each with where it happened
        self.ops, self.backward_ops = 0, 0     # what the dispatch mode saw: proof that it sees inside the step


class HostReads(TorchDispatchMode):
    """Counts host reads per training step; the TorchFunctionMode below feeds it the method-level ones."""

    def __init__(self):
        super().__init__()
        self.steps = [Step()]                  # the first holds the setup before the first training step

    def read(self, what):
        self.steps[-1].reads.append(f"{what} at {where_in_our_code()}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        step, packet = self.steps[-1], func.overloadpacket
        step.ops += 1
        step.backward_ops += 'backward' in packet.__name__
        indices = args[1] if packet in (aten.index, aten.index_put, aten.index_put_) else []
        bool_index = any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)  # x[mask]
        repeats = args[0 if func is aten.repeat_interleave.Tensor else 1] if packet is aten.repeat_interleave else 1
        unsized_repeat = isinstance(repeats, torch.Tensor) and kwargs.get('output_size') is None  # a tensor of repeats
        if func in SCALAR_READS or packet in SHAPE_FROM_DATA or bool_index or unsized_repeat:
            self.read(str(func))
        return func(*args, **kwargs)


class HostCopies(TorchFunctionMode):
    def __init__(self, reads):
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_COPIES:
            self.reads.read(f"Tensor.{func.__name__}()")
        elif func in (torch.tensor, torch.as_tensor) and kwargs.get('device') is not None:
            self.reads.read(f"torch.{func.__name__}(..., device=...): a host-to-device copy")
        return func(*args, **kwargs)


@pytest.fixture
def host_reads(monkeypatch):
    """-> run(main, argv): runs a script's main under the two modes and returns its training steps."""
    reads = HostReads()
    real_epoch, real_log = data.DeviceLoader.epoch, common.Run.log

    def epoch(self, *a, **k):  # a new step begins when the loop asks for its batch
        batches = real_epoch(self, *a, **k)
        while True:
            reads.steps.append(Step())
            try:
                item = next(batches)
            except StopIteration:
                return
            yield item

    def log(self, record, line=None):
        reads.steps[-1].logged |= record.get('event') == 'train'
        return real_log(self, record, line)

    def stepped(optimizer, args, kwargs):
        reads.steps[-1].stepped = True

    monkeypatch.setattr(data.DeviceLoader, 'epoch', epoch)
    monkeypatch.setattr(common.Run, 'log', log)
    monkeypatch.setattr(torch.optim, 'AdamW', functools.partial(torch.optim.AdamW, fused=True))  # as on CUDA
    hook = register_optimizer_step_post_hook(stepped)

    def run(main, argv):
        with HostCopies(reads), reads:
            assert main(argv) == 0
        return [s for s in reads.steps if s.stepped]
    yield run
    hook.remove()


def assert_no_reads_between_log_points(steps):
    assert len(steps) == STEPS, f"{len(steps)} optimizer steps, expected {STEPS}"
    quiet = [n for n, s in enumerate(steps, 1) if not s.logged]
    assert len(quiet) >= 5, f"only steps {quiet} were not log points: too few to check"
    assert all(steps[n - 1].ops > 100 and steps[n - 1].backward_ops > 0 for n in quiet), "the mode missed the step"
    assert all(s.reads for s in steps if s.logged), "a log point without a read: the detection is broken"
    bad = [f"step {n}: {r}" for n in quiet for r in steps[n - 1].reads]
    assert not bad, f"{len(bad)} host reads inside training steps:\n" + "\n".join(bad[:20])


def random_critic(tmp_path):
    """The random SqueezeNet critic that bench.py's SMAE job uses."""
    args = bench.command(common.configure(vars(bench), [])[0], 'smae', 32, str(tmp_path))[1]
    return args[args.index('--critic') + 1]


@pytest.mark.parametrize('masking', ['random', 'block'])
def test_pretrain_steps_do_not_read_the_device(host_reads, tiny, masking):
    steps = host_reads(pretrain.main, tiny(*RUN, '--masking', masking, '--knn_bank', 0, '--grad_clip', 1.0))
    assert_no_reads_between_log_points(steps)


def test_fp16_steps_with_the_grad_scaler_do_not_read_the_device(host_reads, tiny, monkeypatch):
    # --dtype float16 on CUDA adds a GradScaler; here the same scaler runs on the CPU, forced on (fused AdamW takes
    # its scale and inf flag on the device, as on CUDA; unfused, the scaler would read the flag every step)
    real_scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, 'GradScaler', lambda device, enabled: real_scaler('cpu'))
    argv = tiny(*RUN, '--grad_clip', 1.0, '--knn_bank', 0)
    assert_no_reads_between_log_points(host_reads(pretrain.main, argv))
    ck = torch.load(os.path.join(argv[argv.index('--out_dir') + 1], 'ckpt.pt'), weights_only=False)
    assert ck['scaler'].get('scale', 0) > 0, "the scaler did not run"


def test_smae_steps_do_not_read_the_device(host_reads, tiny, tmp_path):
    argv = tiny(*RUN, '--masking', 'block', '--mask', 0.5, '--alpha', 0.5, '--critic', random_critic(tmp_path),
                '--calib_batches', 2, '--knn_bank', 0)
    assert_no_reads_between_log_points(host_reads(pretrain.main, argv))


def test_finetune_steps_do_not_read_the_device(host_reads, tiny):
    # RandAugment (augment is on by default), mixup and cutmix per micro-batch, drop path, gradient clipping
    argv = script_argv(finetune, tiny(*RUN, '--mixup', 0.8, '--cutmix', 1.0, '--label_smoothing', 0.1, '--drop_path',
                                      0.1, '--grad_clip', 1.0, '--accum_steps', 2))
    assert_no_reads_between_log_points(host_reads(finetune.main, argv))


def test_dino_steps_do_not_read_the_device(host_reads, tiny):
    argv = script_argv(dino, tiny(*RUN, '--local_crops_number', 2, '--out_dim', 64, '--head_hidden', 32,
                                  '--head_bottleneck', 16, '--knn_bank', 0))
    assert_no_reads_between_log_points(host_reads(dino.main, argv))


def test_each_kind_of_host_read_is_seen():
    x, mask, repeats = torch.rand(6), torch.rand(6) > 0.5, torch.tensor([1, 0, 2, 1, 0, 1])
    reads_of = {'item': lambda: x.sum().item(), 'float': lambda: float(x[0]), 'bool': lambda: bool(mask.any()),
                'f-string': lambda: f"{x.mean():.3f}", 'equal': lambda: torch.equal(x, x),
                'nonzero': lambda: mask.nonzero(), 'masked_select': lambda: x.masked_select(mask),
                'unique': lambda: repeats.unique(), 'x[mask]': lambda: x[mask],
                'x[mask] = v': lambda: x.clone().__setitem__(mask, 0.0),
                'repeat_interleave': lambda: x.repeat_interleave(repeats),
                'tolist': lambda: x.tolist(), 'numpy': lambda: x.numpy(), 'cpu': lambda: x.cpu(),
                'torch.tensor': lambda: torch.tensor([1.0], device=x.device)}
    reads = HostReads()
    for name, read in reads_of.items():
        with HostCopies(reads), reads:
            read()
        assert len(reads.steps[-1].reads) == 1, f"{name}: {reads.steps[-1].reads}"
        reads.steps.append(Step())
    with HostCopies(reads), reads:      # and what is not a read: sized outputs, repeats as a number, a fill
        x.repeat_interleave(repeats, output_size=5), x.repeat_interleave(2), torch.where(mask, x, 0), x[repeats]
        torch.full((2,), 3.0), x.masked_fill(mask, 0)
    assert reads.steps[-1].reads == []


def test_a_read_added_to_the_step_is_caught(host_reads, tiny, monkeypatch):
    # the detector itself: an .item() of the loss inside the step (the classic per-step sync) fails the check
    real_forward = M.MAEObjective.forward

    def forward(self, *a, **k):
        loss = real_forward(self, *a, **k)
        loss.item()                             # the deliberate read, in every step
        return loss
    monkeypatch.setattr(M.MAEObjective, 'forward', forward)
    steps = host_reads(pretrain.main, tiny(*RUN, '--knn_bank', 0))
    with pytest.raises(AssertionError, match=r'7 host reads inside training steps:\n\s*'  # 3, 5, 6, 7, 9, 10, 11
                                             r'step 3: aten._local_scalar_dense.default at pretrain.py:\d+ \(train\)'):
        assert_no_reads_between_log_points(steps)
