"""
Run machinery shared by pretrain.py, finetune.py, probe.py and evaluate.py, written once:
config overrides, DDP/device/AMP setup, out_dir locking, atomic checkpoints, the lr schedule, logging,
MFU, SIGTERM handling, one-line errors, and the reconstruction picture.
"""
import contextlib
import difflib
import json
import math
import os
import signal
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# errors: one clear line and a non-zero exit


class UserError(Exception):
    """Something the user can fix (a config value, a path, a file). Printed as one line; exit code 2."""


class NonFiniteLoss(Exception):
    """Training diverged. Printed as one line; exit code 1. The last good checkpoint is left as it was."""


def cli(main):
    """Run a script's main(), turning expected failures into one line on stderr and a non-zero exit."""
    import data  # local import: data.py has no dependency on this module
    script = os.path.basename(sys.argv[0])
    try:
        code = main(sys.argv[1:])
    except (UserError, data.DataError) as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        code = 2
    except NonFiniteLoss as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print(f"{script}: interrupted", file=sys.stderr)
        code = 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code if isinstance(code, int) else 0)  # benchmark modes return their figures


# -----------------------------------------------------------------------------
# configuration: the constants at the top of a script, overridden by --name value / --name=value

CONFIG_TYPES = (bool, int, float, str)


def script_defaults(namespace):
    """The configurable constants of a script: lower-case module globals of a plain type, in order."""
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and k.islower() and type(v) in CONFIG_TYPES}


def _convert(name, text, default):
    kind = type(default)
    if kind is bool:
        low = text.lower()
        if low in ('true', '1', 'yes', 'on'):
            return True
        if low in ('false', '0', 'no', 'off'):
            return False
        raise UserError(f"--{name} expects true or false, got {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise UserError(f"--{name} expects an integer (default {default}), got {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"--{name} expects a number (default {default}), got {text!r}") from None
    return text


def parse_config(defaults, argv):
    """Apply `--name value` / `--name=value` overrides to the defaults, with type checking against each default
    (an int may become a float; booleans take true/false). Returns (config namespace, set of names given)."""
    config, given = dict(defaults), set()
    argv = list(argv or [])
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith('--') or arg == '--':
            raise UserError(f"unexpected argument {arg!r}: overrides are written --name value or --name=value")
        if '=' in arg:
            name, text = arg[2:].split('=', 1)
            i += 1
        else:
            name = arg[2:]
            if i + 1 >= len(argv):
                raise UserError(f"--{name} needs a value: write --{name} VALUE or --{name}=VALUE")
            text = argv[i + 1]
            i += 2
        name = name.replace('-', '_')
        if name not in defaults:
            close = difflib.get_close_matches(name, list(defaults), n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join('--' + c for c in close)}?" if close else \
                f"known names: {', '.join(defaults)}"
            raise UserError(f"unknown config name --{name}: {hint}")
        config[name] = _convert(name, text, defaults[name])
        given.add(name)
    return SimpleNamespace(**config), given


# -----------------------------------------------------------------------------
# the run: device, DDP, precision, out_dir, logging


class Run:
    """Everything about the process a script needs: rank, device, precision, out_dir and its log."""

    def __init__(self, cfg, script, lock=True):
        self.script = script
        self.ddp = int(os.environ.get('RANK', -1)) != -1   # torchrun sets RANK, LOCAL_RANK, WORLD_SIZE
        want = getattr(cfg, 'device', 'auto')
        if want == 'auto':
            want = 'cuda' if torch.cuda.is_available() else 'cpu'
        if want.startswith('cuda') and not torch.cuda.is_available():
            raise UserError(f"--device {want} asked for, but no CUDA device is available: use --device cpu")
        if self.ddp:
            self.rank, self.local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
            self.world_size = int(os.environ['WORLD_SIZE'])
            if want.startswith('cuda'):
                self.device = torch.device(f'cuda:{self.local_rank}')
                torch.cuda.set_device(self.device)
            else:
                self.device = torch.device('cpu')
            dist.init_process_group(backend='nccl' if self.device.type == 'cuda' else 'gloo')
        else:
            self.rank, self.local_rank, self.world_size = 0, 0, 1
            self.device = torch.device(want)
        self.master = self.rank == 0
        self.cuda = self.device.type == 'cuda'
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul/conv that remains
            torch.backends.cudnn.allow_tf32 = True
        # precision: bf16 autocast by default on CUDA; fp16 adds a GradScaler; CPU always runs float32
        dtype = getattr(cfg, 'dtype', 'bfloat16')
        if dtype not in ('bfloat16', 'float16', 'float32'):
            raise UserError(f"--dtype must be bfloat16, float16 or float32, got {dtype!r}")
        self.dtype = dtype if self.cuda else 'float32'
        ptdtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32}[self.dtype]
        self.autocast = (torch.autocast(device_type='cuda', dtype=ptdtype) if self.dtype != 'float32'
                         else contextlib.nullcontext())
        self.scaler = torch.amp.GradScaler('cuda', enabled=(self.dtype == 'float16'))
        # out_dir: must be writable, and used by one run at a time
        self.out_dir = cfg.out_dir
        self.lock_path = os.path.join(self.out_dir, '.lock')
        self._locked = False
        self._on_close = []
        if self.master:
            try:
                os.makedirs(self.out_dir, exist_ok=True)
                probe = os.path.join(self.out_dir, f'.write_test.{os.getpid()}')
                with open(probe, 'w'):
                    pass
                os.remove(probe)
            except OSError as e:
                raise UserError(f"out_dir {self.out_dir} is not writable ({e.strerror}): choose another --out_dir") from None
            if lock:
                self._take_lock()
        self.log_path = os.path.join(self.out_dir, 'log.jsonl')

    def _take_lock(self):
        me = f"{os.getpid()} {self.script}\n"
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid, other = open(self.lock_path).read().split()[:2]
                    os.kill(int(pid), 0)  # raises if that process is gone
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.lock_path)  # stale lock of a killed run
                    continue
                except PermissionError:
                    pass
                raise UserError(f"out_dir {self.out_dir} is in use by {other} (pid {pid}): wait for it or choose another --out_dir") from None
            with os.fdopen(fd, 'w') as f:
                f.write(me)
            self._locked = True
            return
        raise UserError(f"could not lock out_dir {self.out_dir}: remove {self.lock_path} if no run uses it")

    def on_close(self, fn):
        """Call fn when the run closes (e.g. restore the signal handlers a training loop installed)."""
        self._on_close.append(fn)

    def close(self):
        for fn in reversed(self._on_close):
            fn()
        self._on_close = []
        if self._locked:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.lock_path)
            self._locked = False

    def print(self, *a, **kw):
        if self.master:
            print(*a, **kw, flush=True)

    def log(self, record, line=None):
        """One record in <out_dir>/log.jsonl and, if given, a line on stdout (rank 0 only)."""
        if not self.master:
            return
        if line:
            print(line, flush=True)
        with open(self.log_path, 'a') as f:
            f.write(json.dumps(record) + '\n')

    def barrier(self):
        if self.ddp:
            dist.barrier()

    def mean(self, value):
        """Average a float over ranks (a host sync; call it at log time, not every step)."""
        if not self.ddp:
            return float(value)
        t = torch.tensor([float(value)], device=self.device, dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def any(self, flag):
        """True on every rank if it is true on any rank (used to stop all ranks together)."""
        if not self.ddp:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t)
        return t.item() > 0

    def banner(self, cfg, extra):
        """Start banner: config, versions, device, and what the script adds (parameter counts, batch, lr)."""
        dev = torch.cuda.get_device_name(self.device) if self.cuda else f'cpu ({torch.get_num_threads()} threads)'
        versions = f"torch {torch.__version__}, python {sys.version.split()[0]}"
        record = dict(event='start', script=self.script, config=vars(cfg), versions=versions, device=dev,
                      world_size=self.world_size, dtype=self.dtype, **extra)
        lines = [f"{self.script}: {versions}; device {dev} x {self.world_size}; {self.dtype}"]
        lines.append("config: " + " ".join(f"{k}={v}" for k, v in vars(cfg).items()))
        lines.append(" | ".join(f"{k} {v}" for k, v in extra.items()))
        self.log(record, "\n".join(lines))


# -----------------------------------------------------------------------------
# checkpoints: atomic writes, safe loads


def save_atomic(obj, path):
    """torch.save to a temporary file in the same directory, fsync, then rename: never a half-written file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_text_atomic(text, path):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


def load_checkpoint(path, kinds=None):
    """Load a checkpoint written by one of our scripts with weights_only=True. `kinds` lists the acceptable
    'kind' values ('pretrain', 'finetune', 'probe'); anything else is a UserError naming the file."""
    if not path:
        raise UserError("no checkpoint given: pass --ckpt PATH")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist: check the path (a pre-training run writes <out_dir>/ckpt.pt)")
    try:
        ck = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, pickled objects weights_only refuses
        why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable checkpoint (truncated, corrupt or not written by this toolkit: {why})") from None
    if not isinstance(ck, dict) or 'kind' not in ck or 'model' not in ck:
        raise UserError(f"{path} is not a checkpoint of this toolkit (expected a dict with 'kind' and 'model' written by pretrain.py or finetune.py)")
    if kinds and ck['kind'] not in kinds:
        raise UserError(f"{path} is a {ck['kind']}.py checkpoint, but a {' or '.join(k + '.py' for k in kinds)} checkpoint is expected here")
    return ck


def load_encoder(path, num_classes=0, expect_model=None, loaded=None, **overrides):
    """A ViT classifier (or bare encoder when num_classes=0) built from a pretrain.py checkpoint: the architecture
    comes from the checkpoint, the encoder weights are loaded, the head is fresh. overrides: ViTConfig fields
    such as drop_path, global_pool or img_size (positions are regenerated for another size).
    expect_model: the preset the user asked for; a checkpoint of another architecture is refused.
    loaded: the checkpoint at `path` if the caller already loaded it (with load_checkpoint), so it is read once."""
    from dataclasses import replace
    import model as M
    ck = loaded if loaded is not None else load_checkpoint(path, kinds=('pretrain',))
    name = ck['config'].get('model')
    if expect_model and name != expect_model:
        raise UserError(f"{path} holds a {name} encoder but --model is {expect_model}: pass --model {name} (or drop --model)")
    try:
        mcfg = replace(M.ViTConfig(**ck['model_config']), num_classes=num_classes,
                       **{k: v for k, v in overrides.items() if v is not None})
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: cannot build its model ({e})") from None
    net = M.VisionTransformer(mcfg)
    sd = M.encoder_state_dict(ck['model'])
    sd.update({k: v for k, v in net.state_dict().items() if k.startswith('head.')})  # the head starts fresh
    try:
        M.load_weights(net, sd, what=path)
    except ValueError as e:
        raise UserError(str(e)) from None
    return net, ck


def check_out_dir(run, cfg, given, kind, arch_keys):
    """Resume or start fresh, without ever mixing two runs in one out_dir.
    Returns the checkpoint to resume from (or None) and the config to run with: on resume, the checkpoint's
    config with only the explicitly given names changed; architecture names may not change."""
    path = os.path.join(cfg.out_dir, 'ckpt.pt')
    exists = os.path.exists(path)
    if not cfg.resume:
        if exists:
            raise UserError(f"{path} already holds a checkpoint: pass --resume true to continue that run, or choose another --out_dir")
        return None, cfg
    if not exists:
        raise UserError(f"--resume true but there is no checkpoint at {path}: run without --resume to start fresh")
    ck = load_checkpoint(path)
    if ck['kind'] != kind:
        raise UserError(f"{path} holds a {ck['kind']}.py run, not a {kind}.py run: choose another --out_dir")
    old = ck['config']
    clash = [f"{k}={old.get(k)!r} in the checkpoint vs {getattr(cfg, k)!r}" for k in arch_keys
             if k in given and old.get(k) != getattr(cfg, k)]
    if clash:
        raise UserError(f"--resume with a config that contradicts the checkpoint's architecture ({'; '.join(clash)}): drop those overrides or choose another --out_dir")
    merged = dict(old)
    changed = {k: (old.get(k), getattr(cfg, k)) for k in given if old.get(k) != getattr(cfg, k)}
    for k in vars(cfg):
        if k in given or k not in merged:
            merged[k] = getattr(cfg, k)
    if changed:
        run.print("resume: changed from the checkpoint's config: " +
                  ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return ck, SimpleNamespace(**merged)


def take_subset(split, n, seed):
    """A fixed random subset of n images of a data.Split (all of it when n is 0 or too large)."""
    import data
    if not n or n >= len(split.labels):
        return split
    idx = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return data.Split(split.images[idx], split.labels[idx], split.classes)


def rng_state():
    state = {'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# -----------------------------------------------------------------------------
# optimisation


def get_lr(step, total_steps, warmup_steps, lr, min_lr=0.0):
    """Linear warmup from 0, then half-cosine to min_lr (the official MAE schedule, per step)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model, weight_decay, lr_scale_of=None, no_decay=()):
    """AdamW groups: no weight decay on biases and 1-D parameters (norms), as in official MAE, nor on the names
    in no_decay (official fine-tuning also exempts cls_token). lr_scale_of(name) -> float gives a per-parameter lr
    multiplier (layer-wise decay), stored as 'lr_scale'."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if (p.ndim <= 1 or name.endswith('.bias') or name in no_decay) else weight_decay
        scale = lr_scale_of(name) if lr_scale_of else 1.0
        g = groups.setdefault((decay, scale), {'params': [], 'weight_decay': decay, 'lr_scale': scale})
        g['params'].append(p)
    return list(groups.values())


def make_optimizer(groups, lr, betas, device, adam=False):
    """AdamW over param_groups() (or Adam for the linear probe), fused on CUDA: one kernel for the whole update."""
    kw = dict(fused=True) if device.type == 'cuda' else {}
    return (torch.optim.Adam if adam else torch.optim.AdamW)(groups, lr=lr, betas=betas, **kw)


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g['lr'] = lr * g.get('lr_scale', 1.0)


def topk_correct(logits, labels, ks=(1, 5)):
    """Counts (device tensors, no host sync) of samples whose label is among the top-k logits, one per k; k is capped
    at the number of classes."""
    maxk = min(max(ks), logits.shape[1])
    hit = logits.topk(maxk, dim=1).indices == labels[:, None]   # (N, maxk)
    return [hit[:, :min(k, maxk)].any(dim=1).sum() for k in ks]


# -----------------------------------------------------------------------------
# throughput accounting

# dense bf16/fp16 tensor-core peak per GPU, FLOP/s (for MFU); matched by substring of the device name
PEAK_FLOPS = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L40S': 362e12, 'A10G': 70e12, 'A10': 125e12,
              'L4': 121e12, 'RTX 4090': 165e12, 'RTX 3090': 71e12, 'V100': 125e12, 'T4': 65e12}


def peak_flops(run):
    if not run.cuda:
        return None
    name = torch.cuda.get_device_name(run.device)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


class Throughput:
    """images/s, MFU and ETA between two log points (call tick right after a host sync)."""

    def __init__(self, run, flops_per_image, total_steps, start_step=0):
        self.peak = peak_flops(run)
        self.flops_per_image = flops_per_image
        self.total_steps = total_steps
        self.world = run.world_size
        self.t0, self.last_step = time.time(), start_step

    def tick(self, images, step):
        """images: images this rank processed since the last tick; step: the global step now.
        Returns (images/s over all ranks, MFU or None where the GPU's peak is unknown, ETA in seconds)."""
        now = time.time()
        dt, self.t0 = max(now - self.t0, 1e-9), now
        steps, self.last_step = max(step - self.last_step, 1), step
        ips = images * self.world / dt
        mfu = ips * self.flops_per_image / (self.peak * self.world) if self.peak else None
        eta = (self.total_steps - step) * dt / steps
        return ips, mfu, eta


def fmt_eta(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# -----------------------------------------------------------------------------
# SIGTERM: clusters pre-empt jobs with it; the training loop saves a checkpoint and exits


class StopSignal:
    """Sets .requested on SIGTERM (and SIGUSR1, which some schedulers send first)."""

    def __init__(self):
        self.requested = False
        self._old = {}
        for sig in (signal.SIGTERM, getattr(signal, 'SIGUSR1', None)):
            if sig is not None:
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread (e.g. inside some test runners)
                    pass

    def _handle(self, signum, frame):
        self.requested = True



    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: schedulers and scripts see the job as not finished


# -----------------------------------------------------------------------------
# pictures: the paper's Figure 2 layout


@torch.no_grad()
def reconstruction_grid(mae, imgs, mask_ratio, masking, seed, path):
    """PNG grid, one row per image: masked input | reconstruction | reconstruction with visible patches pasted |
    original. imgs are normalised (N, 3, H, W) on the model's device; the masks are fixed by `seed`."""
    import torchvision.utils as vutils
    from data import denormalize
    was_training = mae.training
    mae.eval()
    g = torch.Generator(device=imgs.device).manual_seed(seed)
    noise = mae.masking_noise(imgs.shape[0], mask_ratio, masking, generator=g, device=imgs.device)
    _, pred, mask = mae(imgs.float(), mask_ratio, noise=noise)
    recon, pasted = mae.reconstruct(imgs.float(), pred, mask)
    pix_mask = mae.pixel_mask(mask)                                        # (N, 1, H, W), 1 = masked
    orig = denormalize(imgs.float()).clamp(0, 1)
    masked_in = orig * (1 - pix_mask) + 0.5 * pix_mask                     # masked patches shown grey
    cols = [masked_in, denormalize(recon).clamp(0, 1), denormalize(pasted).clamp(0, 1), orig]
    grid = torch.stack(cols, dim=1).flatten(0, 1).cpu()                    # (N*4, 3, H, W), row by row
    tmp = f"{path}.tmp.{os.getpid()}.png"
    vutils.save_image(grid, tmp, nrow=4, padding=2, pad_value=1.0)
    os.replace(tmp, path)
    mae.train(was_training)
    return path


# -----------------------------------------------------------------------------
# the pieces of the training loop that pretrain.py and finetune.py share


def compile_and_wrap(module, cfg, run):
    """torch.compile on CUDA (cfg.compile_mode; DDP's gradient hooks need the default mode, not CUDA graphs), then
    DDP under torchrun. Returns (the module to step, whether CUDA graphs are in use). The caller keeps `module` itself,
    unwrapped, for saving and evaluation."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    step_model, cudagraphs = module, False
    if cfg.compile and run.cuda:
        mode = cfg.compile_mode if not run.ddp else 'default'
        cudagraphs = mode in ('reduce-overhead', 'max-autotune')
        step_model = torch.compile(module, mode=mode)
    if run.ddp:
        step_model = DDP(step_model, device_ids=[run.local_rank] if run.cuda else None, broadcast_buffers=False)
    return step_model, cudagraphs


class LossMeter:
    """Sums micro-batch losses on the device (no host sync per step); `read` averages them over ranks at a log point
    and stops the run with NonFiniteLoss, leaving the last checkpoint as it was, if they are not finite."""

    def __init__(self, run, out_dir):
        self.run, self.out_dir = run, out_dir
        self.sum = torch.zeros((), device=run.device)
        self.count = self.images = 0

    def add(self, loss, images):
        self.sum += loss.detach()
        self.count += 1
        self.images += images

    def read(self, step, where):
        value = self.run.mean(self.sum.item() / max(1, self.count))
        if not math.isfinite(value):
            last = os.path.join(self.out_dir, 'ckpt.pt')
            kept = f"the last good checkpoint {last} is untouched" if os.path.exists(last) else "no checkpoint was written"
            raise NonFiniteLoss(f"loss became {value} at step {step} ({where}); {kept}: lower --lr, "
                                f"set --grad_clip 1.0, or use --dtype bfloat16")
        return value

    def reset(self):
        self.sum.zero_()
        self.count = self.images = 0


def log_train(run, losses, meter, step, steps_per_epoch, total_steps, lr):
    """The periodic train record and line: epoch, step, loss, lr, images/s, MFU, ETA. Returns the loss."""
    epoch = step / steps_per_epoch
    loss = losses.read(step, f"epoch {epoch:.2f}")
    ips, mfu, eta = meter.tick(losses.images, step)
    run.log(dict(event='train', step=step, epoch=round(epoch, 4), loss=loss, lr=lr, images_per_s=round(ips, 1),
                 mfu=mfu, eta_s=round(eta)),
            f"epoch {epoch:7.2f} | step {step}/{total_steps} | loss {loss:.4f} | lr {lr:.2e} | {ips:,.0f} img/s"
            + (f" | mfu {100 * mfu:.1f}%" if mfu else "") + f" | eta {fmt_eta(eta)}")
    losses.reset()
    return loss


def stop_requested(run, stop, step, log_every):
    """SIGTERM seen? Under DDP the ranks agree at log points (one all-reduce), so they stop at the same step."""
    if not run.ddp:
        return stop.requested
    return step % max(1, log_every) == 0 and run.any(stop.requested)


def preempt(run, out_dir, step, save):
    """Save where we are and tell the user how to continue; the exit code says the job did not finish."""
    if run.master:
        save()
    run.print(f"stopped by signal at step {step}; checkpoint saved to {out_dir}/ckpt.pt; "
              f"continue with --resume true --out_dir {out_dir}")
    return PREEMPTED_EXIT_CODE


class Benchmark:
    """The benchmark mode of a training loop: after `warmup` steps (compilation, CUDA graph capture) time `steps`
    steps of the real loop, then report images/s, step time, MFU and peak memory."""

    def __init__(self, run, cfg, flops_per_image, label, **facts):
        self.run, self.warmup, self.steps, self.batch = run, cfg.bench_warmup, cfg.bench_steps, cfg.batch_size
        self.flops, self.label, self.facts = flops_per_image, label, facts
        self.t0 = None

    def after_step(self, step, losses):
        """Call after every optimizer step; returns the result dict after the last timed step, else None."""
        if step == self.warmup:
            losses.read(step, 'benchmark warm-up')
            if self.run.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()
        elif step == self.warmup + self.steps:
            losses.read(step, 'benchmark')
            if self.run.cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - self.t0
            ips = self.steps * self.batch / dt
            peak = peak_flops(self.run)
            result = dict(images_per_s=ips, step_ms=1000 * dt / self.steps,
                          mfu=ips * self.flops / (peak * self.run.world_size) if peak else None,
                          peak_mem_gb=torch.cuda.max_memory_allocated(self.run.device) / 1e9 if self.run.cuda else None,
                          batch_size=self.batch, world_size=self.run.world_size, **self.facts)
            mfu = f"{100 * result['mfu']:.1f}%" if result['mfu'] else 'n/a'
            mem = f"{result['peak_mem_gb']:.2f} GB" if self.run.cuda else 'n/a'
            self.run.print(f"bench {self.label} batch {self.batch}: {ips:,.0f} images/s | step {result['step_ms']:.2f} ms | "
                           f"MFU {mfu} | peak memory {mem}")
            return result
        return None


@contextlib.contextmanager
def micro_batch(run, step_model, micro, accum_steps, cudagraphs):
    """Around one micro-batch's forward and backward: a new CUDA-graph step, and no DDP gradient all-reduce before
    the last micro-batch of an optimizer step (gradient accumulation)."""
    if cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()
    with step_model.no_sync() if (run.ddp and micro < accum_steps - 1) else contextlib.nullcontext():
        yield


def optimizer_step(run, optimizer, params, grad_clip):
    """Clip (optionally), step through the GradScaler (a no-op scaler unless fp16), clear the gradients."""
    if grad_clip > 0:
        run.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    run.scaler.step(optimizer)
    run.scaler.update()
    optimizer.zero_grad(set_to_none=True)
