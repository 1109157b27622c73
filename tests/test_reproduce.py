"""reproduce.sh's scheduler: the study's steps and what each needs, longest chains first, a failure that stops only
its dependents, a stop at any moment (Ctrl-C, SIGTERM, kill -9) that leaves no process behind and a rerun that skips
what finished and resumes what was interrupted, a lock held by another process, GPUs round-robin. The tests run the
real scheduler through reproduce.sh with a stand-in for the training scripts (FAKE below, given as LAUNCH), so that
they take seconds; tests/test_readme.py runs the real scripts (and the same figures with JOBS=2 as with JOBS=1)."""
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from types import SimpleNamespace

import pytest

import reproduce
from conftest import ROOT

# A stand-in for a training script, started as `LAUNCH script.py --out_dir DIR [--resume true] ...`: it takes the
# out_dir's flock as the scripts do (refusing with their message when it is held), logs a start record and a train
# record per step to log.jsonl, saves ckpt.pt (its step, as JSON) and exits 128 + the signal on SIGTERM / SIGINT,
# and writes results.json at the end. FAKE_RECORD gets a line per start. FAKE_SLOW names steps that run ~60 s,
# FAKE_FAIL steps that fail at once, FAKE_BUSY_ONCE steps that say their out_dir is in use the first time, FAKE_STUCK
# steps that start a worker in a session of its own (as torchrun does) and do not stop on a signal.
FAKE = r'''
import fcntl, json, os, signal, sys, time


def refuse(message):  # as the scripts' one-line errors: stderr, exit 2
    print(f"{script}: error: {message}", file=sys.stderr)
    sys.exit(2)


argv = [a for a in sys.argv[1:] if not a.startswith('--nproc')]  # a LAUNCH option the fake does not use
script, opts = argv[0], dict(zip(argv[1::2], argv[2::2]))
out = opts['--out_dir']
name = os.path.basename(out)
os.makedirs(out, exist_ok=True)
busy = os.path.join(out, 'busy_once')
if name in os.environ.get('FAKE_BUSY_ONCE', '').split() and not os.path.exists(busy):
    open(busy, 'w').close()
    refuse(f"out_dir {out} is in use by pretrain (pid 1): wait for it or choose another --out_dir")
fd = os.open(out, os.O_RDONLY)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    refuse(f"out_dir {out} is in use by another run: wait for it or choose another --out_dir")
with open(os.environ['FAKE_RECORD'], 'a') as f:
    f.write(json.dumps(dict(step=name, resume=opts.get('--resume') == 'true', pid=os.getpid(), t=time.time(),
                            gpus=os.environ.get('CUDA_VISIBLE_DEVICES'),
                            threads=os.environ.get('OMP_NUM_THREADS'))) + '\n')
signals = []
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda s, frame: signals.append(s))
print(f"{script}: starting {name}", flush=True)
if name in os.environ.get('FAKE_STUCK', '').split():  # slow to stop, with a worker in a session of its own
    import subprocess
    worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)
    with open(os.environ['FAKE_RECORD'], 'a') as f:
        f.write(json.dumps(dict(step=name + '.worker', pid=worker.pid)) + '\n')
    time.sleep(120)
if name in os.environ.get('FAKE_FAIL', '').split():
    refuse(f"{name} broke on purpose")
ckpt = os.path.join(out, 'ckpt.pt')
total = 1200 if name in os.environ.get('FAKE_SLOW', '').split() else 3
first = json.load(open(ckpt))['step'] + 1 if os.path.exists(ckpt) else 1
with open(os.path.join(out, 'log.jsonl'), 'a') as log:
    log.write(json.dumps({'event': 'start', 'config': {'epochs': 1, 'batch_size': 10}, 'steps/epoch': total}) + '\n')
    for step in range(first, total + 1):
        time.sleep(0.05)
        log.write(json.dumps(dict(event='train', step=step, images_per_s=200.0, eta_s=(total - step) * 0.05)) + '\n')
        log.flush()
        if signals:
            json.dump(dict(step=step, signals=signals), open(ckpt, 'w'))
            print(f"stopped by signal at step {step}", flush=True)
            sys.exit(128 + signals[0])
json.dump(dict(step=total), open(ckpt, 'w'))
json.dump(dict(top1=sum(map(ord, name)) % 1000 / 10, wall_s=0.2), open(os.path.join(out, 'results.json'), 'w'))
print(f"{name} done", flush=True)
'''


class Study:
    """reproduce.sh run with the stand-in steps in a folder of its own."""

    def __init__(self, tmp_path):
        self.tmp, self.out, self.record = tmp_path, tmp_path / 'study', tmp_path / 'record.jsonl'
        (tmp_path / 'fake_step.py').write_text(FAKE)
        self.env = dict(os.environ, OUT=str(self.out), DATA_DIR=str(tmp_path / 'data'), CUDA_VISIBLE_DEVICES='',
                        LAUNCH=f"{sys.executable} {tmp_path / 'fake_step.py'}", FAKE_RECORD=str(self.record),
                        VARIANTS='mae_random', RATIOS='50', JOBS='2')

    def start(self, *args, **env):
        """The scheduler in a session of its own (as a shell's job: Ctrl-C goes to its whole process group)."""
        self.console = open(self.tmp / 'console.txt', 'w')
        return subprocess.Popen(['bash', os.path.join(ROOT, 'reproduce.sh')] + list(args), stdout=self.console,
                                stderr=subprocess.STDOUT, env=dict(self.env, **env), start_new_session=True)

    def run(self, *args, **env):
        return subprocess.run(['bash', os.path.join(ROOT, 'reproduce.sh')] + list(args), capture_output=True, text=True,
                              env=dict(self.env, **env), timeout=120)

    def output(self):
        return open(self.tmp / 'console.txt').read()

    def records(self):
        return [json.loads(line) for line in open(self.record)] if self.record.exists() else []

    def wait(self, predicate, what, timeout=60):
        t0 = time.time()
        while not predicate():
            assert time.time() - t0 < timeout, f"timed out waiting for {what}: {self.output()[-2000:]}"
            time.sleep(0.05)

    def results(self):
        return open(self.out / 'RESULTS.md').read()


@pytest.fixture
def fake(tmp_path):
    study = Study(tmp_path)
    yield study
    for r in study.records():  # a test that failed may leave its stand-ins: end them
        if alive(r['pid']):
            os.kill(r['pid'], signal.SIGKILL)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f'/proc/{pid}/stat') as f:  # a zombie (exited, not yet reaped by init) has ended too
        return f.read().rsplit(')', 1)[1].split()[0] != 'Z'


def wait_gone(pids, timeout=30):
    t0 = time.time()
    while any(alive(p) for p in pids) and time.time() - t0 < timeout:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


# --- the steps -----------------------------------------------------------------------------------------------

def test_the_study_steps_and_what_each_needs():
    steps = reproduce.study('full', 'O', 'data', list(reproduce.VARIANTS), [50, 60, 65, 70, 75, 80, 85, 90])
    by_name = {s.name: s for s in steps}
    assert len(steps) == len(by_name) == 3 + 3 * 7 + 2 * 8
    assert by_name['critic'].command(['python3']) == (
        'python3 finetune.py --out_dir O/critic --arch squeezenet --dataset tin --data_dir data --epochs 200 '
        '--warmup_epochs 10 --weight_decay 0.15').split()
    for s in steps:
        if s.name.startswith('smae'):  # the critic gates every SMAE pre-training, which names its checkpoint
            expected = ('critic',) if s.script == 'pretrain.py' else (s.name.rsplit('_ft_', 1)[0],)
            assert s.needs == expected
        elif '_ft_' in s.name or s.name.endswith('_probe'):  # each pre-training gates its own fine-tunes and probe
            source = s.name.rsplit('_ft_', 1)[0].removesuffix('_probe')
            assert s.needs == (source,) and s.option('--ckpt') == f'O/{source}/ckpt.pt'
        else:
            assert s.needs == ()
    assert by_name['smae_block50'].option('--critic') == 'O/critic/ckpt.pt'
    assert by_name['smae_block50'].option('--mask') == '0.5' and by_name['sweep_mask65'].option('--mask') == '0.65'
    assert by_name['dino_ft_cub'].option('--dataset') == 'cub' and by_name['dino'].script == 'dino.py'
    assert [s.name for s in reproduce.select(steps, ['smae_random_ft_cub'])] == ['critic', 'smae_random',
                                                                                 'smae_random_ft_cub']


def test_longest_chains_start_first_and_no_step_before_what_it_needs(fake, tmp_path):
    for folder in ('tiny-imagenet-200', 'CUB_200_2011'):  # the full mode checks that its datasets are there
        (tmp_path / 'data' / folder).mkdir(parents=True)
    done = fake.run('full', JOBS='1', VARIANTS='mae_random smae_random dino', RATIOS='50')
    assert done.returncode == 0, done.stdout + done.stderr
    order = [r['step'] for r in fake.records()]
    # on one H100: supervised_tin is the longest chain (70 min), then dino and its fine-tune (56); the critic (a
    # 1.5-minute step) starts next, as the head of critic -> smae_random -> its fine-tune (43 min), before
    # mae_random -> its fine-tune (41) and the sweep (21)
    assert order[:6] == ['supervised_tin', 'dino', 'critic', 'smae_random', 'mae_random', 'sweep_mask50'], order
    started = {r['step']: r['t'] for r in fake.records()}
    for s in reproduce.study('full', str(fake.out), 'data', ['mae_random', 'smae_random', 'dino'], [50]):
        for need in s.needs:
            assert os.path.getmtime(fake.out / need / 'results.json') <= started[s.name], (s.name, need)
    assert len(order) == len(set(order)) == 14 and all(r['threads'] == '1' for r in fake.records())


# --- failures, stops, resume, locks -----------------------------------------------------------------------------

def test_a_failed_step_stops_only_the_steps_that_need_it(fake):
    done = fake.run('quick', VARIANTS='mae_random smae_random', FAKE_FAIL='critic')
    assert done.returncode == 1
    ran = {r['step'] for r in fake.records()}
    assert not ran & {'smae_random', 'smae_random_ft_tin', 'smae_random_ft_cub'}  # they need the critic
    assert ran == {'critic', 'supervised_tin', 'supervised_cub', 'mae_random', 'mae_random_ft_tin',
                   'mae_random_ft_cub', 'sweep_mask50', 'sweep_mask50_probe'}
    why = "FAILED (exit 2): finetune.py: error: critic broke on purpose"  # the last line of the critic's log
    assert f"== critic: {why}" in done.stdout and "smae_random_ft_tin: not run: needs smae_random" in done.stdout
    table = fake.results()
    assert re.search(rf"^\| critic \|.*\| {re.escape(why)} \|", table, re.M)
    assert re.search(r"^\| smae_random \|.*\| not run: needs critic, which failed \|", table, re.M)
    assert re.search(r"^\| mae_random_ft_tin \|.*\| \d+\.\d\d \|", table, re.M)
    assert f"- `critic` {why} (its log: {fake.out / 'logs' / 'critic.log'})" in table


def test_after_kill_9_no_step_is_left_and_a_rerun_skips_the_finished_and_resumes_the_interrupted(fake):
    (fake.out / 'mae_random_ft_cub').mkdir(parents=True)  # what a refused or crashed run leaves: files, no ckpt.pt
    (fake.out / 'mae_random_ft_cub' / 'log.jsonl').write_text('{"event": "start"}\n')
    scheduler = fake.start('quick', RATIOS='', FAKE_SLOW='mae_random')
    fake.wait(lambda: 'supervised_cub: done' in fake.output() and 'critic: done' in fake.output(), 'the short steps')
    slow = next(r['pid'] for r in fake.records() if r['step'] == 'mae_random')
    os.kill(scheduler.pid, signal.SIGKILL)
    scheduler.wait()
    assert not wait_gone([slow]), "a step outlived the scheduler"
    assert json.load(open(fake.out / 'mae_random' / 'ckpt.pt'))['signals'] == [signal.SIGTERM]  # it saved
    first = len(fake.records())
    done = fake.run('quick', RATIOS='')
    assert done.returncode == 0, done.stdout + done.stderr
    again = {r['step']: r['resume'] for r in fake.records()[first:]}
    assert again == {'mae_random': True, 'mae_random_ft_tin': False, 'mae_random_ft_cub': False}
    assert done.stdout.count('done, skipped') == 3 and '== mae_random: resuming on CPU' in done.stdout


@pytest.mark.parametrize('stop', ['ctrl_c', 'sigterm'])
def test_ctrl_c_or_sigterm_asks_each_step_once_to_save_and_leaves_no_process(fake, stop):
    scheduler = fake.start('quick', FAKE_SLOW='mae_random sweep_mask50')  # the heads of the two longest chains
    fake.wait(lambda: len(fake.records()) == 2, 'two steps running')
    time.sleep(0.3)
    if stop == 'ctrl_c':
        os.killpg(scheduler.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    else:
        os.kill(scheduler.pid, signal.SIGTERM)   # a cluster's pre-emption, `kill`
    assert scheduler.wait(timeout=30) == (130 if stop == 'ctrl_c' else 143)
    assert not wait_gone([r['pid'] for r in fake.records()], timeout=5)
    for name in ('mae_random', 'sweep_mask50'):  # each got one SIGTERM from the scheduler (not the SIGINT), and saved
        assert json.load(open(fake.out / name / 'ckpt.pt'))['signals'] == [signal.SIGTERM]
        assert re.search(rf"^\| {name} \|.*\| stopped: resumes on the next run \|", fake.results(), re.M)
    assert 'stopping: asked 2 running step(s) to save and stop' in fake.output()
    assert "./reproduce.sh quick` continues from here" in fake.output()


def test_a_second_ctrl_c_kills_the_steps_that_do_not_stop_with_their_workers(fake):
    scheduler = fake.start('quick', 'supervised_tin', FAKE_STUCK='supervised_tin')
    fake.wait(lambda: len(fake.records()) == 2, 'the step and its worker')
    os.killpg(scheduler.pid, signal.SIGINT)
    fake.wait(lambda: 'stopping: asked 1 running step(s)' in fake.output(), 'the first Ctrl-C')
    time.sleep(0.5)
    assert scheduler.poll() is None  # the step has not stopped: the scheduler waits for it
    os.killpg(scheduler.pid, signal.SIGINT)
    assert scheduler.wait(timeout=30) == 130
    assert not wait_gone([r['pid'] for r in fake.records()], timeout=5)  # the step and its worker
    assert re.search(r"^\| supervised_tin \|.*\| stopped: resumes on the next run \|", fake.results(), re.M)


def test_a_step_running_in_another_process_is_waited_for_not_failed(fake):
    folder = fake.out / 'supervised_cub'
    folder.mkdir(parents=True)
    holder = os.open(folder, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a script running there holds it
    scheduler = fake.start('quick', 'supervised_cub', JOBS='1')
    message = f'== supervised_cub: running in another process, pid {os.getpid()}: waiting for it'
    fake.wait(lambda: message in fake.output(), 'the message')
    time.sleep(1.0)
    assert fake.records() == [] and scheduler.poll() is None  # it waits, starting nothing
    os.close(holder)  # the other run ends without finishing (no results.json): this scheduler takes over
    assert scheduler.wait(timeout=60) == 0, fake.output()
    assert fake.output().count(message) == 1 and [r['step'] for r in fake.records()] == ['supervised_cub']


def test_a_lock_taken_between_the_check_and_the_start_is_waited_for_too(fake):
    done = fake.run('quick', 'supervised_cub', FAKE_BUSY_ONCE='supervised_cub')
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count('running in another process: waiting for it') == 1 and 'FAILED' not in done.stdout
    assert [r['step'] for r in fake.records()] == ['supervised_cub']  # the refused start records nothing


# --- GPUs, the live table, the command line ---------------------------------------------------------------------

def test_steps_go_round_robin_over_the_visible_gpus(fake):
    done = fake.run('quick', JOBS='4', CUDA_VISIBLE_DEVICES='3,5', RATIOS='50 90')
    assert done.returncode == 0, done.stdout + done.stderr
    started = re.findall(r'^== \S+: running on GPU (\S+):', done.stdout, re.M)
    assert started[:4] == ['3', '5', '3', '5'] and len(started) == 10 and set(started) == {'3', '5'}
    assert sorted(r['gpus'] for r in fake.records()) == sorted(started)  # what each step was given
    # torchrun's processes: each step takes that many GPUs, two steps side by side on four GPUs
    done = fake.run('quick', 'supervised_tin', 'supervised_cub', LAUNCH=fake.env['LAUNCH'] + ' --nproc_per_node=2',
                    CUDA_VISIBLE_DEVICES='0,1,2,3', OUT=str(fake.out) + '2')
    assert done.returncode == 0 and sorted(r['gpus'] for r in fake.records()[-2:]) == ['0,1', '2,3']
    refused = fake.run('quick', LAUNCH=fake.env['LAUNCH'] + ' --nproc_per_node=2', CUDA_VISIBLE_DEVICES='0')
    assert refused.returncode == 2 and refused.stderr.startswith('reproduce.sh: error: LAUNCH runs 2 processes')


def test_torchrun_steps_side_by_side_get_a_rendezvous_port_each():
    assert reproduce.launch_command('torchrun --nproc_per_node=2') == ['torchrun', '--standalone', '--nproc_per_node=2']
    mine = 'torchrun --nproc_per_node 2 --master_port 29600'
    assert reproduce.launch_command(mine) == mine.split()  # the user's own rendezvous is left alone
    assert reproduce.gpus_per_step(reproduce.launch_command('torchrun --nproc_per_node 4')) == 4
    assert reproduce.gpus_per_step(['python3']) == 1


def test_in_a_terminal_one_table_is_redrawn_in_place(fake):
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack('HHHH', 40, 160, 0, 0))  # 40 lines of 160 columns
    scheduler = subprocess.Popen(['bash', os.path.join(ROOT, 'reproduce.sh'), 'quick', 'mae_random_ft_tin'],
                                 stdout=follower, stderr=follower,
                                 env=dict(fake.env, TERM='xterm', FAKE_SLOW='mae_random'))
    os.close(follower)
    screen, deadline = b'', time.time() + 60
    while time.time() < deadline:
        if select.select([leader], [], [], 0.2)[0]:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the scheduler has closed the terminal
                break
            screen += chunk
        if b'% step' in screen and scheduler.poll() is None and scheduler.returncode is None:
            scheduler.send_signal(signal.SIGINT)  # a row with the step's progress was drawn: enough
            scheduler.returncode = scheduler.wait(timeout=30)
    os.close(leader)
    text = screen.decode(errors='replace')
    assert scheduler.returncode == 130, text[-2000:]
    assert '\x1b[' in text  # the table is erased and redrawn, not appended
    assert re.search(r'mae_random +running on CPU \| +\d+% step \d+/1200 \| 200 img/s \| eta', text)
    assert re.search(r'mae_random_ft_tin +waiting for mae_random', text)
    assert 'time left about' in text


def test_a_reader_that_leaves_loses_the_output_not_the_study(fake):
    """`./reproduce.sh quick | head -1`: the scheduler's stdout breaks at once; one line on stderr says so, and every
    step still runs to its end (each has its log), exit 0; `--help | head -1` is silent."""
    scheduler = subprocess.Popen(['bash', os.path.join(ROOT, 'reproduce.sh'), 'quick'], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=fake.env)
    scheduler.stdout.readline()
    scheduler.stdout.close()  # what `| head -1` does
    err = scheduler.stderr.read()
    assert scheduler.wait(timeout=120) == 0, err
    assert err.strip().splitlines() == ["reproduce.sh: stdout is lost (Broken pipe): the steps run on; each writes "
                                        "<OUT>/logs/<step>.log"]
    assert all((fake.out / step / 'results.json').exists() for step in ('critic', 'mae_random', 'sweep_mask50_probe'))
    helped = subprocess.run(f"bash {os.path.join(ROOT, 'reproduce.sh')} --help | head -1", shell=True,
                            capture_output=True, text=True)
    assert helped.stderr == '' and helped.stdout.startswith('The whole study')


def test_help_prints_the_usage_and_every_setting_with_its_default():
    done = subprocess.run(['bash', os.path.join(ROOT, 'reproduce.sh'), '--help'], capture_output=True, text=True)
    assert done.returncode == 0 and './reproduce.sh quick ' in done.stdout and '--list' in done.stdout
    for name, (default, what) in reproduce.SETTINGS.items():
        assert f"  {name}={default!r}\n" in done.stdout and what.split(',')[0] in done.stdout


@pytest.mark.parametrize('env, args, message', [
    ({'JOBS': '0'}, ['quick'], "JOBS must be an integer >= 1 (steps run at once), got '0'"),
    ({'JOBS': 'two'}, ['quick'], "JOBS must be an integer >= 1"),
    ({'VARIANTS': 'mae'}, ['quick'], "VARIANTS: unknown variant 'mae': choose from mae_random"),
    ({'RATIOS': '75%'}, ['quick'], "RATIOS must be mask ratios in % between 1 and 99"),
    ({}, ['quick', 'sweep_mask55'], "no step named 'sweep_mask55': did you mean"),
    ({}, ['quick', '--jobs'], "unknown option --jobs"),
    ({'DATA_DIR': '/nonexistent'}, ['full'], "tin: dataset folder /nonexistent/tiny-imagenet-200 not found"),
    ({'LAUNCH': 'nosuchlauncher --x'}, ['quick'], "LAUNCH: nosuchlauncher not found: install it"),
])
def test_a_bad_setting_is_one_line_and_exit_2(fake, env, args, message):
    done = fake.run(*args, **env)
    assert done.returncode == 2 and done.stdout == '' and done.stderr.count('\n') == 1
    assert done.stderr.startswith('reproduce.sh: error: ' + message), done.stderr
    assert not fake.out.exists()


def test_list_prints_every_command_and_the_readme_gives_its_estimates():
    env = {k: v for k, v in os.environ.items() if k not in reproduce.SETTINGS}
    listed = subprocess.run(['bash', os.path.join(ROOT, 'reproduce.sh'), 'full', '--list'], capture_output=True,
                            text=True, env=env).stdout
    assert ('python3 pretrain.py --out_dir out/study/smae_random --dataset tin --data_dir data --epochs 400 '
            '--alpha 0.5 --critic out/study/critic/ckpt.pt') in listed
    estimate = re.search(r'estimated wall time on H100s: (\S+) with JOBS=1 on one GPU, (\S+) with JOBS=2', listed)
    readme = open(os.path.join(ROOT, 'README.md')).read().split('## Reproducing the paper', 1)[1]
    assert f"{estimate.group(1)} on one GPU" in readme and f"{estimate.group(2)} on two" in readme, estimate.groups()


def test_the_cost_model_uses_the_flops_the_scripts_count():
    import common
    import dino
    import model as M
    import torch
    cfg = M.make_config('vit_lite')
    for ratio, gflop in reproduce.PRETRAIN_GFLOP.items():
        assert M.flops_per_image(cfg, ratio) / 1e9 == pytest.approx(gflop, abs=1e-3)
    assert M.flops_per_image(M.make_config('vit_lite', num_classes=200), None) / 1e9 == pytest.approx(
        reproduce.GFLOP['finetune'], abs=1e-3)
    assert M.flops_per_image(cfg, None, train=False) / 1e9 == pytest.approx(reproduce.GFLOP['forward'], rel=1e-3)
    squeezenet, image = M.build_squeezenet(200).eval(), torch.zeros(1, 3, 64, 64)
    assert 3 * M.forward_flops(squeezenet, image) / 1e9 == pytest.approx(reproduce.GFLOP['squeezenet'], rel=1e-3)
    critic = squeezenet.features[:5]  # SMAE's critic: SqueezeNet up to its second Fire module
    assert 4 * M.forward_flops(critic, image) / 1e9 == pytest.approx(reproduce.GFLOP['critic'], rel=1e-3)
    dcfg = SimpleNamespace(**common.defaults(vars(dino)))
    size = dino.local_view_size(dcfg, cfg)
    net = dino.build(cfg, dcfg, size)
    assert dino.flops_per_image(net, 64, size, dcfg.local_crops_number, 'cpu') / 1e9 == pytest.approx(
        reproduce.GFLOP['dino'], rel=1e-3)
