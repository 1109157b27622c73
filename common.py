"""
Plumbing the scripts would otherwise copy: the config override and its rules, one-line errors, process setup
(torchrun, device, precision, out_dir lock, stop signals), atomic saves and safe loads, and the few shared
formulas (lr schedule, parameter groups, peak FLOPs). The training loops themselves live in their scripts.
"""
import contextlib
import ctypes
import dataclasses
import difflib
import fcntl
import json
import math
import os
import re
import shlex
import signal
import stat
import sys
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import torch
import torch.distributed as dist

import data
import model as M


class UserError(Exception):
    """Something the user can fix (a config value, a path, a file). Printed as one line; exit code 2."""


class PeerLost(Exception):
    """Under torchrun, another rank died (killed, crashed): printed as one line with the resume command; exit code 1."""


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGTERM, or SIGINT/SIGUSR1 where there is nothing to save): unwinds at once, so that finally
    blocks end worker processes and remove temporary files; cli exits 128 + the signal with one line."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


class NonFiniteLoss(Exception):
    """Training diverged. Printed as one line; exit code 1. The last good checkpoint is left as it was."""

    @classmethod
    def at(cls, loss, step, out_dir, fix="lower --lr, set --grad_clip 1.0, or use --dtype bfloat16"):
        kept = (f"the last good checkpoint {out_dir}/ckpt.pt is untouched"
                if os.path.exists(os.path.join(out_dir, 'ckpt.pt')) else "no checkpoint was written")
        return cls(f"loss became {loss} at step {step}; {kept}: {fix}")


def cli(main):
    """Run a script's main(argv), turning expected failures into one line on stderr and a non-zero exit. Its stdout
    may go away (`| head`, a full device): the printing stops, the run does not (see LosableStdout)."""
    script = os.path.basename(sys.argv[0])
    stdout, sys.stdout = sys.stdout, LosableStdout(sys.stdout, script)
    old_handler = signal.signal(signal.SIGTERM, _stop)  # outside a Run too (loading a checkpoint or the data)
    try:
        code = main(sys.argv[1:])
    except (UserError, data.DataError, NonFiniteLoss, PeerLost) as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        code = 1 if isinstance(e, (NonFiniteLoss, PeerLost)) else 2
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and "can't allocate memory" not in str(e):
            raise  # a bug: the traceback is what a bug report needs
        print(f"{script}: error: out of memory ({' '.join(str(e).split())[:160]}): {_memory_advice(_last_config)}",
              file=sys.stderr)
        code = 1
    except KeyboardInterrupt as e:  # Ctrl-C, or a Stopped signal
        signum = getattr(e, 'signum', signal.SIGINT)
        what = 'interrupted' if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"{script}: {what}", file=sys.stderr)
        code = 128 + signum
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        sys.stdout.flush()  # what is still buffered goes out through the guard, not in Python's flush at exit
        sys.stdout = stdout
    sys.exit(code if isinstance(code, int) else 0)  # benchmark modes return their figures


def _memory_advice(cfg):
    """What to lower when memory runs out: the batch, and first the image size when it is above the preset's (the
    tokens grow with its square, attention with its fourth power)."""
    usual = "a smaller --batch_size, or more --accum_steps for the same batch in smaller pieces"
    img_size = getattr(cfg, 'img_size', 0)
    preset = 64 if getattr(cfg, 'arch', 'vit') == 'squeezenet' else \
        M.PRESETS.get(getattr(cfg, 'model', ''), {}).get('img_size', M.ViTConfig.img_size)
    if img_size > preset:
        return (f"--img_size {img_size} is above the preset's {preset}, and memory grows with its square (attention "
                f"with its fourth power): use a smaller --img_size, or {usual}")
    return f"use {usual}"


class LosableStdout:
    """sys.stdout for a run whose reader may leave (`| head`: EPIPE) or whose device may fill up (ENOSPC): the first
    failed write says so in one line on stderr and every later print is dropped, while the run goes on (its
    log.jsonl has every record). Pointing the file descriptor at /dev/null also keeps Python's flush at exit from
    printing 'Exception ignored ... BrokenPipeError'."""

    def __init__(self, stream, script):
        self.stream, self.script, self.lost = stream, script, False

    def write(self, text):
        if not self.lost:
            try:
                return self.stream.write(text)
            except OSError as e:
                self._lose(e)
        return len(text)

    def flush(self):
        if not self.lost:
            try:
                self.stream.flush()
            except OSError as e:
                self._lose(e)

    def _lose(self, e):
        self.lost = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        with contextlib.suppress(OSError):
            why = 'closed by its reader' if isinstance(e, BrokenPipeError) else f"unwritable ({e.strerror or e})"
            print(f"{self.script}: stdout is {why}: printing stops here; the run goes on and logs to its "
                  f"out_dir's log.jsonl", file=sys.stderr, flush=True)

    def __getattr__(self, name):  # fileno, isatty, encoding, ...: the real stream's
        return getattr(self.stream, name)


# -----------------------------------------------------------------------------
# configuration: the constants at the top of a script, overridden by --name value / --name=value


def _number(lo=None, hi=None, lo_open=False, hi_open=False):
    return lambda v: (math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo))
                      and (hi is None or (v < hi if hi_open else v <= hi)))


def _choice(*options):
    return lambda v: v in options, 'one of ' + ', '.join(map(str, options))


def _rule(names, test, allowed):
    return dict.fromkeys(names.split(), (test, allowed))


# One rule per config name, whatever script has it: (test of the value, what is allowed). A default of '' or 0
# means "from the checkpoint, the preset or the recipe" and is always accepted. Booleans need no rule; FREE_TEXT
# names are paths or names that the script checks when it opens them (tests/test_design.py holds every other name
# of every script to a rule here).
RULES = {
    **_rule('subset max_images knn_bank warmup_epochs warmup bench_steps bench_warmup probe_epochs freeze_last_layer '
            'warmup_teacher_temp_epochs local_crops_number local_crops_size', lambda v: v >= 0, 'an integer >= 0'),
    **_rule('img_size patch_size epochs batch_size accum_steps calib_batches log_every ckpt_every picture_every '
            'eval_every val_images feature_batch knn_k steps process_timeout out_dim head_hidden head_bottleneck',
            lambda v: v >= 1, 'an integer >= 1'),
    **_rule('lr teacher_temp warmup_teacher_temp student_temp knn_temperature', _number(0, lo_open=True), 'a finite number > 0'),
    **_rule('min_lr weight_decay weight_decay_end', _number(0), 'a finite number >= 0'),
    **_rule('grad_clip', _number(0), 'a finite number >= 0 (0 = off)'),
    **_rule('mixup cutmix', _number(0), 'a Beta alpha >= 0 (0 = off)'),
    **_rule('beta1 beta2 drop_path label_smoothing', _number(0, 1, hi_open=True), 'a number in [0, 1)'),
    **_rule('momentum_teacher center_momentum', _number(0, 1), 'a number in [0, 1]'),
    **_rule('layer_decay', _number(0, 1, lo_open=True), 'a number in (0, 1] (1 = off)'),
    **_rule('global_crops_min', _number(0, 1, lo_open=True), 'a number in (0, 1]'),
    **_rule('local_crops_min', _number(0, 1, lo_open=True, hi_open=True), 'a number in (0, 1)'),
    **_rule('alpha', _number(0, 1), 'a number in [0, 1]: 0 is MAE, 0.5 the SMAE of the study'),
    **_rule('mask', M.mask_ratio_ok, 'a number in (0, 1): the fraction of patches hidden'),
    **_rule('data_dir out_dir', bool, 'a folder path'),
    **_rule('seed', lambda v: 0 <= v < 2 ** 63, 'an integer in [0, 2^63)'),
    **_rule('workers', lambda v: 0 <= v <= (os.cpu_count() or 1),
            f'an integer from 0 to the {os.cpu_count()} CPU cores (0 = all but one)'),
    **_rule('device', lambda v: v in ('auto', 'cpu', 'cuda') or (v.startswith('cuda:') and v[5:].isdigit()),
            'auto, cpu, cuda or cuda:N'),
    **_rule('batch_sizes', lambda v: all(p.strip().isdigit() and int(p) >= 1 for p in v.split(',')),
            'integers >= 1, comma-separated'),
    'dataset': _choice(*data.DATASETS), 'transfer_dataset': _choice('auto', 'none', *data.DATASETS),
    'model': _choice(*M.PRESETS), 'masking': _choice(*M.MASKINGS), 'weighting': _choice(*M.WEIGHTINGS),
    'global_pool': _choice(*M.POOLS), 'pool': _choice(*M.POOLS), 'arch': _choice('vit', 'squeezenet'),
    'dtype': _choice('bfloat16', 'float16', 'float32'), 'only': _choice('profile', 'summary', 'peer', 'loader'),
    'figures': (lambda v: set(v.split(',')) <= {'mae', 'smae', 'finetune', 'dino', 'loader', 'peer'},
                'names from mae, smae, finetune, dino, loader, peer, comma-separated'),
    'compile_mode': _choice('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'),
}  # img_size with patch_size, and the mask ratio on the grid: checked by model.ViTConfig when the script builds its model
_last_config = None  # the config of this process's script (configure sets it): cli's out-of-memory advice reads it
FREE_TEXT = ('ckpt', 'critic')  # checkpoint paths (or 'alexnet'), checked when loaded, before any data


def _convert(name, text, default):
    kind = type(default)
    if kind is bool:
        if text.lower() in ('true', '1', 'yes', 'on', 'false', '0', 'no', 'off'):
            return text.lower() in ('true', '1', 'yes', 'on')
        raise UserError(f"--{name} expects true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"--{name} expects {'an integer' if kind is int else 'a number'} (default {default}), "
                        f"got {text!r}") from None


TYPE_WORDS = {bool: 'true or false', int: 'an integer', float: 'a finite number', str: 'text'}


def _value_problem(name, value, default):
    """What is wrong with `value` for --name, or None: it must have the type of the script's default (an integer
    is a number too) and pass its rule in RULES. A default of '' or 0 means "from the checkpoint, the preset or the
    recipe" and is always accepted."""
    if not (type(value) is type(default) or (type(default) is float and type(value) is int)):
        return f"--{name} must be {TYPE_WORDS[type(default)]}, got {value!r}"
    if value == default and default in ('', 0):
        return None
    if name in RULES and not RULES[name][0](value):
        return f"--{name} must be {RULES[name][1]}, got {value!r}"
    return None


def help_text(namespace):
    """The script's docstring and its constants block, each as `--name default  # comment` (the --help page)."""
    names = defaults(namespace)
    lines = [namespace.get('__doc__', '').strip(), '', 'options (--name value or --name=value):']
    for line in open(namespace['__file__']).read().splitlines():
        name = line.split('=')[0].strip()
        if name in names and line.startswith(name + ' ') and '#' in line:
            lines.append(f"  --{name} {names[name]!s}".ljust(34) + ' ' + line.split('#', 1)[1].strip())
    return "\n".join(lines)


def defaults(namespace):
    """The configurable constants of a script: lower-case module globals of a plain type, in order."""
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and k.islower() and type(v) in (bool, int, float, str)}


def configure(namespace, argv, checks=()):
    """The script's constants with `--name value` / `--name=value` overrides applied and every value checked
    (RULES, then the script's own `checks` between values: (test(cfg), message with {name} fields); with --resume
    true, check_out_dir checks those on the checkpoint's config merged with the given names).
    Returns (config namespace, set of the names given). --help / -h prints the constants and exits 0."""
    known, given = defaults(namespace), set()
    config, argv = dict(known), list(argv or [])
    if any(a in ('-h', '--help') for a in argv):
        try:
            print(help_text(namespace), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader left, which is fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
    while argv:
        arg = argv.pop(0)
        if not arg.startswith('--') or arg == '--':
            raise UserError(f"unexpected argument {arg!r}: overrides are written --name value or --name=value")
        name, _, text = arg[2:].partition('=')
        if '=' not in arg:
            if not argv:
                raise UserError(f"--{name} needs a value: write --{name} VALUE or --{name}=VALUE")
            text = argv.pop(0)
        name = name.replace('-', '_')
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join('--' + c for c in close)}?" if close else f"known names: {', '.join(known)}"
            raise UserError(f"unknown config name --{name}: {hint} (--help lists them)")
        config[name] = _convert(name, text, known[name])
        given.add(name)
    for name, value in config.items():
        problem = _value_problem(name, value, known[name])
        if problem:
            raise UserError(problem)
    if 'warmup_epochs' in given and 'epochs' in config and config['warmup_epochs'] >= config['epochs']:
        raise UserError(f"--warmup_epochs {config['warmup_epochs']} is not shorter than --epochs {config['epochs']}: the lr "
                        f"would never reach its peak; choose fewer warm-up epochs")
    # the rules between values below: on resume, check_out_dir applies them to the checkpoint's config merged with
    # the given names instead (here, a name not given holds the script's default, not the run's value)
    resume, world, accum = config.get('resume', False), int(os.environ.get('WORLD_SIZE', 1)), config.get('accum_steps')
    if not resume and accum and config['batch_size'] % (world * accum):
        step, batch = world * accum, config['batch_size']
        raise UserError(f"--batch_size {batch} does not split into {world} process{'es' * (world > 1)} x --accum_steps "
                        f"{accum} equal micro-batches: choose a multiple of {step} (e.g. "
                        f"{max(step, batch // step * step)}) or other --accum_steps")
    global _last_config
    cfg = _last_config = SimpleNamespace(**config)
    for test, message in checks if not resume else ():
        if not test(cfg):
            raise UserError(message.format(**config))
    return cfg, given


# -----------------------------------------------------------------------------
# the process: torchrun, device, precision, out_dir lock, stop signals


class Run:
    """What a script needs to know about its process; a context manager that undoes its setup on exit.
    torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is one process."""

    def __init__(self, cfg, script, lock=True, training=True):
        self.script, self.cfg, self.lock, self.training = script, cfg, lock, training
        self.ddp = int(os.environ.get('RANK', -1)) != -1
        want = getattr(cfg, 'device', 'auto')
        want = ('cuda' if torch.cuda.is_available() else 'cpu') if want == 'auto' else want
        if want.startswith('cuda') and not torch.cuda.is_available():
            raise UserError(f"--device {want} asked for, but no CUDA device is available: use --device cpu")
        self.rank, self.local_rank, self.world_size = (
            [int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')] if self.ddp else (0, 0, 1))
        # torchrun: a GPU per local rank (LOCAL_RANK), talking over NCCL; where a node has fewer GPUs than ranks
        # (e.g. two ranks on a 1-GPU machine, to test) they share them and talk over gloo, as on a CPU
        gpus, local_ranks = torch.cuda.device_count(), int(os.environ.get('LOCAL_WORLD_SIZE', self.world_size))
        self.device = torch.device(f'cuda:{self.local_rank % gpus}' if self.ddp and want.startswith('cuda') else want)
        self.master, self.cuda = self.rank == 0, self.device.type == 'cuda'
        self.backend = ('nccl' if self.cuda and local_ranks <= gpus else 'gloo') if self.ddp else None
        if self.cuda and self.device.index is not None and self.device.index >= torch.cuda.device_count():
            raise UserError(f"--device {want}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        # precision: bf16 autocast by default on CUDA; fp16 adds a GradScaler; the CPU runs float32
        self.dtype = getattr(cfg, 'dtype', 'float32') if self.cuda else 'float32'
        self.autocast = (torch.autocast('cuda', dtype=getattr(torch, self.dtype)) if self.dtype != 'float32'
                         else contextlib.nullcontext())
        self.scaler = torch.amp.GradScaler('cuda', enabled=self.dtype == 'float16')
        self.out_dir, self.stop_signal, self._lock_fd, self._old_handlers = cfg.out_dir, 0, None, {}
        self.in_loop = False  # set by a training loop as it starts: from then on a stop signal saves a checkpoint
        # what the run does differently from its config (on a CPU, a clipped warm-up): {name: (value, why)}
        self.effective = in_effect(cfg, self.cuda)
        if getattr(cfg, 'device', None) == 'auto':
            self.effective['device'] = (str(self.device), 'auto')
        # progress: every line goes through one lock; a thread prints the innermost active meter's line whenever
        # Progress.every seconds pass without one (the bottom meter is the run itself)
        self._print_lock, self._last_line = threading.RLock(), time.monotonic()
        self._meters, self._beat, self._beat_stop = [Progress(script, None, self)], None, threading.Event()
        self._tensorboard = None  # the SummaryWriter, made at the first record
        self._summary_writer = tensorboard_writer() if getattr(cfg, 'tensorboard', False) else None

    def __enter__(self):
        if self.ddp:
            if self.cuda:
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=self.backend)
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul/conv that remains
            torch.backends.cudnn.allow_tf32 = True
        if self.master and self.lock:
            self._lock_fd = lock_out_dir(self.out_dir, self.script)
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):  # pre-emption, a scheduler's warning, Ctrl-C
            with contextlib.suppress(ValueError):  # not the main thread
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        if self.master and (self.lock or self.training):  # a run or a training loop's benchmark: a line every 10 s
            self._beat = threading.Thread(target=self._heartbeat, name='progress', daemon=True)
            self._beat.start()
        return self

    def _on_signal(self, signum, frame):
        if not (self.training and self.in_loop) or (self.stop_signal and signum == signal.SIGINT):
            # unwind now (finally blocks end worker processes): no training script, or nothing to save yet (the data
            # is still decoding, the kNN floor running: minutes for TIN's first decode), or a second Ctrl-C
            raise Stopped(signum)
        self.stop_signal = signum    # a training loop saves a checkpoint after this step and exits 128 + signum

    def __exit__(self, exc_type, exc, tb):
        if self._beat is not None:
            self._beat_stop.set()
            self._beat.join()
        if self._tensorboard is not None:
            self._tensorboard.close()
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        if self._lock_fd is not None:
            unlock_out_dir(self._lock_fd, self.out_dir)
        if self.ddp and dist.is_initialized():
            dist.destroy_process_group()
        if self.ddp and lost_peer(exc):  # the backend's error, a traceback of our collective, says less than this
            raise PeerLost(self._lost_peer_line()) from None

    def _lost_peer_line(self):
        who = f"rank {1 - self.rank} of 2" if self.world_size == 2 else f"another of the {self.world_size} ranks"
        nodes = int(os.environ.get('LOCAL_WORLD_SIZE', self.world_size)) != self.world_size
        command = ("the same torchrun command on every node, ending in " if nodes else
                   f"torchrun --nproc_per_node={self.world_size} ") + f"{self.script}.py"
        ckpt = os.path.join(self.out_dir, 'ckpt.pt')
        if self.training and self.lock and os.path.exists(ckpt):
            then = (f"{ckpt} holds the last checkpoint: resume with {command} --resume true --out_dir "
                    f"{shlex.quote(self.out_dir)}")
        else:
            then = f"nothing was saved by this run: start it again ({command} ...)"
        return f"lost {who} (killed, crashed or out of memory: its own output says which); {then}"

    def print(self, *a):
        if self.master:
            with self._print_lock:
                print(*a, flush=True)
                self._last_line = time.monotonic()

    def _heartbeat(self):
        """The progress thread: whenever Progress.every seconds pass without a line, the line of the innermost active
        meter (a phase's, the training loop's, or the run's own). It reads host-side numbers only: never a device
        value, which would be a host sync (and could deadlock a CUDA graph replay)."""
        while True:
            with self._print_lock:
                meter = self._meters[-1]
                wait = meter.every - (time.monotonic() - self._last_line)
                if wait <= 0:
                    self.print(meter.line())
                    wait = meter.every
            if self._beat_stop.wait(min(max(wait, 0.01), 1.0)):
                return

    def _push(self, meter):
        with self._print_lock:
            self._meters.append(meter)

    def _pop(self, meter):
        with self._print_lock:
            if meter in self._meters[1:]:
                self._meters.remove(meter)

    def log(self, record, line=None):
        """Rank 0: the line (if any) on stdout and the record in <out_dir>/log.jsonl (a benchmark writes no files), and
        with --tensorboard true its numbers as TensorBoard scalars (train/ and val/, see tensorboard_scalars)."""
        if line:
            self.print(line)
        if self.master and self.lock:
            append_line(os.path.join(self.out_dir, 'log.jsonl'), json.dumps(record))
            if self._summary_writer is not None:
                if self._tensorboard is None:  # event files in out_dir: `tensorboard --logdir out` shows every run
                    self._tensorboard = self._summary_writer(self.out_dir, flush_secs=TENSORBOARD_FLUSH_S)
                for name, value in tensorboard_scalars(record).items():
                    self._tensorboard.add_scalar(name, value, record.get('step', 0))

    def mean(self, value):
        """A float averaged over ranks (a host sync: call it at log points, not every step)."""
        if not self.ddp:
            return float(value)
        t = torch.tensor([float(value)], device=self.device, dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def taken(self, why, **values):
        """Values the run took for names left at their "from elsewhere" default ('' or 0: the checkpoint's, the
        preset's, the recipe's), shown in the config line as `img_size=64 (the preset's)`: what is in effect."""
        for name, value in values.items():
            if getattr(self.cfg, name, None) in ('', 0) and value not in ('', 0, None):
                self.effective[name] = (value, why)

    def banner(self, extra):
        """The start record and its lines: versions and device, the config as in effect (a value that differs from the
        one asked for is followed by why: `dtype=float32 (bfloat16 on CUDA)`), and the script's `extra` facts."""
        dev = torch.cuda.get_device_name(self.device) if self.cuda else f'cpu ({torch.get_num_threads()} threads)'
        versions = f"torch {torch.__version__}, python {sys.version.split()[0]}"
        ranks = (f" x {self.world_size} ranks over {self.backend}" + (" (more ranks than GPUs: they share them)"
                 if self.cuda and self.backend == 'gloo' else "")) if self.ddp else ""
        shown = {k: shown_value(*self.effective[k]) if k in self.effective else v for k, v in vars(self.cfg).items()}
        self.log(dict(event='start', script=self.script, config=vars(self.cfg), versions=versions, device=dev,
                      world_size=self.world_size, backend=self.backend, dtype=self.dtype,
                      in_effect={k: value for k, (value, _) in self.effective.items()}, **extra),
                 f"{self.script}: {versions}; device {dev}{ranks}; {self.dtype}\nconfig: "
                 + " ".join(f"{k}={v}" for k, v in shown.items()) + "\n"
                 + " | ".join(f"{k} {v}" for k, v in extra.items()))


# What each script writes into its out_dir (log.jsonl is appended, never renamed into place): the only names whose
# temporary files (the name + '.tmp.' + the writing process's id, see save_atomic) a later run of it cleans up.
OUTPUTS = {'pretrain': r'ckpt\.pt|results\.json|curves\.png|recon_ep\d{4}\.png',
           'dino': r'ckpt\.pt|results\.json|curves\.png', 'finetune': r'ckpt\.pt|results\.json|curves\.png',
           'probe': r'ckpt\.pt|results\.json', 'evaluate': r'eval\.json|eval\.md|recon\.png',
           'bench': r'profile\.txt|summary\.md'}
_held = {}  # real path of an out_dir -> [its lock, how many holders in this process]


def lock_out_dir(out_dir, script):
    """Take the out_dir's lock: an exclusive flock on the folder itself, released by the OS when the process ends
    however it ends, so a killed run never leaves a stale lock and two runs can never both hold it. No file is
    written for it (who holds it is read from /proc/locks). The folder and missing parents are created; those still
    empty when it is unlocked are removed again, so a run refused after taking the lock leaves nothing behind. A
    process that holds the lock already gets it again (main() locks before its checks, Run then finds it held).
    Temporary files that an earlier run of `script` left in a save it did not finish are removed (see
    remove_stale_temps); nothing else in the folder is touched."""
    key = os.path.realpath(out_dir)
    if key in _held:
        _held[key][1] += 1
        return _held[key][0]
    missing, parent = [], os.path.abspath(out_dir)
    while not os.path.lexists(parent):
        missing.append(parent)  # deepest first
        parent = os.path.dirname(parent)
    lock = SimpleNamespace(fd=None, created=missing)
    for _ in range(3):  # again if another run removed the folder between our open and our flock (see unlock_out_dir)
        try:
            os.makedirs(out_dir, exist_ok=True)
            lock.fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise UserError(f"out_dir {out_dir} is not writable ({e.strerror}): choose another --out_dir") from None
        try:
            fcntl.flock(lock.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(out_dir)
            os.close(lock.fd)
            raise UserError(f"out_dir {out_dir} is in use by {holder}: wait for it or choose another --out_dir") \
                from None
        here, now = os.fstat(lock.fd), None
        with contextlib.suppress(OSError):
            now = os.stat(out_dir)
        if now is not None and (now.st_dev, now.st_ino) == (here.st_dev, here.st_ino):
            break
        os.close(lock.fd)
    else:
        raise UserError(f"out_dir {out_dir} keeps disappearing while it is locked: choose another --out_dir")
    _held[key] = [lock, 1]
    try:
        remove_stale_temps(out_dir, OUTPUTS.get(script))
    except OSError as e:
        unlock_out_dir(lock, out_dir)
        raise UserError(f"out_dir {out_dir} is not writable ({e.strerror}): choose another --out_dir") from None
    return lock


def unlock_out_dir(lock, out_dir):
    """Release lock_out_dir's lock (the last holder in this process releases the flock). The folders it created are
    removed while the lock is still held, if they are empty: a refused run leaves no empty out_dir behind."""
    key = os.path.realpath(out_dir)
    if key in _held:
        _held[key][1] -= 1
        if _held[key][1]:
            return
        del _held[key]
    for folder in lock.created:
        try:
            os.rmdir(folder)  # only an empty folder, only one this run created
        except OSError:
            break
    os.close(lock.fd)  # releases the flock


@contextlib.contextmanager
def out_dir_locked(out_dir, script, take=True):
    """lock_out_dir for a with block: main() holds it from before its first look at the out_dir until it returns,
    so nothing can change the folder between the checks and the writes. Only rank 0 of a torchrun job takes it (the
    other ranks write nothing); take=False (a benchmark, which writes nothing) takes none."""
    lock = lock_out_dir(out_dir, script) if take and int(os.environ.get('RANK', 0)) == 0 else None
    try:
        yield
    finally:
        if lock is not None:
            unlock_out_dir(lock, out_dir)


def lock_holder(out_dir):
    """'pretrain.py (pid N)': the process holding the flock on the folder, read from /proc/locks and
    /proc/N/cmdline (Linux; no file in the folder names it); 'another run' where those are not to be had."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        st = os.stat(out_dir)
        inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        for line in open('/proc/locks'):
            fields = line.split()  # '1: FLOCK  ADVISORY  WRITE 7761 fe:00:2236497 0 EOF' ('->' marks a waiter)
            if fields[1] == 'FLOCK' and fields[5] == inode:
                pid = int(fields[4])
                args = open(f'/proc/{pid}/cmdline', 'rb').read().decode(errors='replace').split('\0')
                name = next((os.path.basename(a) for a in args if a.endswith('.py')), ' '.join(args[:3]).strip())
                return f"{name} (pid {pid})" if name else f"pid {pid}"
    return 'another run'


def remove_stale_temps(folder, names):
    """Remove the temporary files that a killed save of ours left in `folder`: only a regular file of this user
    named <one of `names` (a regex)>.tmp.<pid>[.png] whose process <pid> is no longer alive. A user's own files,
    whatever their names, and the files of a save still under way are never touched."""
    if not names:
        return
    pattern = re.compile(rf'(?:{names})\.tmp\.(\d+)(?:\.png)?')
    for name in os.listdir(folder):
        match = pattern.fullmatch(name)
        path = os.path.join(folder, name)
        if match and not _alive(int(match.group(1))):
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
                os.remove(path)


def _alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):  # gone; a number no process can have
        return False
    except PermissionError:  # another user's process
        pass
    return True


def die_with_parent():
    """Run in a child process (a pool worker, a subprocess before it starts): the kernel sends it SIGKILL when its
    parent ends, however the parent ends (PR_SET_PDEATHSIG; Linux), so no script leaves orphans behind."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def compile_mode(cfg, run):
    """torch.compile's mode for a training step, or None for eager (the CPU, --compile false). CUDA graphs
    ('reduce-overhead', 'max-autotune') are kept in every case the loops run, torchrun and --accum_steps > 1
    included: what made them unsafe there was gradient memory, and FlatGrads moves it out of the graph pool
    (each backward adds into .grad views of one buffer of ours; the all-reduce runs on that buffer, after the
    replayed backward, outside the graph). In a benchmark (bench_steps > 0) a mode that asks for CUDA graphs gets
    them or fails: inductor's cudagraph_or_error turns a skip into an error (where the torch version has it;
    bench_start checks again)."""
    if not (cfg.compile and run.cuda):
        return None
    if cfg.compile_mode in CUDAGRAPH_MODES and getattr(cfg, 'bench_steps', 0):
        import torch._inductor.config as inductor_config
        if hasattr(inductor_config.triton, 'cudagraph_or_error'):
            inductor_config.triton.cudagraph_or_error = True
    return cfg.compile_mode


def in_effect(cfg, cuda):
    """{name: (value in effect, why)} for the precision and compile settings that differ from the config's: the CPU
    runs float32 and eager (compile_mode() keeps the mode asked for on CUDA, CUDA graphs included)."""
    out = {}
    if hasattr(cfg, 'dtype') and not cuda and cfg.dtype != 'float32':
        out['dtype'] = ('float32', f"{cfg.dtype} on CUDA")
    if getattr(cfg, 'compile', False) and not cuda:
        out['compile'], out['compile_mode'] = (False, 'eager on the CPU'), (None, f"{cfg.compile_mode} on CUDA")
    return out


def shown_value(value, why):
    return f"{value} ({why})"


# -----------------------------------------------------------------------------
# data parallelism without a wrapper: the gradients live in one flat buffer, all-reduced outside the graph


LOST_PEER = re.compile(r'remote (worker|process)|(closed|reset) by peer|Broken pipe|communicator was aborted')


def lost_peer(exc):
    """Whether an exception is a collective's failure because another rank is gone (gloo: 'Connection closed by
    peer', 'reset by peer'; NCCL: a remote process or an aborted communicator; torch's DistError family)."""
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and bool(LOST_PEER.search(str(exc))))


class FlatGrads:
    """The gradients of `module`'s trainable parameters as contiguous tensors over the memory of one flat fp32
    buffer (its views), for data parallelism that leaves the compiled step, CUDA graphs included, as it is in one
    process (no DistributedDataParallel wrapper: its hooks fire during the backward, between compiled graphs, as
    torch.compile splits the step at DDP's gradient buckets): after the last micro-batch's backward, all_reduce()
    averages the whole buffer over the ranks in one collective; then the loop clips and steps as usual, and zero()
    clears the buffer in one op. Under torchrun the parameters and buffers are first broadcast from rank 0, as
    DistributedDataParallel's constructor does.

    Why this is safe with CUDA graphs: a .grad exists before every backward, so autograd's AccumulateGrad adds the
    new gradient into it in place (torch/csrc/autograd/functions/accumulate_grad.h, 'Case 2.3: In-place addition')
    instead of keeping the compiled backward's output, which lives in the graph pool and is overwritten by the next
    replay, as the .grad ('Case 1.1', what happens after zero_grad(set_to_none=True)). Micro-batches accumulate into
    the buffer the same way. So nothing may set a .grad to None for good: where a step must skip a parameter (DINO's
    frozen last layer) the loop sets it to None before optimizer.step(), and zero() hands the view back."""

    def __init__(self, module, run):
        self.run = run
        if run.ddp:
            with torch.no_grad():
                for t in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(t.detach(), src=0)
        self.params = [p for p in module.parameters() if p.requires_grad]
        dtypes = {p.dtype for p in self.params}
        assert dtypes == {torch.float32}, f"FlatGrads needs float32 parameters, got {dtypes}"
        self.buffer = torch.zeros(sum(p.numel() for p in self.params), device=run.device)
        # each gradient: the parameter's shape over its slice of the buffer's memory. Made with set_, not by slicing:
        # torch.compile's fake tensors rebuild a slice (an autograd view) from its base for every parameter, which
        # made the first compile 2-3 times slower
        self.views, offset = [], 0
        for p in self.params:
            self.views.append(torch.empty(0, device=run.device).set_(self.buffer.untyped_storage(), offset, p.shape))
            offset += p.numel()
        self.zero()

    def all_reduce(self):
        """The mean of the gradients over the ranks: a sum, then a division (ReduceOp.AVG is NCCL-only). One process:
        nothing to do."""
        if self.run.ddp:
            dist.all_reduce(self.buffer)
            self.buffer.div_(self.run.world_size)

    def zero(self):
        """Zero every gradient (one op on the buffer) and make any .grad that was set to None its view again."""
        self.buffer.zero_()
        for p, view in zip(self.params, self.views):
            if p.grad is not view:
                p.grad = view


CUDAGRAPH_MODES = ('reduce-overhead', 'max-autotune')  # the torch.compile modes that capture CUDA graphs


def cudagraph_proof(run):
    """After warm-up, in a process whose compile mode asks for CUDA graphs: the number of graphs that inductor's
    CUDA-graph trees recorded, or a RuntimeError saying why CUDA graphs are not in use. Two proofs: inductor counted
    no skip, and a forward and a backward graph were recorded (a graph split into partitions can fall back to no
    graph without a count: pytorch/pytorch#176611). None where this torch's CUDA-graph trees cannot be read (their
    layout is internal): the skip count alone then proves it."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees
    skips = counters['inductor']['cudagraph_skips']
    if skips:
        raise RuntimeError(f"CUDA graphs were asked for, but inductor skipped them {skips} time(s) (its log says why: "
                           f"'skipping cudagraphs due to ...'): this figure would not be the graphed step")
    try:
        manager = cudagraph_trees.get_manager(run.device.index if run.device.index is not None else
                                              torch.cuda.current_device(), create_if_none_exists=False) if run.cuda else None
        todo = [node for nodes in (manager.roots.values() if manager else []) for node in nodes]
        kinds = []
        while todo:  # the tree: each recorded graph, then the graphs recorded after it
            node = todo.pop()
            kinds.append(manager.id_to_mode[node.wrapped_function.id].name)
            todo += [child for children in node.children.values() for child in children]
    except (AttributeError, KeyError):
        return None
    if not {'FORWARD', 'BACKWARD'} <= set(kinds):
        raise RuntimeError(f"CUDA graphs were asked for, but no {'backward' if 'FORWARD' in kinds else 'forward'} "
                           f"graph was recorded after warm-up (recorded: {', '.join(kinds) or 'none'})")
    return len(kinds)


# -----------------------------------------------------------------------------
# checkpoints: atomic writes, safe loads, resume


TORCH_WRITE_FAILED = re.compile(r'PytorchStreamWriter|inline_container|file write failed')  # torch.save's writer


def save_atomic(obj, path):
    """torch.save (or text, or bytes) to a temporary file in the same directory, fsync, then rename: never a half-written
    file. The temporary file is <path>.tmp.<pid> (a kill mid-save leaves it; remove_stale_temps knows it by that
    name). A full disk is one line that says the previous file is intact, whether it comes as an OSError or, from
    torch.save's zip writer, as a RuntimeError (with the OSError as its context, or none)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, 'w' if isinstance(obj, str) else 'wb') as f:
            f.write(obj) if isinstance(obj, (str, bytes)) else torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        cause = e  # torch's RuntimeError carries the OSError of the failed write as its context, when there was one
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None and not TORCH_WRITE_FAILED.search(str(e)):
            raise  # not a failed write: a bug, whose traceback is what a bug report needs
        why = (cause.strerror or str(cause) if cause is not None else
               f"the write failed, a full disk? {' '.join(str(e).split())[:100]}")
        kept = f"the previous {os.path.basename(path)} is intact" if os.path.exists(path) else "nothing was written"
        raise UserError(f"could not write {path} ({why}); {kept}: free some space or choose another --out_dir") \
            from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def save_checkpoint(ck, out_dir):
    """<out_dir>/ckpt.pt, written atomically. A results.json beside it (of a finished run that a resume trains
    further) no longer describes it and is removed: only results.json marks a run finished, so from this write on
    the folder is a run to resume, never a "finished" one whose checkpoint has moved on. (Until this write, a
    failed resume leaves the finished run as it was.)"""
    save_atomic(ck, os.path.join(out_dir, 'ckpt.pt'))
    results = os.path.join(out_dir, 'results.json')
    if os.path.exists(results):
        try:
            os.remove(results)
        except OSError as e:
            raise UserError(f"cannot remove {results} ({e.strerror}), the summary of the run before this resume: "
                            f"remove it by hand, then resume again") from None


def append_line(path, line):
    """Append one line to a log (log.jsonl). A full disk is one line (a UserError), and the log is cut back to its
    earlier lines: never a half-written last line."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    size, text = os.fstat(fd).st_size, (line + '\n').encode()
    try:
        while text:
            text = text[os.write(fd, text):]
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise UserError(f"could not append to {path} ({e.strerror}); its earlier lines are intact: free some space or "
                        f"choose another --out_dir") from None
    finally:
        os.close(fd)


def _tensor_dict(v):
    return isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values())


def _finite_number(v):
    return type(v) in (int, float) and math.isfinite(v)


# What a checkpoint holds: (test, what it must be) per key. Every reader needs READ_KEYS; a resume also needs its
# kind's RESUME_KEYS (a probe reruns from the start: it needs nothing more).
CHECKPOINT_KEYS = {
    'model': (_tensor_dict, 'a dict of weight tensors'),
    'model_config': (lambda v: isinstance(v, dict), 'a dict of the model\'s sizes'),
    'config': (lambda v: isinstance(v, dict), 'a dict of the run\'s config'),
    'optimizer': (lambda v: isinstance(v, dict) and isinstance(v.get('state'), dict)
                  and isinstance(v.get('param_groups'), list), 'an optimizer state dict'),
    'scaler': (lambda v: isinstance(v, dict), 'a GradScaler state dict'),
    'rng': (lambda v: isinstance(v, dict) and isinstance(v.get('torch'), torch.Tensor)
            and v['torch'].dtype == torch.uint8, 'the RNG states (a uint8 tensor under \'torch\')'),
    'step': (lambda v: type(v) is int and v >= 0, 'an integer >= 0'),
    'epoch': (lambda v: _finite_number(v) and v >= 0, 'a number >= 0'),
    'objective': (lambda v: isinstance(v, dict) and _finite_number(v.get('c', 1.0)), 'the SMAE state (its c, a number)'),
    'history': (lambda v: isinstance(v, list) and all(isinstance(r, dict) and 'step' in r for r in v),
                'a list of evaluation records'),
    'student': (_tensor_dict, 'a dict of weight tensors'),
    'teacher_head': (_tensor_dict, 'a dict of weight tensors'),
    'center': (lambda v: isinstance(v, torch.Tensor) and v.is_floating_point() and bool(v.isfinite().all()),
               'a finite tensor'),
}
READ_KEYS = ('model', 'model_config', 'config')
RESUME_KEYS = {'pretrain': ('optimizer', 'scaler', 'rng', 'step', 'epoch', 'objective'),
               'finetune': ('optimizer', 'scaler', 'rng', 'step', 'epoch', 'history'),
               'dino': ('optimizer', 'scaler', 'rng', 'step', 'epoch', 'student', 'teacher_head', 'center'),
               'probe': ('step', 'epoch')}


def load_checkpoint(path, kinds=None, resume=False):
    """A checkpoint written by one of our scripts, loaded with weights_only=True and checked against
    CHECKPOINT_KEYS: READ_KEYS and a valid stored model config always, its kind's RESUME_KEYS when `resume`. `kinds`
    lists the acceptable 'kind' values ('pretrain', 'finetune', ...). Anything wrong is one UserError naming the
    file and what is wrong with it."""
    if not path:
        raise UserError("no checkpoint given: pass --ckpt PATH")
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a directory, not a file: pass the checkpoint file in it "
                        f"(a run writes {os.path.join(path, 'ckpt.pt')})")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist: check the path (a pre-training run writes <out_dir>/ckpt.pt)")
    try:
        ck = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, pickled objects weights_only refuses
        why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable checkpoint (truncated, corrupt or not written by this toolkit: {why})") from None
    if not isinstance(ck, dict) or not isinstance(ck.get('kind'), str) or not isinstance(ck.get('model'), dict) \
            or not isinstance(ck.get('config', {}), dict):
        raise UserError(f"{path} is not a checkpoint of this toolkit (expected a dict with 'kind', 'model' and 'config')")
    if kinds and ck['kind'] not in kinds:
        raise UserError(f"{path} holds a {ck['kind']}.py run, not a {kinds[0]}.py run: choose another --out_dir"
                        if resume else f"{path} is a {ck['kind']}.py checkpoint, but a "
                                       f"{' or '.join(k + '.py' for k in kinds)} checkpoint is expected here")
    needed = READ_KEYS + (RESUME_KEYS.get(ck['kind'], ()) if resume else ())
    missing = [k for k in needed if k not in ck]
    if missing:
        raise UserError(f"{path} is damaged: it has no {', '.join(repr(k) for k in missing)}, which "
                        f"{'a resume' if resume else 'loading its model'} needs; start afresh from an intact "
                        f"checkpoint")
    for key in needed:
        test, what = CHECKPOINT_KEYS[key]
        if not test(ck[key]):
            found = ck[key]
            if isinstance(found, dict):  # the first value that is not a tensor
                found = next((f"{k!r}: {type(v).__name__}" for k, v in found.items()
                              if not isinstance(v, torch.Tensor)), 'a dict')
            raise UserError(f"{path} is damaged: its {key!r} should be {what}, but holds {str(found)[:80]}; start "
                            f"afresh from an intact checkpoint")
    _check_model_config(ck, path)
    return ck


def _check_model_config(ck, path):
    """The stored model config must name every model size with a value of its type (a finite number for a float):
    a missing field would silently take ViTConfig's default and build another model."""
    mc = ck['model_config']
    if ck['kind'] == 'finetune' and ck['config'].get('arch') == 'squeezenet':
        problems = [] if type(mc.get('num_classes')) is int and mc['num_classes'] >= 1 else \
            [f"num_classes={mc.get('num_classes')!r}, not an integer >= 1"]
    else:
        problems = []
        for field in dataclasses.fields(M.ViTConfig):
            kind, value = field.type, mc.get(field.name)
            if field.name not in mc:
                problems.append(f"no {field.name}")
            elif not (type(value) is kind or (kind is float and type(value) is int)) or \
                    (kind is float and not math.isfinite(value)):
                problems.append(f"{field.name}={value!r}, not {TYPE_WORDS[kind]}")
        problems += [f"an unknown field {k!r}" for k in mc if k not in M.ViTConfig.__dataclass_fields__]
        if not problems:
            try:
                M.ViTConfig(**mc)
            except ValueError as e:
                problems.append(str(e).split(':')[0])
    if problems:
        raise UserError(f"{path}: its stored model config is missing or malformed ({'; '.join(problems[:4])}); the "
                        f"file is damaged or was not written by this toolkit's scripts")


def model_config(ck, path, **overrides):
    """The ViTConfig stored in a checkpoint (load_checkpoint has checked it), with field overrides (None ignored) from
    the user's config: a value the model refuses there is the user's to change, and the message says so."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        return replace(M.ViTConfig(**ck['model_config']), **overrides)
    except ValueError as e:
        given = ', '.join(f"--{k} {v}" for k, v in overrides.items()
                          if k != 'num_classes' and ck['model_config'].get(k) != v)  # (the dataset's, not an option)
        raise UserError(f"{given or 'the config'} does not fit the model stored in {path}: {e}") from None


def preset_config(cfg, **fields):
    """The ViTConfig of --model with --img_size / --patch_size (0 = the preset's) and `fields`; a setting the model
    refuses (e.g. a mask ratio that leaves no visible patch on this grid) is a one-line UserError."""
    try:
        return M.make_config(cfg.model, img_size=cfg.img_size or None, patch_size=cfg.patch_size or None, **fields)
    except ValueError as e:
        raise UserError(str(e)) from None


def load_encoder(path, num_classes=0, expect_model=None, loaded=None, **overrides):
    """A ViT classifier (a bare encoder when num_classes=0) from a pretrain.py or dino.py checkpoint: architecture
    and encoder weights from the checkpoint, a fresh head. overrides: ViTConfig fields such as drop_path,
    global_pool or img_size (positions are regenerated for another size). expect_model: the preset the user
    asked for; another architecture is refused. loaded: the checkpoint at `path` if the caller has read it."""
    ck = loaded if loaded is not None else load_checkpoint(path, kinds=('pretrain', 'dino'))
    name = ck['config'].get('model')
    if expect_model and name != expect_model:
        raise UserError(f"{path} holds a {name} encoder but --model is {expect_model}: pass --model {name} (or drop --model)")
    net = M.VisionTransformer(model_config(ck, path, num_classes=num_classes, **overrides))
    sd = M.encoder_state_dict(ck['model'])
    sd.update({k: v for k, v in net.state_dict().items() if k.startswith('head.')})  # the head starts fresh
    try:
        M.load_weights(net, sd, what=path)
    except ValueError as e:
        raise UserError(str(e)) from None
    return net, ck


# where and how a run starts, not what it computes: a resume does not report them as changes of the run
NOT_THE_RUN = ('resume', 'out_dir', 'data_dir', 'download')


def follow_checkpoint(cfg, given, ck, path, names=('dataset', 'img_size')):
    """Defaults follow the checkpoint: each of `names` not given on the command line (or given as '' / 0, "the
    checkpoint's") takes the value the checkpoint was trained with (its dataset; its image size), and one line says
    which were taken. A stored value that is not valid is a UserError naming the file; one the checkpoint does not
    record keeps the script's default."""
    mc = ck.get('model_config')
    stored = dict(ck.get('config', {}), img_size=mc.get('img_size') if isinstance(mc, dict) else None)
    took = []
    for name in names:
        value = stored.get(name)
        if (name in given and getattr(cfg, name)) or value is None:
            continue
        if type(value) is not type(getattr(cfg, name)) or not RULES[name][0](value):
            raise UserError(f"{path}: its stored {name} {value!r} is not {RULES[name][1]}: the checkpoint is damaged; "
                            f"pass --{name} to choose one")
        setattr(cfg, name, value)
        took.append(f"{name} {value}")
    if took and int(os.environ.get('RANK', 0)) == 0:
        print(f"from the checkpoint: {', '.join(took)} (what it was trained on; "
              f"{' / '.join('--' + n for n in names)} choose another)")


def check_out_dir(cfg, given, kind, fixed, checks=()):
    """Resume or start fresh, never mixing two runs in one out_dir and never rewriting a finished run (one that has
    written its results.json). Call it with the out_dir locked (out_dir_locked): nothing can change the folder
    between this look and the run's writes. Returns the checkpoint to resume from (or None) and the config to run
    with: on resume, the checkpoint's config with only the given names changed and the out_dir as given (the folder
    may have moved), each stored value held to configure's rules and the script's `checks` again; the names in
    `fixed` (architecture, data, batch) may not change. A checkpoint at the end of its schedule without results.json
    (a run stopped at its last step, or killed before its summary) is resumed to finish: the end-of-run work."""
    path = os.path.join(cfg.out_dir, 'ckpt.pt')
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory, not a checkpoint: choose another --out_dir")
    if not cfg.resume:
        if os.path.lexists(path):
            there = None  # whose checkpoint, to say what --resume true would do (nothing, for another's or a finished run)
            with contextlib.suppress(Exception):
                there = torch.load(path, map_location='cpu', weights_only=True, mmap=True).get('kind')
            if there and there != kind:
                raise UserError(f"{path} already holds a {there}.py run: choose another --out_dir (each run has its own)")
            if os.path.exists(os.path.join(cfg.out_dir, 'results.json')):
                raise UserError(f"{path} already holds a finished run (results.json is beside it): choose another --out_dir, or "
                                f"train it further with --resume true --epochs N")
            raise UserError(f"{path} already holds a checkpoint: pass --resume true to continue that run, or choose another --out_dir")
        if int(os.environ.get('RANK', 0)) == 0:  # (the other ranks write nothing)
            check_own_outputs(cfg.out_dir, kind)
        return None, cfg
    if not os.path.exists(path):
        raise UserError(f"--resume true but there is no checkpoint at {path}: run without --resume to start fresh")
    ck = load_checkpoint(path, kinds=(kind,), resume=True)
    old = ck['config']
    lacking = [k for k in (*fixed, 'epochs') if k not in old]
    if lacking:
        raise UserError(f"{path} is damaged: its stored config has no {', '.join(lacking)}, which a resume needs (the "
                        f"weights and the step count depend on them); start afresh in another --out_dir")
    clash = [f"{k}={old.get(k)!r} in the checkpoint vs {getattr(cfg, k)!r}" for k in fixed
             if k in given and old.get(k) != getattr(cfg, k)]
    if clash:
        raise UserError(f"--resume with a config that contradicts the checkpoint's run ({'; '.join(clash)}): the stored "
                        f"weights and step count depend on it; drop those overrides or choose another --out_dir")
    stored = [k for k in vars(cfg) if k in old and k not in given and k != 'out_dir']
    for k in stored:
        problem = _value_problem(k, old[k], getattr(cfg, k))  # (a name not given holds its default)
        if problem:
            raise UserError(f"{path} is damaged: its stored config has {k}={old[k]!r}, but {problem}; " +
                            ("start afresh in another --out_dir" if k in fixed else f"pass --{k} VALUE to override it"))
    merged = {k: old[k] if k in stored else getattr(cfg, k) for k in vars(cfg)}
    for test, message in checks:
        if not test(SimpleNamespace(**merged)):
            raise UserError(f"{message.format(**merged)} (with the config stored in {path})")
    if 'warmup_epochs' in given and merged['warmup_epochs'] >= merged['epochs']:  # configure's rule, on this run's epochs
        raise UserError(f"--warmup_epochs {merged['warmup_epochs']} is not shorter than the run's {merged['epochs']} "
                        f"epoch{'s' * (merged['epochs'] != 1)}: the lr would never reach its peak; choose fewer than "
                        f"{merged['epochs']} (or pass --epochs N to train it longer)")
    world, accum = int(os.environ.get('WORLD_SIZE', 1)), merged.get('accum_steps')
    if accum and merged['batch_size'] % (world * accum):  # configure's rule, on the run's batch (fixed on resume)
        fits = [a for a in range(1, merged['batch_size'] + 1) if merged['batch_size'] % (world * a) == 0]
        raise UserError(f"the run's batch of {merged['batch_size']} does not split into {world} process"
                        f"{'es' * (world > 1)} x --accum_steps {accum} equal micro-batches: choose --accum_steps from "
                        f"{', '.join(map(str, fits[:8]))}" + (" or another number of processes" if world > 1 else ""))
    done, epochs = ck['epoch'], merged['epochs']
    results = os.path.join(cfg.out_dir, 'results.json')
    if done >= epochs and os.path.exists(results):
        raise UserError(f"{path} is a finished run of {old['epochs']} epochs: nothing to resume; to train it "
                        f"further pass --epochs N with N > {done:g}, or choose another --out_dir")
    if done > epochs:
        raise UserError(f"{path} is at epoch {done:g}, beyond --epochs {epochs}: pass --epochs {math.ceil(done)} or "
                        f"more, or choose another --out_dir")
    changed = {k: (old.get(k), merged[k]) for k in given if old.get(k) != merged[k] and k not in NOT_THE_RUN}
    if int(os.environ.get('RANK', 0)) == 0:
        if changed:
            print("resume: changed from the checkpoint's config: "
                  + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        if done == epochs:
            print(f"resume: {path} is at the end of its {epochs} epochs but the run has no results.json (it stopped "
                  f"before its end-of-run work): finishing it")
        if os.path.exists(results):
            print(f"resume: training the finished {old['epochs']}-epoch run on to {epochs} epochs; its results.json is "
                  f"removed at the first checkpoint (it would no longer describe ckpt.pt) and written again at the end")
    return ck, SimpleNamespace(**merged)


def log_scripts(path):
    """The scripts that wrote into a log.jsonl (each run's first record, 'start', names its script)."""
    scripts = set()
    with open(path, errors='replace') as f:
        for line in f:
            with contextlib.suppress(ValueError, AttributeError):  # a line cut short by a kill, or not JSON at all
                record = json.loads(line)
                if record.get('event') == 'start':
                    scripts.add(record.get('script'))
    return scripts


def check_own_outputs(out_dir, script):
    """A fresh run writes into a folder that holds none of the files it writes (log.jsonl and OUTPUTS[script]), or
    only those of an earlier run of the same script there (its log.jsonl says so): it never overwrites or appends to
    a file another script or the user made. Called with the out_dir locked, before anything is written."""
    pattern = re.compile(OUTPUTS[script] + r'|log\.jsonl')
    clash = sorted(name for name in os.listdir(out_dir) if pattern.fullmatch(name)) if os.path.isdir(out_dir) else []
    log = os.path.join(out_dir, 'log.jsonl')
    if not clash or (os.path.isfile(log) and log_scripts(log) == {script}):
        return
    whose = (f"its log.jsonl is {' and '.join(sorted(f'{s}.py' for s in log_scripts(log)) or ['no run'])}'s"
             if os.path.isfile(log) else f"no {script}.py log.jsonl beside them")
    raise UserError(f"out_dir {out_dir} holds {', '.join(clash[:4])}{' ...' if len(clash) > 4 else ''}, which "
                    f"{script}.py did not write ({whose}): a run never overwrites another's files; choose another "
                    f"--out_dir")


@contextlib.contextmanager
def restoring(path):
    """Around a resume's restore of weights, optimizer, scaler and RNG state from the checkpoint at `path`: a part
    that does not fit this run (a weight missing or of another shape, an optimizer state of another layout or size,
    an RNG state of another size) is one UserError naming the file, not a traceback from inside torch."""
    try:
        yield
    except (ValueError, RuntimeError, KeyError, IndexError, TypeError) as e:
        why = ' '.join(str(e).split())[:240] or type(e).__name__
        raise UserError(f"{path} is damaged or does not fit this run ({why}); start afresh in another --out_dir, or "
                        f"resume from an intact copy") from None


def load_optimizer(optimizer, state):
    """optimizer.load_state_dict, then every per-parameter state tensor checked against its parameter's shape (torch
    does not check it: a wrong one would fail inside the first training step). Use inside restoring()."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for p in group['params']:
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                    raise ValueError(f"the optimizer's {name!r} has shape {tuple(value.shape)} for a parameter of "
                                     f"shape {tuple(p.shape)}")


def check_resume_step(ck, steps_per_epoch, images, path):
    """The checkpoint's step and epoch must agree at this run's steps per epoch: a damaged checkpoint, or training
    data that changed size since it was written, would otherwise resume at a wrong point of the schedule."""
    if abs(ck['step'] - ck['epoch'] * steps_per_epoch) > 0.5:
        raise UserError(f"{path}: its step {ck['step']} is not its epoch {ck['epoch']:g} at this run's {steps_per_epoch} "
                        f"steps an epoch ({images:,} training images): the checkpoint is damaged, or the training data "
                        f"changed since it was written; restore the data, or start afresh in another --out_dir")


def resume_command(script, out_dir):
    """The command that continues a stopped run, quoted for a shell (a path with spaces)."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    launcher = f"torchrun --nproc_per_node={world}" if world > 1 else "python"
    return f"{launcher} {script}.py --resume true --out_dir {shlex.quote(str(out_dir))}"


def rng_state():
    return {'torch': torch.get_rng_state(), **({'cuda': torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# -----------------------------------------------------------------------------
# shared formulas


def get_lr(step, total_steps, warmup_steps, lr, min_lr=0.0):
    """Linear warmup from 0, then half-cosine to min_lr (the official MAE schedule, per step)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model, weight_decay, lr_scale_of=None, no_decay=()):
    """AdamW groups: no weight decay on biases and 1-D parameters (norms), as in official MAE, nor on the names in
    no_decay (official fine-tuning also exempts cls_token). lr_scale_of(name) -> float is a per-parameter lr
    multiplier (layer-wise decay), stored as the group's 'lr_scale'; the loops set lr * lr_scale each step."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = 0.0 if (p.ndim <= 1 or name.endswith('.bias') or name in no_decay) else weight_decay
            scale = lr_scale_of(name) if lr_scale_of else 1.0
            groups.setdefault((decay, scale), {'params': [], 'weight_decay': decay, 'lr_scale': scale})['params'].append(p)
    return list(groups.values())


def topk_correct(logits, labels, ks=(1, 5)):
    """Counts (device tensors, no host sync) of samples whose label is among the top-k logits; k capped at the classes."""
    maxk = min(max(ks), logits.shape[1])
    hit = logits.topk(maxk, dim=1).indices == labels[:, None]   # (N, maxk)
    return [hit[:, :min(k, maxk)].any(dim=1).sum() for k in ks]


# dense bf16/fp16 tensor-core peak per GPU, FLOP/s (for MFU); matched by substring of the device name
PEAK_FLOPS = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L40S': 362e12, 'A10G': 70e12, 'A10': 125e12,
              'L4': 121e12, 'RTX 4090': 165e12, 'RTX 3090': 71e12, 'V100': 125e12, 'T4': 65e12}


def peak_flops(run):
    name = torch.cuda.get_device_name(run.device) if run.cuda else ''
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def warmup_steps(cfg, given, steps_per_epoch, run, fraction=0.05, unit='step'):
    """--warmup_epochs in steps. A warm-up as long as the run would never reach the peak lr: given explicitly it is
    refused (by configure); left at the recipe's default (e.g. 20 epochs with --epochs 3) it is clipped to
    `fraction` of the run, at least one step and short of the whole run, and the banner's config line shows the
    warm-up in effect and why (`unit`: what one step is, for probe.py's epochs)."""
    if cfg.warmup_epochs < cfg.epochs or 'warmup_epochs' in given:
        return cfg.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch
    steps = min(max(1, round(fraction * total)), total - 1)  # a one-step run cannot warm up and reach the peak
    fit = f"the recipe's {cfg.warmup_epochs} warm-up epochs do not fit in {cfg.epochs} epoch{'s' * (cfg.epochs > 1)}"
    run.effective['warmup_epochs'] = (round(steps / steps_per_epoch, 4), (
        f"{steps} {unit}{'s' * (steps != 1)}, {steps / total:.0%} of the run: {fit}" if steps else
        f"none: a run of one {unit} cannot warm up and still reach the peak lr; {fit}"))
    return steps


def bench_start(run, since, cudagraphs):
    """The benchmark mode's clock starts here, after the warm-up steps. `since`: time.time() at the loop's start, so
    the warm-up's wall time (compilation and CUDA graph capture included) is reported apart from the steady state;
    `cudagraphs`: the compile mode asks for CUDA graphs, which are then proven in use here (cudagraph_proof).
    Returns (start of the clock, the figures known so far) for bench_result."""
    if run.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(run.device)
    warmup_s = time.time() - since
    recorded = cudagraph_proof(run) if cudagraphs else 0
    figures = dict(warmup_s=round(warmup_s, 2), cudagraphs=cudagraphs, cudagraphs_recorded=recorded)
    return time.perf_counter(), figures


def bench_result(run, start, cfg, flops, peak, loss, label):
    """The benchmark mode's figures over the timed steps (`start`: what bench_start returned), printed as a line and
    as JSON (for bench.py, which runs each configuration in a process of its own)."""
    loss = float(loss)  # a host sync: every timed step has finished
    if run.cuda:
        torch.cuda.synchronize()
    t0, figures = start
    dt = time.perf_counter() - t0
    ips = cfg.bench_steps * cfg.batch_size / dt
    mode = compile_mode(cfg, run)
    result = dict(label=label, images_per_s=ips, step_ms=1000 * dt / cfg.bench_steps, batch_size=cfg.batch_size,
                  mfu=ips * flops / (peak * run.world_size) if peak else None, world_size=run.world_size,
                  peak_mem_gb=torch.cuda.max_memory_allocated(run.device) / 1e9 if run.cuda else None, loss=loss,
                  compile_mode=mode or 'eager', steps=cfg.bench_steps, warmup_steps=cfg.bench_warmup, **figures)
    run.print(f"bench {label} batch {cfg.batch_size}: {ips:,.0f} images/s | step {result['step_ms']:.2f} ms | MFU "
              + (f"{100 * result['mfu']:.1f}%" if result['mfu'] else 'n/a') + " | peak memory "
              + (f"{result['peak_mem_gb']:.2f} GB" if run.cuda else 'n/a')
              + f" | {mode or 'eager'}" + (" with CUDA graphs" if figures['cudagraphs'] else "")
              + f" | warm-up {figures['warmup_s']:.1f} s")
    run.print("BENCH_JSON " + json.dumps(result))
    return result


class Progress:
    """Progress of a long phase: a line at least every `every` seconds, by a timer. While a meter is active (a `with`
    block, or start() ... stop(); a meter left active ends with its run), the run's progress thread prints the line
    of the innermost one whenever `every` seconds pass without any line, also in the middle of a long step or batch.
    The worker calls update(done) with host-side counts only. rate() is an exponential average over the intervals
    between updates, each weighted by its length (at most `every` seconds, so that one stall, a checkpoint or a busy
    moment, moves a settled average by less than 2x) and decaying over `horizon` seconds; the first interval
    (compilation, warm-up) stands in until a second one exists. `per` scales a count into the rate's unit (a step's
    images)."""
    every = 9.0     # seconds without a line after which the active meter prints one: at least one line every 10 s
    horizon = 30.0  # seconds over which the rate is averaged (its exponential decay time)

    def __init__(self, what, total, run=None, label='', done=0, per=1, unit='img', phase='', clock=time.monotonic):
        """what: the thing counted ('step', 'image'), of which there are `total`; label: the phase's name, if any."""
        self.what, self.total, self.run, self.label, self.per, self.unit = what, total, run, label, per, unit
        self.phase, self.clock = phase, clock
        self.done = self._done_last = done
        self.t_start = self._t_last = clock()
        self._weighted_rates = self._weights = 0.0  # decayed sums of weight x rate and of weight
        self._intervals = 0

    def update(self, done):
        """`done` so far: a host-side number, never a device value. The starting phase (e.g. 'the first step') ends."""
        now, count = self.clock(), done - self._done_last
        self.done, self.phase = done, ''
        if count <= 0:
            return
        dt = max(now - self._t_last, 1e-9)
        if self._intervals == 1:  # the first interval (compilation, warm-up) only stood in until now
            self._weighted_rates = self._weights = 0.0
        weight = min(dt, self.every)
        decay = math.exp(-weight / self.horizon)
        self._weighted_rates = self._weighted_rates * decay + weight * count / dt
        self._weights = self._weights * decay + weight
        self._t_last, self._done_last, self._intervals = now, done, self._intervals + 1

    def skip(self):
        """The time since the last update went to other work (an evaluation, a checkpoint): it is left out of the
        rate, whose next interval starts now."""
        self._t_last = self.clock()

    def rate(self):
        """The smoothed rate in `unit` per second (count x per), or None before the first update."""
        return self.per * self._weighted_rates / self._weights if self._weights else None

    def eta(self):
        """Seconds until `total` at the smoothed rate, counting down between updates (None before the first one)."""
        rate = self.rate()
        if rate is None:
            return None
        return max(0.0, (self.total - self.done) * self.per / rate - (self.clock() - self._t_last))

    def line(self):
        now = self.clock()
        if self.total is None:  # the run's own meter: nothing to count, only that it is alive
            return f"  {self.what}: working, {fmt_eta(now - self.t_start)} since the start"
        parts = [f"{self.label + ': ' if self.label else ''}{self.what} {self.done:,}/{self.total:,}"]
        parts += [self.phase] * bool(self.phase)
        if self.rate() is not None:
            parts += [f"{fmt_rate(self.rate())} {self.unit}/s", f"eta {fmt_eta(self.eta())}"]
        if not self._intervals:  # the first step or batch, still running
            parts.append(f"{fmt_eta(now - self._t_last)} so far")
        elif now - self._t_last >= self.every:  # inside a long step or batch
            parts.append(f"{fmt_eta(now - self._t_last)} since {self.what} {self.done:,}")
        return "  " + " | ".join(parts)

    def start(self):
        if isinstance(self.run, Run):  # (a stand-in for a run, as some tests pass, gets no lines)
            self.run._push(self)
        return self

    def stop(self):
        if isinstance(self.run, Run):
            self.run._pop(self)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


LOG_EVERY_S = 8             # a training loop (one process) logs a full line when this long passed since its last one
                            # (just before the progress thread's Progress.every)
TENSORBOARD_FLUSH_S = 10    # seconds between writes of the TensorBoard event file


def tensorboard_writer():
    """torch's SummaryWriter, or a one-line UserError before anything is written when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: only --tensorboard true needs the package
    except ImportError:
        raise UserError("--tensorboard true needs the tensorboard package: pip install tensorboard, or drop "
                        "--tensorboard") from None
    return SummaryWriter


def tensorboard_scalars(record):
    """A log record's numbers as TensorBoard scalars, named as the official MAE code does: the train records under
    train/ (loss, lr, images/s, ...), the evaluations under val/ (fine-tuning's top1/top5/loss, the kNN's knn_top1,
    pre-training's val loss). Other records (the banner, calibration) have none."""
    numbers = {k: v for k, v in record.items() if type(v) in (int, float) and k not in ('step', 'epoch')}
    event = record.get('event')
    if event == 'train':
        return {f"train/{k}": v for k, v in numbers.items()}
    if event == 'eval':
        return {f"val/{k}": v for k, v in numbers.items()}
    if event == 'knn':
        return {f"val/knn_{k}": v for k, v in numbers.items()}
    if event == 'checkpoint' and 'val_loss' in numbers:
        return {'val/loss': numbers['val_loss']}
    return {}


def fmt_eta(seconds):
    s = int(max(0, seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_rate(per_second):
    """Three significant figures below 100 (a CPU's 1.27 img/s), whole numbers above (31,500 img/s)."""
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"
