"""Data parallelism without a wrapper (common.FlatGrads): two ranks give the weights of one process for pretrain,
SMAE, finetune and DINO, with gradient accumulation and through a compiled backward; the gradient buffer is
all-reduced exactly once per optimizer step; the gradients the optimizer reads are views of that buffer; a rank
killed mid-run ends the other within seconds, with one line that names it and the resume command.

The ranks are processes started here with the environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free port), over gloo on the CPU: this file is also their launcher
(`python tests/test_ddp.py SPEC`), so that a rank can be instrumented or run with a compiled step before it calls
the script's main through common.cli, as `python pretrain.py` does."""
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import common
from conftest import ROOT, TINY, script_argv

# --- the launcher ------------------------------------------------------------------------------------------------


def free_port():
    """A port nobody listens on now (bound to port 0, then released): other test runs may be on this machine."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launch(jobs, out, world=2):
    """`world` rank processes that run `jobs` one after the other (one start-up of torch for all of them), each job
    a dict: name, script, argv and options (compiled: aot_eager; cudagraphs: see test_gpu_ddp), on a port of its
    own. A rank's stdout and stderr go to out/rankN.out and .err, what instrument() saw in a job to
    out/NAME.rankN.pt; a rank exits with the first non-zero exit code of its jobs."""
    os.makedirs(out, exist_ok=True)
    jobs = [dict(job, argv=[str(a) for a in job['argv']], port=free_port()) for job in jobs]
    procs = []
    for rank in range(world):
        spec = dict(rank=rank, world=world, out=out, jobs=jobs)
        with open(os.path.join(out, f'rank{rank}.out'), 'w') as o, open(os.path.join(out, f'rank{rank}.err'), 'w') as e:
            env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED='1')
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps(spec)], cwd=ROOT,
                                          stdout=o, stderr=e, env=env))
    return procs


def wait_all(procs, out, timeout=900):
    """Wait for every rank; a rank that failed fails the test with the end of its stderr."""
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            proc.kill()
    for rank, proc in enumerate(procs):
        err = open(os.path.join(out, f'rank{rank}.err')).read()
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}: {err[-3000:]}"


def job_records(out, name, world=2):
    return [torch.load(os.path.join(out, f'{name}.rank{r}.pt'), weights_only=True) for r in range(world)]


def instrument(patch):
    """Watch the step mechanics through public hooks; patch(obj, name, value) is monkeypatch.setattr or setattr.
    Returns the record: per optimizer step, as the optimizer sees it, the all-reduces of the gradient buffer since
    the last step, how many gradients are views of the buffer, None or elsewhere, and how many trainable
    parameters had a gradient accumulated in this step; the first step's gradient buffer (averaged, before clip);
    and, when compiled, how many times the compiled backward ran."""
    record = dict(steps=[], first_grads=None, compiled_backward=0)
    live = dict(flat=None, reduces=0, accumulated=set())
    real_init, real_reduce = common.FlatGrads.__init__, torch.distributed.all_reduce

    def init(self, module, run):
        real_init(self, module, run)
        live['flat'] = self
        for i, p in enumerate(self.params):
            p.register_post_accumulate_grad_hook(lambda p, i=i: live['accumulated'].add(i))

    def all_reduce(tensor, *args, **kwargs):
        if live['flat'] is not None and tensor is live['flat'].buffer:
            live['reduces'] += 1
        return real_reduce(tensor, *args, **kwargs)

    def before_step(optimizer, args, kwargs):
        buffer = live['flat'].buffer
        lo, hi = buffer.data_ptr(), buffer.data_ptr() + buffer.numel() * buffer.element_size()
        grads = [p.grad for group in optimizer.param_groups for p in group['params']]
        views = sum(g is not None and lo <= g.data_ptr() and g.data_ptr() + g.numel() * g.element_size() <= hi
                    for g in grads)
        none = sum(g is None for g in grads)
        record['steps'].append(dict(reduces=live['reduces'], views=views, none=none,
                                    elsewhere=len(grads) - views - none, accumulated=len(live['accumulated']),
                                    trainable=len(live['flat'].params)))
        if record['first_grads'] is None:
            record['first_grads'] = buffer.detach().cpu().clone()
        live['reduces'] = 0
        live['accumulated'].clear()

    patch(common.FlatGrads, '__init__', init)
    patch(torch.distributed, 'all_reduce', all_reduce)
    record['hook'] = register_optimizer_step_pre_hook(before_step)
    return record


def compile_with_aot_eager(patch, record):
    """torch.compile as the scripts call it, on the CPU, with aot_eager: the forward and the backward are the
    AOTAutograd-compiled graphs (run eagerly), so the gradients come out of a compiled backward, as on CUDA."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def bw_compiler(gm, example_inputs):
        def backward(*args):
            record['compiled_backward'] += 1
            return gm(*args)
        return make_boxed_func(backward)
    backend = aot_autograd(fw_compiler=lambda gm, example_inputs: make_boxed_func(gm.forward), bw_compiler=bw_compiler)
    real_compile = torch.compile
    patch(common, 'compile_mode', lambda cfg, run: 'default')
    patch(torch, 'compile', lambda model, mode=None: real_compile(model, backend=backend))


def perturbed(init):
    """FlatGrads.__init__ on a rank whose weights differ from rank 0's before it (a bug that seeded ranks apart)."""
    def init_from_other_weights(self, module, run):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.01)
        init(self, module, run)
    return init_from_other_weights


def rank_main(spec):
    """One rank: for each job, torchrun's environment, the instruments, then the script's command line through
    common.cli (as `python pretrain.py ...` runs), and the record saved whatever the exit."""
    import importlib
    codes = []
    for job in spec['jobs']:
        os.environ.update(RANK=str(spec['rank']), LOCAL_RANK=str(spec['rank']), WORLD_SIZE=str(spec['world']),
                          LOCAL_WORLD_SIZE=str(spec['world']), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(job['port']))
        module = importlib.import_module(job['script'])
        with pytest.MonkeyPatch.context() as mp:
            record = instrument(mp.setattr)
            if job.get('compiled'):
                compile_with_aot_eager(mp.setattr, record)
            if job.get('cudagraphs'):
                import test_gpu_ddp
                test_gpu_ddp.force_cuda_graphs(mp.setattr, record)
            if spec['rank'] > 0:  # this rank starts from other weights: the broadcast from rank 0 must replace them
                mp.setattr(common.FlatGrads, '__init__', perturbed(common.FlatGrads.__init__))
            mp.setattr(sys, 'argv', [job['script'] + '.py'] + job['argv'])
            try:
                common.cli(module.main)
            except SystemExit as e:
                codes.append(e.code)
            finally:
                record.pop('hook').remove()
                if job.get('cudagraphs'):
                    test_gpu_ddp.finish_record(record)
                torch.save(record, os.path.join(spec['out'], f"{job['name']}.rank{spec['rank']}.pt"))
    sys.exit(next((code for code in codes if code), 0))


# --- two ranks equal one process ----------------------------------------------------------------------------------

SMALL = ('--subset', 64, '--knn_bank', 0, '--val_images', 32, '--picture_every', 100, '--augment', 'false')
# name: (script, extra argv, compiled). 64 images in global batches of 32: 2 steps an epoch, 4 in all; with
# accumulation each rank runs two micro-batches of 8 per step
CASES = {
    'pretrain': ('pretrain', ('--epochs', 2), False),
    'smae-accum': ('pretrain', ('--epochs', 2, '--accum_steps', 2, '--alpha', 0.5, '--calib_batches', 1), False),
    'finetune-accum': ('finetune', ('--epochs', 2, '--accum_steps', 2, '--eval_every', 2), False),
    'dino-accum': ('dino', ('--epochs', 2, '--accum_steps', 2, '--local_crops_number', 2, '--freeze_last_layer', 1),
                   False),
    'pretrain-accum-compiled': ('pretrain', ('--epochs', 2, '--accum_steps', 2), True),
    'pretrain-accum': ('pretrain', ('--epochs', 2, '--accum_steps', 2), False),  # in one process only (below)
}
# one launch runs them all, one after the other (each launch of two ranks costs their start-up)
GROUPS = {'all': ['pretrain', 'smae-accum', 'finetune-accum', 'dino-accum', 'pretrain-accum-compiled']}


def random_critic(tmp_path):
    import bench
    with torch.random.fork_rng():  # the same critic whatever ran before in this process
        torch.manual_seed(0)
        args = bench.command(common.configure(vars(bench), [])[0], 'smae', 32, str(tmp_path))[1]
    return args[args.index('--critic') + 1]  # the random SqueezeNet critic bench.py's SMAE job writes


def case(name, tmp_path):
    """(module, argv without --out_dir, accumulation steps, compiled) of CASES[name]."""
    script, extra, compiled = CASES[name]
    module = __import__(script)
    argv = list(TINY) + ['--data_dir', str(tmp_path / 'data')] + [str(a) for a in SMALL + extra]
    argv = script_argv(module, argv + (['--critic', random_critic(tmp_path)] if '--alpha' in argv else []))
    return module, argv, int(dict(zip(argv[::2], argv[1::2])).get('--accum_steps', 1)), compiled


def final_weights(out):
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    return {**ck['model'], **{f'student.{k}': v for k, v in ck.get('student', {}).items()},
            **({'center': ck['center']} if 'center' in ck else {})}


@pytest.mark.parametrize('group', GROUPS)
def test_two_ranks_give_the_weights_of_one_process(group, tmp_path):
    """Each case on two ranks (with its --accum_steps) against one process with one micro-batch per step (the
    ranks run the cases one after the other; the one-process runs happen here meanwhile). The first step's averaged
    gradient agrees to 1e-4 relative, which a missing division by the world size or a gradient left un-reduced
    would miss by 50% or more (AdamW's update is nearly blind to a gradient's scale, so the weights alone would not
    show a missing division). The final weights agree to 2e-5 nearly everywhere: AdamW moves a weight by up to one
    lr (3e-5 to 1.25e-4 here) a step, and the ranks' means of half batches differ from the whole batch's mean only
    by float rounding (~1e-7 relative), which the normalised update magnifies only for gradients near its eps; there
    a weight can move by up to an lr either way, so a few weights in a million may differ by more (SMAE's critic
    makes such gradients: 25 of 4M weights differed by up to 2.8e-5 with one random critic). So: all but 1e-4 of the
    weights within 2e-5, and a mean difference under 1e-6. Steps on half batches, as ranks that never averaged
    would take, moved half the weights by more than 2e-5 and all by 5.5e-5 on average (measured once)."""
    cases = {name: case(name, tmp_path) for name in GROUPS[group]}
    procs = launch([dict(name=name, script=module.__name__, argv=argv + ['--out_dir', str(tmp_path / name / 'two')],
                         compiled=compiled) for name, (module, argv, _, compiled) in cases.items()], str(tmp_path))
    singles = {}
    for name, (module, argv, _, _) in cases.items():  # one process, one micro-batch a step, instrumented alike
        one_process = [a for pair in zip(argv[::2], argv[1::2]) if pair[0] != '--accum_steps' for a in pair]
        with pytest.MonkeyPatch.context() as mp:
            singles[name] = instrument(mp.setattr)
            try:
                assert module.main(one_process + ['--out_dir', str(tmp_path / name / 'one')]) == 0
            finally:
                singles[name].pop('hook').remove()
    wait_all(procs, str(tmp_path))

    for name, (module, argv, accum, compiled) in cases.items():
        ranks, single = job_records(str(tmp_path), name), singles[name]
        frozen = 1 if module.__name__ == 'dino' else 0  # DINO's last layer has no gradient in its frozen first epoch
        for rank, rec in enumerate(ranks):
            assert len(rec['steps']) == 4, name
            for i, step in enumerate(rec['steps']):
                where = f"{name}, rank {rank}, step {i + 1}"
                assert step['reduces'] == 1, f"{where}: {step['reduces']} all-reduces of the gradient buffer"
                assert step['elsewhere'] == 0, f"{where}: a gradient the optimizer reads is not in the flat buffer"
                assert step['none'] == (frozen if i < 2 else 0), f"{where}: {step['none']} gradients are None"
                assert step['views'] == step['trainable'] - step['none'], where
                assert step['accumulated'] == step['trainable'], f"{where}: a parameter got no gradient (a zero " \
                    "gradient is not a missing one to AdamW: it would decay and move)"
            if compiled:
                assert rec['compiled_backward'] == 4 * accum, f"{name}: the gradients are not the compiled backward's"
        assert [s['reduces'] for s in single['steps']] == [0] * 4 and all(s['elsewhere'] == 0 for s in single['steps'])
        assert torch.equal(ranks[0]['first_grads'], ranks[1]['first_grads']), f"{name}: the ranks' gradients differ"
        assert torch.allclose(ranks[0]['first_grads'], single['first_grads'], rtol=1e-4, atol=1e-7), \
            f"{name}: the ranks' averaged gradient is not the one process's"
        two, one = final_weights(tmp_path / name / 'two'), final_weights(tmp_path / name / 'one')
        assert set(two) == set(one), name
        diff = torch.cat([(two[key] - one[key]).abs().flatten().double() for key in one])
        far = (diff > 2e-5).double().mean().item()
        assert far < 1e-4 and diff.mean() < 1e-6, \
            f"{name}: {far:.1e} of the weights differ by more than 2e-5, by {diff.mean():.1e} on average"
        start = [json.loads(line) for line in open(tmp_path / name / 'two' / 'log.jsonl') if '"start"' in line]
        assert [(r['world_size'], r['backend']) for r in start] == [(2, 'gloo')], name  # only rank 0 writes


def test_one_process_with_accumulation_gives_the_weights_of_one_micro_batch(tmp_path):
    """--accum_steps 2 in one process against one micro-batch per step: the micro-steps add into the same gradient
    buffer, and every parameter gets its gradient there; the tolerance is the one above, for the same reason. (Each
    script's accumulation is also in the two-rank cases above.)"""
    module, argv, _, _ = case('pretrain-accum', tmp_path)
    one_micro = [a for pair in zip(argv[::2], argv[1::2]) if pair[0] != '--accum_steps' for a in pair]
    with pytest.MonkeyPatch.context() as mp:
        record = instrument(mp.setattr)
        try:
            assert module.main(argv + ['--out_dir', str(tmp_path / 'accum')]) == 0
        finally:
            record.pop('hook').remove()
    for i, step in enumerate(record['steps']):
        assert step['elsewhere'] == 0, f"step {i + 1}: {step['elsewhere']} gradients outside the flat buffer"
        assert step['accumulated'] == step['trainable'], f"step {i + 1}: a parameter got no gradient"
    assert module.main(one_micro + ['--out_dir', str(tmp_path / 'one')]) == 0
    accum, one = final_weights(tmp_path / 'accum'), final_weights(tmp_path / 'one')
    assert set(accum) == set(one) and all(torch.allclose(accum[k], one[k], atol=2e-5) for k in one)


# --- a rank that dies -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('victim', [1])  # (rank 0 killed instead: the same code path, rank 1 the survivor)
def test_a_killed_rank_ends_the_other_in_seconds_with_one_line(victim, tiny, tmp_path):
    """SIGKILL to one rank after the first checkpoint: the other rank's next collective fails, and it ends with one
    line on stderr naming the lost rank and a resume command that a shell splits back into the out_dir (it has a
    space), exit code 1, its lock released and no temporary file left."""
    out = str(tmp_path / 'run with space')
    argv = tiny('--epochs', 1000, *SMALL, '--ckpt_every', 1, out='run with space')
    procs = launch([dict(name='run', script='pretrain', argv=argv)], str(tmp_path))
    log, t0 = os.path.join(out, 'log.jsonl'), time.time()
    while not (os.path.exists(log) and '"checkpoint"' in open(log).read()):
        assert time.time() - t0 < 300 and all(p.poll() is None for p in procs), "the run ended before its checkpoint"
        time.sleep(0.1)
    procs[victim].send_signal(signal.SIGKILL)
    survivor = procs[1 - victim]
    try:
        survivor.wait(timeout=60)  # in practice about a second: its next all-reduce meets a closed connection
    finally:
        procs[victim].wait()
        survivor.kill()
    lines = open(tmp_path / f'rank{1 - victim}.err').read().strip().splitlines()
    assert survivor.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"pretrain.py: error: lost rank {victim} of 2 "), lines[0]
    command = shlex.split(lines[0].split('resume with ', 1)[1])
    assert command[:2] == ['torchrun', '--nproc_per_node=2'] and command[-4:] == ['--resume', 'true', '--out_dir', out]
    torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)  # the checkpoint it names is whole
    if victim == 1:  # the survivor is the writer: its lock is gone and nothing is half-written
        assert not os.path.exists(os.path.join(out, '.lock'))
        assert not [name for name in os.listdir(out) if '.tmp.' in name]


if __name__ == '__main__':
    rank_main(json.loads(sys.argv[1]))
