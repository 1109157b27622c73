"""
Plumbing the scripts would otherwise copy: the config override and its rules, one-line errors, process setup
(torchrun, device, precision, out_dir lock, stop signals), atomic saves and safe loads, and the few shared
formulas (lr schedule, parameter groups, peak FLOPs). The training loops themselves live in their scripts.
"""
import contextlib
import ctypes
import difflib
import fcntl
import json
import math
import os
import re
import signal
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
    """Run a script's main(argv), turning expected failures into one line on stderr and a non-zero exit."""
    script = os.path.basename(sys.argv[0])
    old_handler = signal.signal(signal.SIGTERM, _stop)  # outside a Run too (loading a checkpoint or the data)
    try:
        code = main(sys.argv[1:])
    except (UserError, data.DataError, NonFiniteLoss) as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        code = 1 if isinstance(e, NonFiniteLoss) else 2
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and "can't allocate memory" not in str(e):
            raise  # a bug: the traceback is what a bug report needs
        print(f"{script}: error: out of memory ({' '.join(str(e).split())[:160]}): use a smaller --batch_size, or "
              f"more --accum_steps for the same batch in smaller pieces", file=sys.stderr)
        code = 1
    except KeyboardInterrupt as e:  # Ctrl-C, or a Stopped signal
        signum = getattr(e, 'signum', signal.SIGINT)
        what = 'interrupted' if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"{script}: {what}", file=sys.stderr)
        code = 128 + signum
    signal.signal(signal.SIGTERM, old_handler)
    sys.exit(code if isinstance(code, int) else 0)  # benchmark modes return their figures


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
    (RULES, then the script's own `checks` between values: (test(cfg), message with {name} fields)).
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
        sentinel = value == known[name] and known[name] in ('', 0)  # always accepted (see RULES)
        if name in RULES and not sentinel and not RULES[name][0](value):
            raise UserError(f"--{name} must be {RULES[name][1]}, got {value!r}")
    if 'warmup_epochs' in given and 'epochs' in config and config['warmup_epochs'] >= config['epochs']:
        raise UserError(f"--warmup_epochs {config['warmup_epochs']} is not shorter than --epochs {config['epochs']}: the lr "
                        f"would never reach its peak; choose fewer warm-up epochs")
    cfg = SimpleNamespace(**config)
    for test, message in checks:
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
            raise Stopped(signum)  # unwind now (finally blocks end worker processes); a second Ctrl-C too
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
            with open(os.path.join(self.out_dir, 'log.jsonl'), 'a') as f:
                f.write(json.dumps(record) + '\n')

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


def lock_out_dir(out_dir, script):
    """An exclusive flock on the out_dir itself, held by the returned descriptor and released by the OS when the
    process ends however it ends: a killed run never leaves a stale lock, and two runs can never both hold it.
    <out_dir>/.lock only tells others who holds it. Leftover temporary files of a killed save are removed."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(out_dir, os.O_RDONLY)
    except OSError as e:
        raise UserError(f"out_dir {out_dir} is not writable ({e.strerror}): choose another --out_dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = ''
        with contextlib.suppress(OSError):
            holder = open(os.path.join(out_dir, '.lock')).read().strip()
        raise UserError(f"out_dir {out_dir} is in use by {holder or 'another run'}: wait for it or choose another "
                        f"--out_dir") from None
    try:
        for name in os.listdir(out_dir):
            if re.search(r'\.tmp\.\d+(\.png)?$', name):  # what save_atomic and the pictures write: a save killed
                os.remove(os.path.join(out_dir, name))    # half-way, whose target file is intact
        with open(os.path.join(out_dir, '.lock'), 'w') as f:
            f.write(f"{script} (pid {os.getpid()})")
    except OSError as e:
        os.close(fd)
        raise UserError(f"out_dir {out_dir} is not writable ({e.strerror}): choose another --out_dir") from None
    return fd


def unlock_out_dir(fd, out_dir):
    with contextlib.suppress(OSError):
        os.remove(os.path.join(out_dir, '.lock'))
    os.close(fd)  # releases the flock


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


def save_atomic(obj, path):
    """torch.save (or text, or bytes as they are) to a temporary file in the same directory, fsync, then rename: never
    a half-written file. A full disk is one line that says the previous file is intact."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, 'w' if isinstance(obj, str) else 'wb') as f:
            f.write(obj) if isinstance(obj, (str, bytes)) else torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        kept = f"the previous {os.path.basename(path)} is intact" if os.path.exists(path) else "nothing was written"
        raise UserError(f"could not write {path} ({e.strerror or e}); {kept}: free some space or choose another --out_dir") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def load_checkpoint(path, kinds=None):
    """A checkpoint written by one of our scripts, loaded with weights_only=True. `kinds` lists the acceptable
    'kind' values ('pretrain', 'finetune', ...); anything else is a UserError naming the file."""
    if not path:
        raise UserError("no checkpoint given: pass --ckpt PATH")
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
        raise UserError(f"{path} is a {ck['kind']}.py checkpoint, but a {' or '.join(k + '.py' for k in kinds)} checkpoint is expected here")
    return ck


def model_config(ck, path, **overrides):
    """The ViTConfig stored in a checkpoint, with field overrides (None ignored); a malformed one is a UserError."""
    try:
        return replace(M.ViTConfig(**ck['model_config']), **{k: v for k, v in overrides.items() if v is not None})
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: its stored model config is missing or malformed ({e}); it was not written by this "
                        f"toolkit's pretrain.py or dino.py") from None


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


def check_out_dir(cfg, given, kind, fixed):
    """Resume or start fresh, never mixing two runs in one out_dir and never rewriting a finished run. Returns the
    checkpoint to resume from (or None) and the config to run with: on resume, the checkpoint's config with only
    the given names changed; the names in `fixed` (architecture, data, batch) may not change. Called before the
    out_dir is locked, so that a refusal writes nothing (a resume only reads)."""
    path = os.path.join(cfg.out_dir, 'ckpt.pt')
    if not cfg.resume:
        if os.path.exists(path):
            raise UserError(f"{path} already holds a checkpoint: pass --resume true to continue that run, or choose another --out_dir")
        return None, cfg
    if not os.path.exists(path):
        raise UserError(f"--resume true but there is no checkpoint at {path}: run without --resume to start fresh")
    ck = load_checkpoint(path)
    if ck['kind'] != kind:
        raise UserError(f"{path} holds a {ck['kind']}.py run, not a {kind}.py run: choose another --out_dir")
    old = ck['config']
    clash = [f"{k}={old.get(k)!r} in the checkpoint vs {getattr(cfg, k)!r}" for k in fixed
             if k in given and old.get(k) != getattr(cfg, k)]
    if clash:
        raise UserError(f"--resume with a config that contradicts the checkpoint's run ({'; '.join(clash)}): the stored "
                        f"weights and step count depend on it; drop those overrides or choose another --out_dir")
    merged = {k: (getattr(cfg, k) if (k in given or k not in old) else old[k]) for k in vars(cfg)}
    if ck.get('epoch', 0) >= merged['epochs'] and 'step' in ck:
        raise UserError(f"{path} is a finished run of {old.get('epochs')} epochs: nothing to resume; to train it "
                        f"further pass --epochs N with N > {ck['epoch']:g}, or choose another --out_dir")
    changed = {k: (old.get(k), merged[k]) for k in given if old.get(k) != merged[k]}
    if changed and int(os.environ.get('RANK', 0)) == 0:
        print("resume: changed from the checkpoint's config: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return ck, SimpleNamespace(**merged)


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
