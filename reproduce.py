"""
The whole study as a list of steps, each a command, run up to JOBS at once, each pinned to a GPU (round-robin), in
an order that respects what every step needs and starts the longest chains first. reproduce.sh runs this file.

    ./reproduce.sh                          the full study on Tiny ImageNet + CUB (data/tiny-imagenet-200, CUB_200_2011)
    ./reproduce.sh quick                    the same path on the embedded demo data, a tiny schedule (a CPU, minutes)
    JOBS=2 ./reproduce.sh                   two steps at once: one per GPU on two GPUs, both on one GPU otherwise
    ./reproduce.sh full sweep_mask75_probe  only the steps named and the steps they need
    ./reproduce.sh full --list              every step: what it needs, its command, its estimated time on one H100

A step whose results.json exists is done and skipped; one whose ckpt.pt exists continues with --resume true; any
other starts fresh. Each step's output goes to <OUT>/logs/<step>.log; the terminal shows one table of the steps,
refreshed every few seconds (one line per change when the output is not a terminal), with the time left estimated
from the speeds the steps log. A failed step stops only the steps that need it. Ctrl-C or SIGTERM asks the running
steps to save a checkpoint and stop (a second Ctrl-C stops them at once); the same command continues later. At the
end <OUT>/RESULTS.md holds each result beside the study's. Exit status: 0 when every step is done, 1 when one failed,
2 for a bad setting, 128 + the signal when stopped.
"""
import contextlib
import ctypes
import difflib
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass

# settings, from the environment: name -> (default, what it is); --help prints them
SETTINGS = {
    'OUT': ('out/study', "the study's folder: <OUT>/<step>/ per step, <OUT>/logs/<step>.log, <OUT>/RESULTS.md"),
    'LAUNCH': ('python3', 'how each step starts, e.g. "torchrun --nproc_per_node=2" (each step then takes 2 GPUs)'),
    'JOBS': ('1', 'steps run at once, spread round-robin over the GPUs (several per GPU when JOBS exceeds them); '
                  'without a GPU, JOBS processes of OMP_NUM_THREADS threads each (default 1)'),
    'RATIOS': ('50 60 65 70 75 80 85 90', 'mask ratios (%) of the sweep; quick mode: 50 90'),
    'VARIANTS': ('mae_random mae_block50 smae_random smae_block50 smae1_random smae1_block50 dino',
                 'pre-training variants to run, each then fine-tuned on TIN and transferred to CUB'),
    'DATA_DIR': ('data', 'where tiny-imagenet-200/ and CUB_200_2011/ are (and the demo data cache)'),
}
QUICK_RATIOS = '50 90'      # the quick mode's sweep

# the pre-training variants: name -> (label, the study's TIN and CUB top-1 after fine-tuning, pre-training options);
# options that name the critic make the variant wait for it
VARIANTS = {
    'mae_random': ('MAE random 75%', '55.00', '42.54', []),
    'mae_block50': ('MAE block 50%', '48.77', '33.50', ['--masking', 'block', '--mask', '0.5']),
    'smae_random': ('SMAE a=0.5 random 75%', '54.40', '41.50', ['--alpha', '0.5', '--critic']),
    'smae_block50': ('SMAE a=0.5 block 50%', '53.90', '47.50', ['--alpha', '0.5', '--masking', 'block', '--mask', '0.5',
                                                                '--critic']),
    'smae1_random': ('SMAE a=1 random 75%', '52.70', '39.67', ['--alpha', '1', '--critic']),
    'smae1_block50': ('SMAE a=1 block 50%', '51.05', '42.90', ['--alpha', '1', '--masking', 'block', '--mask', '0.5',
                                                               '--critic']),
    'dino': ('DINO', '41.72', '24.09', None),  # dino.py, whose defaults are the study's DINO recipe
}
PAPER_PROBE = {50: '31.32', 60: '32.03', 65: '32.32', 70: '30.58', 75: '32.04', 80: '31.66', 85: '29.61',
               90: '28.14'}  # the study's linear-probe top-1 (%) after 200 epochs of pre-training at each mask ratio

# the cost model behind the order (longest chains first) and the first time estimates, before the steps log speeds:
# a step costs START_S + epochs x images x FLOPs per image / H100_FLOPS (the README's stated estimate, not measured)
H100_FLOPS = 2.17e9 * 31.5e3  # FLOP/s: the official MAE code on one H100, 31.5k images/s of 2.17 GFLOP (mask 0.75)
START_S = 60                # a guess of each step's fixed cost (start, data, compilation, evaluations)
GFLOP = {                   # training GFLOP per image at 64 px (what the scripts count for their MFU)
    'finetune': 7.099,      # ViT-Lite-7/4, all 256 patches (model.flops_per_image with no mask)
    'forward': 2.366,       # its forward alone: a probe's feature extraction, once
    'squeezenet': 0.1074,   # SqueezeNet 1.1 (the critic), 3 x its forward
    'critic': 0.0557,       # what SMAE adds: the critic on the image and on the reconstruction (4 forwards)
    'dino': 15.151,         # dino.py's default views: the student on 2 views x 3, the teacher on 2
}
PRETRAIN_GFLOP = {0.5: 3.859, 0.6: 3.152, 0.65: 2.809, 0.7: 2.474, 0.75: 2.170, 0.8: 1.849, 0.85: 1.535,
                  0.9: 1.228}  # a masked pre-training step (encoder on the visible patches, decoder on all)
IMAGES = {'tin': 100_000, 'cub': 5_994, 'demo': 1_536}  # train images per epoch (--subset aside)

POLL_S = 0.25               # seconds between looks at the running steps
REFRESH_S = 2.0             # seconds between redraws of the live table
STOPPED = (130, 143, -2, -15, -9)  # exit codes of a step stopped by Ctrl-C, SIGTERM or SIGKILL
IN_USE = 'is in use by'     # what a script says when another process holds its out_dir's lock


class SettingError(Exception):
    """A bad setting or argument: one line on stderr, exit code 2."""


@dataclass
class Step:
    name: str               # also the folder <OUT>/<name>
    what: str               # the experiment, for RESULTS.md
    paper: str              # the study's figure, or '-'
    script: str
    args: list              # everything after --out_dir
    needs: tuple            # the steps that must be done first
    out_dir: str

    def option(self, name, default=None):
        return self.args[self.args.index(name) + 1] if name in self.args else default

    def command(self, launch, resume=False):
        return launch + [self.script, '--out_dir', self.out_dir] + ['--resume', 'true'] * resume + self.args

    def kind(self):
        """Steps of one kind run at the same speed per FLOP; a measured kind estimates the others of its kind."""
        return f"{self.script} {self.option('--arch', 'vit')} {self.option('--dataset')}"

    def train_flops(self):
        """Epochs x images x FLOPs per image; a probe extracts its features once (its head costs next to nothing)."""
        images = int(self.option('--subset', 0)) or IMAGES[self.option('--dataset')]
        if self.script == 'probe.py':
            return images * GFLOP['forward'] * 1e9
        if self.script == 'pretrain.py':
            gflop = interpolate(PRETRAIN_GFLOP, float(self.option('--mask', 0.75)))
            gflop += GFLOP['critic'] if float(self.option('--alpha', 0)) > 0 else 0
        else:
            gflop = GFLOP['dino' if self.script == 'dino.py' else
                          'squeezenet' if self.option('--arch') == 'squeezenet' else 'finetune']
        return int(self.option('--epochs')) * images * gflop * 1e9


def interpolate(table, x):
    """Linear interpolation in a {x: y} table (clamped at its ends)."""
    xs = sorted(table)
    x = min(max(x, xs[0]), xs[-1])
    lo = max(k for k in xs if k <= x)
    hi = min(k for k in xs if k >= x)
    return table[lo] if hi == lo else table[lo] + (table[hi] - table[lo]) * (x - lo) / (hi - lo)


def study(mode, out, data_dir, variants, ratios):
    """The study's steps, in the order of its tables."""
    if mode == 'quick':
        tin = cub = ['--dataset', 'demo', '--data_dir', data_dir]
        tiny = ['--subset', '64', '--batch_size', '32', '--log_every', '1', '--warmup_epochs', '0', '--epochs', '1']
        size = ['--img_size', '32', '--patch_size', '8']  # for the runs that build a ViT (pre-training, from scratch)
        pretrain = sweep_pretrain = dino = tiny + size + ['--val_images', '32']
        finetune, scratch, critic = tiny, tiny + size, tiny
        probe = ['--subset', '64', '--epochs', '1', '--warmup_epochs', '0']
    else:
        tin, cub = ['--dataset', 'tin', '--data_dir', data_dir], ['--dataset', 'cub', '--data_dir', data_dir]
        pretrain = ['--epochs', '400']                # the rest of the paper's recipe is pretrain.py's defaults
        sweep_pretrain = ['--epochs', '200']          # the mask-ratio sweep: 200 epochs, then a 50-epoch probe
        dino = ['--epochs', '100']                    # dino.py's defaults: the study's DINO recipe
        finetune = ['--epochs', '100']                # lr 1e-3 (5e-4 on CUB), RandAugment(2, 9)
        scratch = ['--epochs', '400']                 # the supervised ViT-Lite baseline
        critic = ['--epochs', '200', '--warmup_epochs', '10', '--weight_decay', '0.15']  # their Table 4
        probe = ['--epochs', '50']                    # Adam lr 1e-3
    steps = []

    def step(name, what, paper, script, args, needs=()):
        steps.append(Step(name, what, paper, script, args, tuple(needs), os.path.join(out, name)))

    def ckpt(name):
        return os.path.join(out, name, 'ckpt.pt')

    step('critic', 'SqueezeNet 1.1 critic, TIN top-1', '-', 'finetune.py', ['--arch', 'squeezenet'] + tin + critic)
    step('supervised_tin', 'ViT-Lite from scratch, TIN top-1', '48.58', 'finetune.py', tin + scratch)
    step('supervised_cub', 'ViT-Lite from scratch, CUB top-1', '19.70', 'finetune.py', cub + scratch)
    for name in variants:  # each pre-training, then fine-tuned on TIN and transferred to CUB
        label, paper_tin, paper_cub, options = VARIANTS[name]
        if options is None:
            step(name, f'{label}: pre-training (kNN top-1 in its results.json)', '-', 'dino.py', tin + dino)
        else:
            uses_critic = '--critic' in options
            options = options + [ckpt('critic')] * uses_critic
            step(name, f'{label}: pre-training (val masked-patch loss)', '-', 'pretrain.py', tin + pretrain + options,
                 needs=['critic'] * uses_critic)
        step(f'{name}_ft_tin', f'{label}: fine-tune, TIN top-1', paper_tin, 'finetune.py',
             ['--ckpt', ckpt(name)] + tin + finetune, needs=[name])
        step(f'{name}_ft_cub', f'{label}: transfer, CUB top-1', paper_cub, 'finetune.py',
             ['--ckpt', ckpt(name)] + cub + finetune, needs=[name])
    for r in ratios:  # the mask-ratio sweep: a linear probe on TIN after each pre-training
        step(f'sweep_mask{r}', f'mask {r}%: pre-training (val masked-patch loss)', '-', 'pretrain.py',
             tin + sweep_pretrain + ['--mask', f'{r / 100:g}'])
        step(f'sweep_mask{r}_probe', f'mask {r}%: linear probe, TIN top-1', PAPER_PROBE.get(r, '-'), 'probe.py',
             ['--ckpt', ckpt(f'sweep_mask{r}')] + tin + probe, needs=[f'sweep_mask{r}'])
    return steps


def select(steps, names):
    """The steps named and every step they need (all of them when no name is given), in the study's order."""
    by_name = {s.name: s for s in steps}
    for name in names:
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=3)
            raise SettingError(f"no step named {name!r}" + (f": did you mean {' or '.join(close)}?" if close else
                                                            ": ./reproduce.sh --list names them"))
    wanted, todo = set(), list(names or by_name)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += by_name[name].needs
    return [s for s in steps if s.name in wanted]


def estimate_s(step):
    """A step's time on one H100 by the cost model (an estimate, until the steps log their own speeds)."""
    return START_S + step.train_flops() / H100_FLOPS


def chain_s(steps, duration):
    """For each step, its duration plus the longest chain of steps that wait for it: the order of the schedule."""
    waiting_for = {s.name: [t.name for t in steps if s.name in t.needs] for s in steps}
    chain = {}

    def length(name):
        if name not in chain:
            chain[name] = duration[name] + max((length(t) for t in waiting_for[name]), default=0)
        return chain[name]
    for s in steps:
        length(s.name)
    return chain


def makespan(steps, duration, jobs, running=None):
    """The wall time to finish `steps` with at most `jobs` at once, each started when what it needs is done and a slot
    is free, longest chain first (as the scheduler does); `running` ({name: seconds left}) already hold slots."""
    needs = {s.name: s.needs for s in steps}
    chain = chain_s(steps, duration)
    active = dict(running or {})               # name -> finish time
    pending = [s.name for s in steps if s.name not in active]
    now = 0.0
    while pending or active:
        unfinished = set(pending) | set(active)
        for name in sorted(pending, key=lambda n: -chain[n]):
            if len(active) < jobs and not unfinished & set(needs[name]):
                active[name] = now + duration[name]
                pending.remove(name)
        name = min(active, key=active.get)
        now = active.pop(name)
    return now


def fmt_time(seconds):
    s = int(max(0, seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# -----------------------------------------------------------------------------
# the machine: GPUs, launch commands, the out_dir locks


def visible_gpus():
    """The GPUs steps are spread over: CUDA_VISIBLE_DEVICES's entries when it is set, else those nvidia-smi lists."""
    if 'CUDA_VISIBLE_DEVICES' in os.environ:
        gpus = []
        for entry in os.environ['CUDA_VISIBLE_DEVICES'].split(','):
            if not entry.strip() or entry.strip().startswith('-'):  # CUDA ignores everything after an invalid entry
                break
            gpus.append(entry.strip())
        return gpus
    try:
        listed = subprocess.run(['nvidia-smi', '--query-gpu=index', '--format=csv,noheader'], capture_output=True,
                                text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return listed.stdout.split() if listed.returncode == 0 else []


def gpus_per_step(launch):
    """The processes (one per GPU) LAUNCH starts for a step: torchrun's --nproc_per_node, else 1."""
    for i, token in enumerate(launch):
        for flag in ('--nproc_per_node', '--nproc-per-node'):
            if token == flag or token.startswith(flag + '='):
                value = token.split('=', 1)[1] if '=' in token else (launch[i + 1] if i + 1 < len(launch) else '')
                if not value.isdigit() or int(value) < 1:
                    raise SettingError(f"LAUNCH: {flag} {value!r}: give the number of processes per step, e.g. "
                                       f"{flag}=2 (the scheduler gives each step that many GPUs)")
                return int(value)
    return 1


def launch_command(launch):
    """LAUNCH as a list; torchrun gets --standalone (a free rendezvous port of its own) unless LAUNCH sets the
    rendezvous itself, so that steps running side by side never meet on one port."""
    launch = shlex.split(launch)
    own = ('--standalone', '--rdzv', '--master', '--nnodes')  # --rdzv-endpoint, --master_port, ... and multi-node
    for i, token in enumerate(launch):
        if os.path.basename(token) == 'torchrun' or token == 'torch.distributed.run':
            if not any(t.replace('_', '-').startswith(own) for t in launch):
                launch.insert(i + 1, '--standalone')
            break
    return launch


def pick_gpus(load, count):
    """The `count` GPUs running the fewest steps (the lowest index first): round-robin as steps come and go."""
    return sorted(load, key=lambda g: (load[g], list(load).index(g)))[:count]


def lock_holder(out_dir):
    """Who holds the out_dir's lock (the flock each script takes on its out_dir), or None when it is free."""
    try:
        fd = os.open(out_dir, os.O_RDONLY)
    except OSError:
        return None  # no folder yet: nobody runs there
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except BlockingIOError:  # the holder's pid, from the kernel's table of locks (Linux; the scripts write no file)
        with contextlib.suppress(OSError, ValueError, IndexError):
            st = os.fstat(fd)
            inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
            pids = [line.split()[4] for line in open('/proc/locks') if line.split()[5] == inode]
            return f"pid {pids[0]}"
        return 'another process'
    finally:
        os.close(fd)  # releases the lock if we took it


def _stop_with_scheduler(scheduler_pid):
    """In a step's process before it starts: the kernel sends it SIGTERM when the scheduler ends however it ends
    (kill -9 too: PR_SET_PDEATHSIG, Linux), and it saves a checkpoint and stops as on Ctrl-C; no step outlives us."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    if os.getppid() != scheduler_pid:  # the scheduler died before the line above: do not start
        os._exit(143)


def kill_tree(pid):
    """SIGKILL to a step's process and everything descended from it: its process group, and on Linux every
    descendant found in /proc (torchrun starts its workers in sessions of their own, out of reach of the group)."""
    children = {}
    for entry in os.listdir('/proc') if os.path.isdir('/proc') else []:
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent = int(open(f'/proc/{entry}/stat').read().rsplit(')', 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def last_line(path):
    """The last line a log holds (what a failed script printed last: its one-line error)."""
    with contextlib.suppress(OSError), open(path, 'rb') as f:
        f.seek(max(0, os.path.getsize(path) - 4096))
        lines = [line.rsplit('\r', 1)[-1].strip() for line in f.read().decode(errors='replace').splitlines()]
        return next((line for line in reversed(lines) if line), '')
    return ''


class LogTail:
    """What a step's log.jsonl says so far: its last start record and its last train record, read as it grows."""

    def __init__(self, path):
        self.path, self.offset, self.start, self.train, self.seen = path, 0, None, None, 0.0

    def skip_to_end(self):
        """Read only what is written from now on (a relaunched step's old records are not its progress)."""
        with contextlib.suppress(OSError):
            self.offset = os.path.getsize(self.path)
        self.start = self.train = None

    def update(self):
        with contextlib.suppress(OSError), open(self.path, 'rb') as f:
            f.seek(self.offset)
            chunk = f.read()
            chunk = chunk[:chunk.rfind(b'\n') + 1]  # whole lines only: the last may be half-written
            self.offset += len(chunk)
            for line in chunk.splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get('event') == 'start':
                        self.start, self.train = record, None
                    elif record.get('event') == 'train' and 'step' in record:
                        self.train, self.seen = record, time.time()
        return self

    def total_steps(self):
        with contextlib.suppress(KeyError, TypeError):
            return self.start['config']['epochs'] * self.start['steps/epoch']
        return None

    def train_s(self):
        """The whole run's training time at its last logged speed."""
        with contextlib.suppress(KeyError, TypeError, ZeroDivisionError):
            return self.total_steps() * self.start['config']['batch_size'] / self.train['images_per_s']
        return None

    def left_s(self):
        """Training time left: the last logged eta, less the time since it was logged."""
        return max(0.0, self.train['eta_s'] - (time.time() - self.seen)) if self.train else None


# -----------------------------------------------------------------------------
# the scheduler


class Scheduler:
    """Runs the steps, at most `jobs` at once, and keeps the table of their states."""

    def __init__(self, steps, jobs, launch, gpus, out, mode, rerun, tty):
        self.steps, self.jobs, self.launch, self.out, self.mode, self.rerun, self.tty = \
            steps, jobs, launch, out, mode, rerun, tty
        self.per_step = gpus_per_step(launch)
        self.load = {g: 0 for g in gpus}
        self.threads = os.environ.get('OMP_NUM_THREADS', '1')  # per CPU job, whatever JOBS is: see the README
        self.chain = chain_s(steps, {s.name: estimate_s(s) for s in steps})
        self.state = {s.name: 'waiting' for s in steps}  # waiting ready running done failed blocked elsewhere stopped
        self.note = {s.name: '' for s in steps}           # what the table says beside the state
        self.proc, self.gpus, self.began, self.ended = {}, {}, {}, {}
        self.tails = {s.name: LogTail(os.path.join(s.out_dir, 'log.jsonl')) for s in steps}
        self.log_dir = os.path.join(out, 'logs')
        self.stopping, self.stop_sent, self.t0, self.drawn, self.last_draw = 0, False, time.time(), 0, 0.0

    def log_path(self, step):
        return os.path.join(self.log_dir, step.name + '.log')

    # --- what happens -------------------------------------------------------------------------------

    def run(self):
        os.makedirs(self.log_dir, exist_ok=True)
        where = (f"on {len(self.load)} GPU(s) ({', '.join(self.load)})" if self.load else
                 f"on the CPU ({self.threads} thread(s) each)")
        self.say(f"{self.mode} study: {len(self.steps)} steps, up to {self.jobs} at once {where}; each step's output "
                 f"in {self.log_dir}/<step>.log")
        for s in self.steps:
            if os.path.exists(os.path.join(s.out_dir, 'results.json')):
                self.set(s, 'done', 'done earlier', f"== {s.name}: done, skipped")
        handlers = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            while True:
                self.reap()
                if not self.stopping:
                    self.advance()
                active = [n for n, st in self.state.items() if st in ('running', 'elsewhere', 'ready', 'waiting')]
                if not self.proc and (self.stopping or not active):
                    break
                if self.stopping and not self.stop_sent:
                    self.stop_sent = True
                    for name, proc in self.proc.items():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(proc.pid, signal.SIGTERM)  # the step saves a checkpoint and exits 143
                    self.say(f"stopping: asked {len(self.proc)} running step(s) to save and stop "
                             f"(Ctrl-C again stops them at once)")
                self.draw()
                time.sleep(POLL_S)
        finally:
            for proc in self.proc.values():  # only if the loop itself broke: no step outlives the scheduler
                kill_tree(proc.pid)
            for sig, old in handlers.items():
                signal.signal(sig, old)
        self.draw(final=True)
        write_results(self.steps, self.state, self.note, self.out, self.log_path, self.mode)
        failed = [n for n, st in self.state.items() if st == 'failed']
        if self.stopping:
            self.say(f"stopped; `{self.rerun}` continues from here (finished steps are skipped, stopped ones resume)")
            return 128 + self.stopping
        if failed:
            self.say(f"{len(failed)} step(s) failed: {', '.join(failed)} (their logs: {self.log_dir}); "
                     f"results so far: {os.path.join(self.out, 'RESULTS.md')}")
            return 1
        self.say(f"results: {os.path.join(self.out, 'RESULTS.md')}")
        return 0

    def on_signal(self, signum, frame):
        if self.stopping:  # the second Ctrl-C: stop every step now (their last checkpoints are intact)
            for proc in self.proc.values():
                kill_tree(proc.pid)
        self.stopping = self.stopping or signum

    def advance(self):
        """Move every step that is not finished as far as it can go, and start what is ready, longest chain first."""
        for s in sorted(self.steps, key=lambda s: -self.chain[s.name]):
            if self.state[s.name] not in ('waiting', 'ready', 'elsewhere'):
                continue
            failed = [n for n in s.needs if self.state[n] in ('failed', 'blocked')]
            if failed:
                why = f"needs {failed[0]}, which {'failed' if self.state[failed[0]] == 'failed' else 'was not run'}"
                self.set(s, 'blocked', f"not run: {why}", f"== {s.name}: not run: {why}")
                continue
            missing = [n for n in s.needs if self.state[n] != 'done']
            if missing:
                self.set(s, 'waiting', f"waiting for {', '.join(missing)}")
                continue
            if os.path.exists(os.path.join(s.out_dir, 'results.json')):  # finished by another process
                self.set(s, 'done', 'done by another process', f"== {s.name}: done (by another process)")
                continue
            holder = lock_holder(s.out_dir)
            if holder:
                self.set(s, 'elsewhere', f"running in another process, {holder}: waiting for it",
                         f"== {s.name}: running in another process, {holder}: waiting for it")
            elif len(self.proc) < self.jobs:
                self.start(s)
            else:
                self.set(s, 'ready', 'ready: waiting for a free slot')

    def start(self, s):
        resume = os.path.exists(os.path.join(s.out_dir, 'ckpt.pt'))
        command = s.command(self.launch, resume)
        env = dict(os.environ, PYTHONUNBUFFERED='1')
        if self.load:
            self.gpus[s.name] = pick_gpus(self.load, self.per_step)
            for g in self.gpus[s.name]:
                self.load[g] += 1
            env['CUDA_VISIBLE_DEVICES'] = ','.join(self.gpus[s.name])
            where = f"GPU {env['CUDA_VISIBLE_DEVICES']}"
        else:
            env['OMP_NUM_THREADS'] = self.threads
            where = 'CPU'
        self.tails[s.name].skip_to_end()
        self.began[s.name] = time.time()
        with open(self.log_path(s), 'a') as log:
            log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} on {where}: {shlex.join(command)}\n")
            log.flush()
            try:
                self.proc[s.name] = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    start_new_session=True,  # a terminal's Ctrl-C reaches only the scheduler, which stops each step once
                    preexec_fn=lambda pid=os.getpid(): _stop_with_scheduler(pid))
            except OSError as e:
                for g in self.gpus.pop(s.name, []):
                    self.load[g] -= 1
                self.set(s, 'failed', f"FAILED: could not start {command[0]} ({e.strerror})",
                         f"== {s.name}: FAILED: could not start {shlex.join(command)} ({e.strerror})")
                return
        self.set(s, 'running', f"running on {where}" + (" (resumed)" if resume else ""),
                 f"== {s.name}: {'resuming' if resume else 'running'} on {where}: {shlex.join(command)}")

    def reap(self):
        for name, proc in list(self.proc.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.proc[name]
            self.ended[name] = time.time()
            for g in self.gpus.pop(name, []):
                self.load[g] -= 1
            s = next(s for s in self.steps if s.name == name)
            minutes = (self.ended[name] - self.began[name]) / 60
            line = last_line(self.log_path(s))
            if os.path.exists(os.path.join(s.out_dir, 'results.json')):
                self.set(s, 'done', f"done in {minutes:.1f} min", f"== {name}: done in {minutes:.1f} min")
            elif self.stopping and code in STOPPED:
                self.set(s, 'stopped', 'stopped: resumes on the next run', f"== {name}: stopped ({line})")
            elif code == 2 and IN_USE in line:  # another process took the lock first: wait for it, do not retry
                self.set(s, 'elsewhere', f"running in another process: waiting for it ({line})",
                         f"== {name}: running in another process: waiting for it ({line})")
            else:
                self.set(s, 'failed', f"FAILED (exit {code}): {line}",
                         f"== {name}: FAILED (exit {code}): {line}; its log: {self.log_path(s)}")

    # --- what the user sees -------------------------------------------------------------------------

    def set(self, s, state, note, line=None):
        """A step's new state; a line about it where there is one and it changed (the table shows the rest)."""
        changed = (self.state[s.name], self.note[s.name]) != (state, note)
        self.state[s.name], self.note[s.name] = state, note
        if line and changed:
            self.say(line)
            if not self.tty and state in ('done', 'failed'):
                self.say(f"   {self.summary()}")

    def say(self, line):
        self.erase()
        self.write(line + '\n')

    def write(self, text):
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except OSError as e:  # stdout went away (a closed pipe, a full disk): the steps run on, their logs hold all
            sys.stdout, self.tty, self.drawn = open(os.devnull, 'w'), False, 0
            print(f"reproduce.sh: stdout is lost ({e.strerror}): the steps run on; each writes <OUT>/logs/<step>.log",
                  file=sys.stderr)

    def erase(self):
        if self.drawn:
            self.write(f"\x1b[{self.drawn}F\x1b[J")  # up to the table's first line, clear to the end
            self.drawn = 0

    def draw(self, final=False):
        """The live table (a terminal only), redrawn every REFRESH_S seconds."""
        if not self.tty or (not final and time.time() - self.last_draw < REFRESH_S and self.drawn):
            return
        size = shutil.get_terminal_size()
        lines = self.table(size.lines - 2, final)
        self.erase()
        self.write(''.join(line[:size.columns - 1] + '\n' for line in lines))
        self.drawn, self.last_draw = (0 if final else len(lines)), time.time()

    def table(self, height, final=False):
        rows = [(s.name, self.describe(s)) for s in self.steps]
        if len(rows) + 2 > height:  # too tall for the terminal: the done, not run and waiting steps on a line each
            group = {'done': 'done', 'blocked': 'not run', 'waiting': 'waiting', 'ready': 'waiting'}
            folded = {name: [] for name in group.values()}
            for s in self.steps:
                if self.state[s.name] in group:
                    folded[group[self.state[s.name]]].append(s.name)
            rows = [(s.name, self.describe(s)) for s in self.steps if self.state[s.name] not in group]
            rows += [(f"({len(names)} {what})", ', '.join(names)) for what, names in folded.items() if names]
        width = max(len(name) for name, _ in rows)
        return [self.summary()] + [f"  {name:<{width}}  {text}" for name, text in rows] + \
               [f"  each step's output: {self.log_dir}/<step>.log" + (
                   '' if final else " | Ctrl-C stops the steps cleanly; the same command continues")]

    def describe(self, s):
        note = self.note[s.name]
        if self.state[s.name] != 'running':
            return note
        tail = self.tails[s.name].update()
        if tail.train and tail.total_steps():
            step, total = tail.train['step'], tail.total_steps()
            return (f"{note} | {100 * step / total:3.0f}% step {step}/{total} | "
                    f"{tail.train['images_per_s']:,.0f} img/s | eta {fmt_time(tail.left_s())}")
        return f"{note} | {fmt_time(time.time() - self.began[s.name])} | {last_line(self.log_path(s))}"

    def summary(self):
        count = {st: list(self.state.values()).count(st) for st in ('done', 'running', 'failed', 'blocked')}
        left = self.time_left()
        return (f"{count['done']}/{len(self.steps)} done, {count['running']} running"
                + (f", {count['failed']} failed" if count['failed'] else "")
                + (f", {count['blocked']} not run for it" if count['blocked'] else "")
                + f" | elapsed {fmt_time(time.time() - self.t0)} | time left "
                + (f"about {fmt_time(left)} (from the logged speeds)" if left is not None else
                   "known once a step has logged its speed"))

    def time_left(self):
        """The time to finish what is left: the running steps' logged etas; for the others, the cost model scaled by
        the speed measured on steps of the same kind (or on all measured steps) plus the start-up time measured on
        the steps finished here. None until a step has logged its speed."""
        measured, by_kind = [0.0, 0.0], {}
        for s in self.steps:
            train_s = self.tails[s.name].update().train_s()
            if train_s:
                per = by_kind.setdefault(s.kind(), [0.0, 0.0])
                for pair in (per, measured):
                    pair[0], pair[1] = pair[0] + train_s, pair[1] + s.train_flops() / H100_FLOPS
        if not measured[0]:
            return None
        starts = []
        for name in self.ended:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                results = json.load(open(os.path.join(self.out, name, 'results.json')))
                starts.append(max(0.0, self.ended[name] - self.began[name] - results['wall_s']))
        start_s = sum(starts) / len(starts) if starts else START_S

        def expected_s(s):
            seconds, estimate = by_kind.get(s.kind(), measured)
            return start_s + s.train_flops() / H100_FLOPS * seconds / estimate
        left = [s for s in self.steps if self.state[s.name] in ('waiting', 'ready', 'elsewhere', 'running')]
        running = {}
        for s in left:
            if self.state[s.name] == 'running':
                logged = self.tails[s.name].left_s()
                running[s.name] = logged if logged is not None else max(
                    0.0, expected_s(s) - (time.time() - self.began[s.name]))
        return makespan(left, {s.name: expected_s(s) for s in left}, self.jobs, running)


def write_results(steps, state, note, out, log_path, mode='full'):
    """<OUT>/RESULTS.md: each step's figure beside the study's and beside its floor where the step measures one (the
    same probe or kNN on the run's untrained encoder), and what became of the steps that have no figure."""
    lines = (["Quick mode: the embedded demo photographs (8 classes, 32 px) on a tiny schedule, not Tiny ImageNet or "
              "CUB. It runs the study's whole path; its figures mean something only beside their floor, and the "
              "paper's column shows what the full study compares them with.", ""] if mode == 'quick' else [])
    lines += ["| step | experiment | paper | floor | ours | wall clock |", "|---|---|---|---|---|---|"]
    failures = []
    for s in steps:
        ours, floor, wall = '-', '-', '-'
        if state[s.name] == 'done':
            r = json.load(open(os.path.join(s.out_dir, 'results.json')))
            if 'top1' in r:
                ours = f"{r['top1']:.2f}"
            elif r.get('knn_top1') is not None:
                ours = f"{r['knn_top1']:.2f}"
            elif r.get('val_loss') is not None:
                ours = f"{r['val_loss']:.4f}"
            found = (r.get('floor') or {}).get('top1') if isinstance(r.get('floor'), dict) else r.get('knn_floor')
            floor = f"{found:.2f}" if isinstance(found, (int, float)) else '-'
            wall = f"{r['wall_s'] / 60:.1f} min" if r.get('wall_s') is not None else '-'
        else:
            ours = note[s.name].replace('|', '\\|')
            if state[s.name] == 'failed':
                failures.append(f"- `{s.name}` {note[s.name]} (its log: {log_path(s)})")
        lines.append(f"| {s.name} | {s.what} | {s.paper} | {floor} | {ours} | {wall} |")
    if failures:
        lines += ['', f"{len(failures)} step(s) failed (the steps that need them were not run):"] + failures
    tmp = os.path.join(out, f'RESULTS.md.tmp.{os.getpid()}')  # written whole, then renamed
    with open(tmp, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    os.replace(tmp, os.path.join(out, 'RESULTS.md'))


# -----------------------------------------------------------------------------
# the command line


def usage():
    lines = [__doc__.strip(), '', 'settings (environment variables, e.g. JOBS=2 ./reproduce.sh quick), with defaults:']
    for name, (default, what) in SETTINGS.items():
        now = f" (now {os.environ[name]!r})" if name in os.environ else ''
        lines += [f"  {name}={default!r}", textwrap.fill(what + now, 116, initial_indent=' ' * 6,
                                                          subsequent_indent=' ' * 6)]
    return '\n'.join(lines)


def settings(mode):
    env = {name: os.environ.get(name, default) for name, (default, _) in SETTINGS.items()}
    if mode == 'quick' and 'RATIOS' not in os.environ:
        env['RATIOS'] = QUICK_RATIOS
    if not env['JOBS'].strip().isdigit() or int(env['JOBS']) < 1:
        raise SettingError(f"JOBS must be an integer >= 1 (steps run at once), got {env['JOBS']!r}")
    ratios = env['RATIOS'].split()
    bad = [r for r in ratios if not r.isdigit() or not 0 < int(r) < 100]
    if bad:
        raise SettingError(f"RATIOS must be mask ratios in % between 1 and 99 (e.g. '50 75'), got {bad[0]!r}")
    unknown = [v for v in env['VARIANTS'].split() if v not in VARIANTS]
    if unknown:
        raise SettingError(f"VARIANTS: unknown variant {unknown[0]!r}: choose from {' '.join(VARIANTS)}")
    if not env['LAUNCH'].strip() or not env['OUT'].strip():
        raise SettingError("LAUNCH and OUT may not be empty: unset them for the defaults")
    return env, [int(r) for r in ratios]


def check_data(steps, data_dir):
    """The full study's datasets are there before anything starts (one line instead of a failure per step)."""
    folders = {'tin': ('tiny-imagenet-200', 'tiny-imagenet-200.zip'), 'cub': ('CUB_200_2011', 'CUB_200_2011.tgz')}
    for dataset in dict.fromkeys(s.option('--dataset') for s in steps if s.option('--dataset') in folders):
        folder, archive = folders[dataset]
        if not os.path.isdir(os.path.join(data_dir, folder)):
            raise SettingError(f"{dataset}: dataset folder {os.path.join(data_dir, folder)} not found: unpack "
                               f"{archive} into {data_dir}/, or run python3 data.py download {dataset} --data_dir "
                               f"{data_dir}")


def list_steps(steps, launch, mode):
    duration = {s.name: estimate_s(s) for s in steps}
    print(f"{len(steps)} steps; a step whose {'ckpt.pt'} exists gets --resume true")
    for s in steps:
        estimate = f"; about {duration[s.name] / 60:.0f} min on one H100 (estimate)" if mode == 'full' else ''
        print(f"{s.name}  (needs: {', '.join(s.needs) or 'nothing'}{estimate})\n    {shlex.join(s.command(launch))}")
    if mode == 'full':
        print(f"estimated wall time on H100s: {fmt_time(makespan(steps, duration, 1))} with JOBS=1 on one GPU, "
              f"{fmt_time(makespan(steps, duration, 2))} with JOBS=2 on two GPUs (the README's stated speed, "
              f"{H100_FLOPS / 1e12:.1f} TFLOP/s, plus {START_S} s a step: not measured)")


def main(argv):
    if any(a in ('-h', '--help') for a in argv):
        print(usage())
        return 0
    options = [a for a in argv if a.startswith('-')]
    words = [a for a in argv if not a.startswith('-')]
    if set(options) - {'--list'}:
        raise SettingError(f"unknown option {sorted(set(options) - {'--list'})[0]}: usage: ./reproduce.sh "
                           f"[full|quick] [STEP ...] [--list] (--help for the settings)")
    mode = words.pop(0) if words and words[0] in ('full', 'quick') else 'full'
    env, ratios = settings(mode)
    steps = select(study(mode, env['OUT'], env['DATA_DIR'], env['VARIANTS'].split(), ratios), words)
    launch = launch_command(env['LAUNCH'])
    if '--list' in options:
        list_steps(steps, launch, mode)
        return 0
    if mode == 'full':
        check_data(steps, env['DATA_DIR'])
    if not shutil.which(launch[0]):
        raise SettingError(f"LAUNCH: {launch[0]} not found: install it, or set LAUNCH to a command that exists "
                           f"(the default is python3)")
    gpus = visible_gpus()
    if gpus and gpus_per_step(launch) > len(gpus):
        raise SettingError(f"LAUNCH runs {gpus_per_step(launch)} processes per step, one per GPU, but {len(gpus)} "
                           f"GPU(s) are visible: lower --nproc_per_node, or make more GPUs visible "
                           f"(CUDA_VISIBLE_DEVICES)")
    os.makedirs(env['OUT'], exist_ok=True)
    given = ' '.join(f"{k}={shlex.quote(os.environ[k])}" for k in SETTINGS if k in os.environ)
    rerun = ' '.join(filter(None, [given, './reproduce.sh', shlex.join(argv)]))
    scheduler = Scheduler(steps, int(env['JOBS']), launch, gpus, env['OUT'], mode, rerun,
                          tty=sys.stdout.isatty() and os.environ.get('TERM') != 'dumb')
    return scheduler.run()


if __name__ == '__main__':
    try:
        code = main(sys.argv[1:])
    except SettingError as e:
        print(f"reproduce.sh: error: {e}", file=sys.stderr)
        code = 2
    except BrokenPipeError:  # `--help | head`, `--list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's flush at exit fails no more)
        code = 0
    sys.exit(code)
