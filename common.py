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
import time
from dataclasses import replace
from types import SimpleNamespace

import torch
import torch.distributed as dist

import data
import model as M


class UserError(Exception):
    """Something the user can fix (a config value, a path, a file). Printed as one line; exit code 2."""


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
    try:
        code = main(sys.argv[1:])
    except (UserError, data.DataError, NonFiniteLoss) as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        code = 1 if isinstance(e, NonFiniteLoss) else 2
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and "can't allocate memory" not in str(e):
            raise  # a bug: the traceback is what a bug report needs
        print(f"{script}: error: out of memory ({' '.join(str(e).split())[:160]}): {_memory_advice(_last_config)}",
              file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print(f"{script}: interrupted", file=sys.stderr)
        code = 130
    finally:
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
    'dtype': _choice('bfloat16', 'float16', 'float32'), 'only': _choice('profile', 'peer', 'loader'),
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
        self.device = torch.device(f'cuda:{self.local_rank}' if self.ddp and want.startswith('cuda') else want)
        self.master, self.cuda = self.rank == 0, self.device.type == 'cuda'
        if self.cuda and self.device.index is not None and self.device.index >= torch.cuda.device_count():
            raise UserError(f"--device {want}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        # precision: bf16 autocast by default on CUDA; fp16 adds a GradScaler; the CPU runs float32
        self.dtype = getattr(cfg, 'dtype', 'float32') if self.cuda else 'float32'
        self.autocast = (torch.autocast('cuda', dtype=getattr(torch, self.dtype)) if self.dtype != 'float32'
                         else contextlib.nullcontext())
        self.scaler = torch.amp.GradScaler('cuda', enabled=self.dtype == 'float16')
        self.out_dir, self.stop_signal, self._lock_fd, self._old_handlers = cfg.out_dir, 0, None, {}

    def __enter__(self):
        if self.ddp:
            if self.cuda:
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend='nccl' if self.cuda else 'gloo')
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul/conv that remains
            torch.backends.cudnn.allow_tf32 = True
        if self.master and self.lock:
            self._lock_fd = lock_out_dir(self.out_dir, self.script)
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):  # pre-emption, a scheduler's warning, Ctrl-C
            with contextlib.suppress(ValueError):  # not the main thread
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        if not self.training or (self.stop_signal and signum == signal.SIGINT):
            raise KeyboardInterrupt  # unwind now (finally blocks end worker processes); a second Ctrl-C too
        self.stop_signal = signum    # a training loop saves a checkpoint after this step and exits 128 + signum

    def __exit__(self, *exc):
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        if self._lock_fd is not None:
            unlock_out_dir(self._lock_fd, self.out_dir)
        if self.ddp and dist.is_initialized():
            dist.destroy_process_group()

    def print(self, *a):
        if self.master:
            print(*a, flush=True)

    def log(self, record, line=None):
        """Rank 0: the line (if any) on stdout and the record in <out_dir>/log.jsonl (a benchmark writes no files)."""
        if line:
            self.print(line)
        if self.master and self.lock:
            append_line(os.path.join(self.out_dir, 'log.jsonl'), json.dumps(record))

    def mean(self, value):
        """A float averaged over ranks (a host sync: call it at log points, not every step)."""
        if not self.ddp:
            return float(value)
        t = torch.tensor([float(value)], device=self.device, dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def banner(self, extra):
        dev = torch.cuda.get_device_name(self.device) if self.cuda else f'cpu ({torch.get_num_threads()} threads)'
        versions = f"torch {torch.__version__}, python {sys.version.split()[0]}"
        self.log(dict(event='start', script=self.script, config=vars(self.cfg), versions=versions, device=dev,
                      world_size=self.world_size, dtype=self.dtype, **extra),
                 f"{self.script}: {versions}; device {dev} x {self.world_size}; {self.dtype}\nconfig: "
                 + " ".join(f"{k}={v}" for k, v in vars(self.cfg).items()) + "\n"
                 + " | ".join(f"{k} {v}" for k, v in extra.items()))


# What each script writes into its out_dir (log.jsonl is appended, never renamed into place): the only names whose
# temporary files (the name + '.tmp.' + the writing process's id, see save_atomic) a later run of it cleans up.
OUTPUTS = {'pretrain': r'ckpt\.pt|results\.json|curves\.png|recon_ep\d{4}\.png',
           'dino': r'ckpt\.pt|results\.json|curves\.png', 'finetune': r'ckpt\.pt|results\.json|curves\.png',
           'probe': r'ckpt\.pt|results\.json', 'evaluate': r'eval\.json|eval\.md|recon\.png'}
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
    """torch.compile's mode for a training step, or None for eager. CUDA graphs ('reduce-overhead') only where
    they are safe: one process (DDP's gradient hooks run outside the graph) and one micro-batch per optimizer
    step (a second backward would accumulate into gradient memory that the graph pool hands back at the next replay)."""
    if not (cfg.compile and run.cuda):
        return None
    if cfg.compile_mode in ('reduce-overhead', 'max-autotune') and (run.ddp or cfg.accum_steps > 1):
        return 'default' if cfg.compile_mode == 'reduce-overhead' else 'max-autotune-no-cudagraphs'
    return cfg.compile_mode


# -----------------------------------------------------------------------------
# checkpoints: atomic writes, safe loads, resume


TORCH_WRITE_FAILED = re.compile(r'PytorchStreamWriter|inline_container|file write failed')  # torch.save's writer


def save_atomic(obj, path):
    """torch.save (or text) to a temporary file in the same directory, fsync, then rename: never a half-written
    file. The temporary file is <path>.tmp.<pid> (a kill mid-save leaves it; remove_stale_temps knows it by that
    name). A full disk is one line that says the previous file is intact, whether it comes as an OSError or, from
    torch.save's zip writer, as a RuntimeError (with the OSError as its context, or none)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, 'w' if isinstance(obj, str) else 'wb') as f:
            f.write(obj) if isinstance(obj, str) else torch.save(obj, f)
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
            raise UserError(f"{path} already holds a checkpoint: pass --resume true to continue that run, or choose another --out_dir")
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
    done, epochs = ck['epoch'], merged['epochs']
    if done >= epochs and os.path.exists(os.path.join(cfg.out_dir, 'results.json')):
        raise UserError(f"{path} is a finished run of {old['epochs']} epochs: nothing to resume; to train it "
                        f"further pass --epochs N with N > {done:g}, or choose another --out_dir")
    if done > epochs:
        raise UserError(f"{path} is at epoch {done:g}, beyond --epochs {epochs}: pass --epochs {math.ceil(done)} or "
                        f"more, or choose another --out_dir")
    changed = {k: (old.get(k), merged[k]) for k in given if old.get(k) != merged[k]}
    if int(os.environ.get('RANK', 0)) == 0:
        if changed:
            print("resume: changed from the checkpoint's config: "
                  + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        if done == epochs:
            print(f"resume: {path} is at the end of its {epochs} epochs but the run has no results.json (it stopped "
                  f"before its end-of-run work): finishing it")
    return ck, SimpleNamespace(**merged)


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


def warmup_steps(cfg, given, steps_per_epoch, run, fraction=0.05):
    """--warmup_epochs in steps. A warm-up as long as the run would never reach the peak lr: given explicitly it is
    refused (by configure); left at the recipe's default (e.g. 20 epochs with --epochs 3) it is clipped to
    `fraction` of the run, about what the recipes use, with a line that says so."""
    if cfg.warmup_epochs < cfg.epochs or 'warmup_epochs' in given:
        return cfg.warmup_epochs * steps_per_epoch
    steps = round(fraction * cfg.epochs * steps_per_epoch)
    run.print(f"warmup: the recipe's {cfg.warmup_epochs} warm-up epochs do not fit in {cfg.epochs} epoch{'s' * (cfg.epochs > 1)}; "
              f"warming up over the first {steps} steps ({fraction:.0%} of the run) instead")
    return steps


def bench_start(run):
    """The benchmark mode's clock starts here, after the warm-up steps (compilation, CUDA graph capture)."""
    if run.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(run.device)
    return time.perf_counter()


def bench_result(run, t0, cfg, flops, peak, loss, label):
    """The benchmark mode's figures over the timed steps, printed as a line and as JSON (for bench.py, which runs
    each configuration in a process of its own)."""
    loss = float(loss)  # a host sync: every timed step has finished
    if run.cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    ips = cfg.bench_steps * cfg.batch_size / dt
    result = dict(label=label, images_per_s=ips, step_ms=1000 * dt / cfg.bench_steps, batch_size=cfg.batch_size,
                  mfu=ips * flops / (peak * run.world_size) if peak else None, world_size=run.world_size,
                  peak_mem_gb=torch.cuda.max_memory_allocated(run.device) / 1e9 if run.cuda else None, loss=loss)
    run.print(f"bench {label} batch {cfg.batch_size}: {ips:,.0f} images/s | step {result['step_ms']:.2f} ms | MFU "
              + (f"{100 * result['mfu']:.1f}%" if result['mfu'] else 'n/a') + " | peak memory "
              + (f"{result['peak_mem_gb']:.2f} GB" if run.cuda else 'n/a'))
    run.print("BENCH_JSON " + json.dumps(result))
    return result


class Progress:
    """A line at most every `every` seconds during a long phase (features, metrics, caching), so none is silent."""

    def __init__(self, what, total, run=None, every=5.0):
        self.what, self.total, self.run, self.every = what, total, run, every
        self.t0 = self.last = time.time()

    def update(self, done):
        now = time.time()
        if self.run is not None and now - self.last >= self.every and 0 < done < self.total:
            self.last, rate = now, done / (now - self.t0)
            self.run.print(f"  {self.what}: {done:,}/{self.total:,} ({rate:,.0f}/s, eta {fmt_eta((self.total - done) / rate)})")


def fmt_eta(seconds):
    s = int(max(0, seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
