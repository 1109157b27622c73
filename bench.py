"""
Throughput of the real training steps, each figure timed after warm-up in a process of its own (so every figure is
the static, freshly compiled graph a real run uses, never a recompiled symbolic-shape one). The figures, in the
order --figures gives:
- mae: pretrain.py's own loop in its benchmark mode (data gathered from the on-device dataset, masks, forward,
  backward, fused AdamW), at every batch size;
- smae: the SMAE step (critic included), at the first batch size;
- finetune: finetune.py's loop with per-sample RandAugment and mixup/cutmix, at the first batch size;
- dino: dino.py's loop (student, teacher, loss, EMA and centre), at the first batch size;
- loader: the loader with the fine-tuning augmentation and mixup/cutmix alone (no model), at the first batch size;
- peer: transformers' ViTMAEForPreTraining (if installed) with the same configuration, compile mode and feeding,
  at every batch size.

    python bench.py                                   # every figure: the study's model at batch 128 and 1024, on the GPU
    python bench.py --batch_sizes 128 --figures mae   # the headline alone: our MAE step at batch 128 with CUDA graphs
    python bench.py --only profile --batch_sizes 128  # where the MAE step's time goes (default compile mode)
    python bench.py --device cpu --steps 3 --warmup 1 --img_size 32 --patch_size 8 --batch_sizes 32   # smoke test

Each figure is appended to <out_dir>/bench.jsonl the moment it exists: images/s and step time over the timed steps,
MFU, peak memory, the compile/warm-up seconds before the first timed step (apart from the steady state), the compile
mode, and whether CUDA graphs were in use (proven after warm-up: where the mode asks for them and they are not in
use, the figure is an error). A Markdown table of this run's figures is printed at the end.
"""
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from types import SimpleNamespace

import torch
from torch.autograd import DeviceType
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile as torch_profile, schedule as profiler_schedule

import common
import data
import model as M
import pretrain

# -----------------------------------------------------------------------------
batch_sizes = '128,1024'    # comma-separated global batch sizes to time
figures = 'mae,smae,finetune,dino,loader,peer'  # in this order; mae and peer at every batch size, the rest at the first
steps = 100                 # timed steps per figure
warmup = 30                 # untimed steps first (compilation, CUDA graph capture)
model = 'vit_lite'          # model preset
img_size = 0                # 0 = the preset's
patch_size = 0              # 0 = the preset's
mask = 0.75                 # mask ratio
dataset = 'synthetic'       # data the loop reads (synthetic: 100k random TIN-sized images, no download)
data_dir = 'data'           # for dataset tin/cub
device = 'auto'             # auto | cuda | cuda:N | cpu
dtype = 'bfloat16'          # autocast dtype on CUDA
compile = True              # torch.compile (CUDA only)
compile_mode = 'reduce-overhead'  # pretrain.py's default: CUDA graphs; the peer is compiled the same way
process_timeout = 600       # seconds a figure's process may take (compiling included); then its process group is killed
only = ''                   # 'profile': the MAE step under torch.profiler (profile.txt); 'summary': a gpu_check.sh run's
                            # summary.md; 'peer', 'loader': time that one thing in this process (how bench.py runs itself)
out_dir = 'out/bench'       # bench.jsonl (and profile.txt, summary.md) go here
# -----------------------------------------------------------------------------
AT_EVERY_BATCH = ('mae', 'peer')     # the other figures are timed at the first batch size only
PROFILER_WARMUP = 2                  # steps the profiler traces and drops before the profiled ones (its own start-up)
TOP_KERNELS = 10                     # kernels (operators on a CPU) listed in the profile's summary
NO_TRANSFORMERS = "transformers is not installed"


def append_line(path, record):
    """One JSON line appended to `path` (a figure is kept the moment it exists, whatever happens next); a full disk
    is one line, and the earlier lines are kept."""
    common.append_line(path, json.dumps(record, default=str))


def measure(script, args, timeout, label=''):
    """Run `python script args` in a fresh process of its own process group; its BENCH_JSON figures with the process's
    wall time, or {'error': why}. At the timeout, or when this process is stopped (SIGTERM, Ctrl-C), the whole group
    is killed (the child and its compile workers): one figure failing does not lose the others."""
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), script)] + [str(a) for a in args]
    t0 = time.time()
    # its own process group, so that a kill reaches its workers too; and it dies with this process however this ends
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0,
                             preexec_fn=common.die_with_parent)
    try:
        while True:  # a line every 10 s while the figure's process compiles, warms up and times
            try:
                out, err = child.communicate(timeout=min(common.Progress.every, max(timeout - (time.time() - t0), 0.01)))
                break
            except subprocess.TimeoutExpired:
                if time.time() - t0 >= timeout:
                    raise
                print(f"    {label or script}: {time.time() - t0:.0f} s so far (start-up, compilation and warm-up, then "
                      f"the timed steps)", flush=True)
    except BaseException as e:  # the timeout, or KeyboardInterrupt (bench.py stopped): nothing of the child may stay
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        if not isinstance(e, subprocess.TimeoutExpired):
            raise
        return dict(error=f"timed out after {timeout} s (compiling or warming up), its process group killed",
                    process_s=round(time.time() - t0, 1))
    for line in out.splitlines():
        if line.startswith('BENCH_JSON '):
            return dict(json.loads(line[len('BENCH_JSON '):]), process_s=round(time.time() - t0, 1))
    last = [line for line in (err or out).splitlines() if line.strip()][-1:] or ['no output']
    return dict(error=f"exit {child.returncode}: {last[0].strip()[:300]}", process_s=round(time.time() - t0, 1))


def command(cfg, key, batch, tmp=None):
    """(script, arguments) of the process that times `key` at this batch size: pretrain.py's, finetune.py's or
    dino.py's benchmark mode (which writes no files), or this script; for 'smae', writes a critic into the folder `tmp`."""
    args = ['--dataset', cfg.dataset, '--data_dir', cfg.data_dir, '--model', cfg.model, '--device', cfg.device,
            '--dtype', cfg.dtype, '--compile', cfg.compile, '--compile_mode', cfg.compile_mode,
            '--img_size', cfg.img_size, '--patch_size', cfg.patch_size]
    if key in ('peer', 'loader'):  # this script, timing one thing
        return 'bench.py', args + ['--batch_sizes', batch, '--steps', cfg.steps, '--warmup', cfg.warmup,
                                   '--mask', cfg.mask, '--only', key]
    args += ['--batch_size', batch, '--bench_steps', cfg.steps, '--bench_warmup', cfg.warmup]
    if key == 'finetune':
        return 'finetune.py', args + ['--mixup', 0.8, '--cutmix', 1.0]
    if key == 'dino':
        return 'dino.py', args
    args += ['--mask', cfg.mask]
    if key == 'smae':  # a random SqueezeNet critic in finetune.py's checkpoint format: speed does not depend on its weights
        critic = os.path.join(tmp, 'critic.pt')
        common.save_atomic({'kind': 'finetune', 'model': M.build_squeezenet(200).state_dict(), 'step': 0,
                            'model_config': {'num_classes': 200}, 'config': {'arch': 'squeezenet'}}, critic)
        args += ['--alpha', 0.5, '--critic', critic]
    return 'pretrain.py', args


def time_transformers_peer(cfg, batch, run):
    """transformers' ViTMAEForPreTraining with the same configuration, fed the same way (uint8 dataset on the device,
    gathered and normalised per step), bf16 autocast, fused AdamW, torch.compile in the same mode as ours."""
    try:
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
    except ImportError:
        raise common.UserError(f"{NO_TRANSFORMERS}: the peer is not timed (pip install transformers)") from None
    mcfg = M.make_config(cfg.model, img_size=cfg.img_size or None, patch_size=cfg.patch_size or None)
    hf_cfg = ViTMAEConfig(hidden_size=mcfg.embed_dim, num_hidden_layers=mcfg.depth, num_attention_heads=mcfg.num_heads,
                          intermediate_size=int(mcfg.embed_dim * mcfg.mlp_ratio), decoder_hidden_size=mcfg.decoder_embed_dim,
                          decoder_num_hidden_layers=mcfg.decoder_depth, decoder_num_attention_heads=mcfg.decoder_num_heads,
                          decoder_intermediate_size=int(mcfg.decoder_embed_dim * mcfg.decoder_mlp_ratio),
                          image_size=mcfg.img_size, patch_size=mcfg.patch_size, mask_ratio=cfg.mask, norm_pix_loss=False,
                          layer_norm_eps=1e-6, attn_implementation='sdpa')
    net = ViTMAEForPreTraining(hf_cfg).to(run.device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=5e-4, betas=(0.9, 0.95), weight_decay=0.15, **(dict(fused=True) if run.cuda else {}))
    mode = common.compile_mode(SimpleNamespace(compile=cfg.compile, compile_mode=cfg.compile_mode, accum_steps=1,
                                               bench_steps=cfg.steps), run)
    step_net = torch.compile(net, mode=mode) if mode else net
    images = data.load_split(cfg.dataset, 'train', cfg.data_dir).images.to(run.device)
    gen = torch.Generator(device=run.device).manual_seed(0)
    since = time.time()
    for step in range(cfg.warmup + cfg.steps):
        if step == cfg.warmup:  # the steps before are warm-up (compilation, CUDA graph capture)
            start = common.bench_start(run, since, mode in common.CUDAGRAPH_MODES)
        x = data.normalize(images[torch.randint(0, images.shape[0], (batch,), device=run.device, generator=gen)])
        if x.shape[-1] != mcfg.img_size:
            x = torch.nn.functional.interpolate(x, size=mcfg.img_size, mode='bilinear', antialias=True)
        if mode in common.CUDAGRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()
        with run.autocast:
            loss = step_net(pixel_values=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return f"transformers ViTMAEForPreTraining ({mode or 'eager'})", cfg.steps * batch, start, mode


def loader_rate(cfg, batch, run):
    """images/s of the DeviceLoader with the fine-tuning augmentation and mixup/cutmix alone (no model)."""
    split = data.load_split(cfg.dataset, 'train', cfg.data_dir)
    size = cfg.img_size or M.make_config(cfg.model).img_size
    loader = data.DeviceLoader(split, batch_size=batch, device=run.device, img_size=size, augment=data.finetune_augment)
    since = time.time()
    for step, micro in loader.epoch(0):
        x, y = micro[0]
        data.mixup_cutmix(x, y, split.num_classes, 0.8, 1.0, 0.5, 0.0, seed=step)
        if step == cfg.warmup:  # the clock starts after this batch: the ones so far are warm-up
            start = common.bench_start(run, since, False)
        if step == cfg.warmup + cfg.steps:
            break
    return 'loader + RandAugment + mixup/cutmix', (step - cfg.warmup) * batch, start, None  # fewer if the epoch ends first


def stop(signum, frame):
    raise KeyboardInterrupt


# what bench.py writes into its out_dir, each with how its own file begins: a file of that name that does not is
# someone else's, and bench.py leaves it alone (bench.jsonl is appended to, the others are replaced)
OWN_FILES = {'bench.jsonl': '{"figure": ', 'profile.txt': "pretrain.py's MAE step", 'summary.md': '# GPU check'}


def check_out_dir(cfg):
    """The out_dir is a folder (made when locked, but for a summary, which reads one); anything else is one line,
    before anything is written."""
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise common.UserError(f"--out_dir {cfg.out_dir} is a file, not a folder: choose another --out_dir")
    if cfg.only == 'summary' and not os.path.isdir(cfg.out_dir):
        raise common.UserError(f"--out_dir {cfg.out_dir} does not exist: pass the folder of a gpu_check.sh run")


def check_own_files(cfg):
    """Every file of OWN_FILES' names in the out_dir was written by bench.py (it begins as ours do): a user's
    profile.txt or bench.jsonl is never replaced or appended to. Called with the out_dir locked."""
    for name, start in OWN_FILES.items():
        path = os.path.join(cfg.out_dir, name)
        if not os.path.lexists(path):
            continue
        head = b''
        with contextlib.suppress(OSError):
            with open(path, 'rb', opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
                head = f.read(len(start.encode()))
        if not os.path.isfile(path) or (head and head != start.encode()):
            raise common.UserError(f"{path} was not written by bench.py (it does not begin as bench.py's {name} "
                                   f"does): bench.py never replaces another's file; choose another --out_dir")


def main(argv=None):
    cfg, _ = common.configure(globals(), argv)
    if cfg.only in ('', 'summary', 'profile'):  # (a figure timed for another bench.py writes nothing itself)
        if cfg.only != 'summary':
            data.require(cfg.dataset, cfg.data_dir)  # before a process per figure fails on it, each after a start-up
        check_out_dir(cfg)
        with common.out_dir_locked(cfg.out_dir, 'bench'):  # one bench.py writing here at a time
            check_own_files(cfg)
            return summary(cfg) if cfg.only == 'summary' else profile(cfg) if cfg.only == 'profile' else time_figures(cfg)
    # one figure, in this fresh process: its loop returns (label, images timed, bench_start's, mode)
    if cfg.only:
        batch = int(cfg.batch_sizes)
        with common.Run(cfg, 'bench', lock=False, training=False) as run:
            timed = {'peer': time_transformers_peer, 'loader': loader_rate}[cfg.only]
            label, images, (t0, known), mode = timed(cfg, batch, run)
            if run.cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        print("BENCH_JSON " + json.dumps(dict(label=label, images_per_s=images / dt, step_ms=1000 * dt * batch / images,
                                              batch_size=batch, compile_mode=mode or 'eager', **known)))
        return 0


def time_figures(cfg):
    """Each figure of --figures in a fresh process, appended to bench.jsonl as it comes; a table at the end."""
    dev = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if cfg.device == 'auto' else cfg.device)
    name = torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'
    shown = {k: common.shown_value(*v) for k, v in common.in_effect(cfg, dev.type == 'cuda').items()}  # (CPU: float32)
    print(f"bench: {cfg.model} mask {cfg.mask} on {name}, torch {torch.__version__}, "
          + ", ".join(f"{k} {shown.get(k, getattr(cfg, k))}" for k in ('dtype', 'compile', 'compile_mode'))
          + f", {cfg.steps} steps after {cfg.warmup} warm-up, one process per figure", flush=True)
    path, batches, wanted = os.path.join(cfg.out_dir, 'bench.jsonl'), cfg.batch_sizes.split(','), cfg.figures.split(',')
    if 'peer' in wanted and importlib.util.find_spec('transformers') is None:  # optional: not a failure
        print(f"peer skipped: {NO_TRANSFORMERS} (pip install transformers to time its ViTMAE beside ours)", flush=True)
        append_line(path, dict(figure='peer', skipped=NO_TRANSFORMERS, device=name, torch=torch.__version__))
        wanted.remove('peer')
    jobs = [(key, int(b)) for key in wanted for b in (batches if key in AT_EVERY_BATCH else batches[:1])]
    done = []
    old_term = signal.signal(signal.SIGTERM, stop)  # a time limit's SIGTERM: the child is ended, the lines written
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i, (key, batch) in enumerate(jobs):
                record = dict(figure=key, batch=batch, compile=cfg.compile, compile_mode_asked=cfg.compile_mode,
                              device=name, torch=torch.__version__)
                try:
                    record.update(measure(*command(cfg, key, batch, tmp), cfg.process_timeout, f"{key} batch {batch}"))
                except KeyboardInterrupt:  # this figure, and the ones after it, say why they have no numbers
                    append_line(path, dict(record, error="stopped by a signal (a time limit, Ctrl-C) before it ended"))
                    for key, batch in jobs[i + 1:]:
                        append_line(path, dict(figure=key, batch=batch, error="not started: stopped before its turn"))
                    raise
                append_line(path, record)
                done.append(record)
                if 'error' in record:
                    print(f"  {key} batch {batch} failed: {record['error']}", flush=True)
                else:
                    print(f"  {key} batch {batch}: {record['images_per_s']:,.0f} images/s, {record['compile_mode']}"
                          + " with CUDA graphs" * record['cudagraphs'] + f", warm-up {record['warmup_s']:.1f} s",
                          flush=True)
    finally:
        signal.signal(signal.SIGTERM, old_term)
    print(table(done))
    return 0


def fmt(value, spec, unit=''):
    return format(value, spec) + unit if value is not None else 'n/a'


def table(records):
    """The figures as a Markdown table, one row per figure (an error or a skip in place of its numbers)."""
    lines = ["| figure | batch | compile mode | CUDA graphs | images/s | step ms | MFU | peak mem | warm-up s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if 'images_per_s' not in r:
            why = f"skipped: {r['skipped']}" if 'skipped' in r else f"error: {r.get('error', '?')}"
            lines.append(f"| {r['figure']} | {r.get('batch', '')} | {r.get('compile_mode_asked', '')} | | {why} | | | | |")
            continue
        graphs = 'no' if not r['cudagraphs'] else f"yes ({r['cudagraphs_recorded']} recorded)" if r['cudagraphs_recorded'] \
            else 'yes'
        lines.append(f"| {r['figure']} | {r['batch_size']} | {r['compile_mode']} | {graphs} | {r['images_per_s']:,.0f} | "
                     f"{fmt(r.get('step_ms'), '.2f')} | {fmt(r.get('mfu') and 100 * r['mfu'], '.1f', '%')} | "
                     f"{fmt(r.get('peak_mem_gb'), '.2f', ' GB')} | {fmt(r.get('warmup_s'), '.1f')} |")
    return "\n".join(lines)


def profile(cfg):
    """Where the time of pretrain.py's real step goes: its benchmark mode at the first batch size in the DEFAULT
    compile mode (CUPTI does not attribute the kernels inside CUDA graphs), under torch.profiler with a schedule that
    waits out the warm-up steps (compilation included), traces PROFILER_WARMUP steps and drops them, then records
    --steps steps. Writes <out_dir>/profile.txt (a summary a note can quote, then torch.profiler's table of operators
    and kernels by their own device time; CPU time without a GPU) and the summary as a line of <out_dir>/bench.jsonl."""
    batch = int(cfg.batch_sizes.split(',')[0])
    run_cfg = SimpleNamespace(**{**vars(cfg), 'compile_mode': 'default', 'warmup': cfg.warmup + PROFILER_WARMUP})
    cuda = torch.cuda.is_available() and cfg.device != 'cpu'
    plan = profiler_schedule(wait=cfg.warmup, warmup=PROFILER_WARMUP, active=cfg.steps, repeat=1)
    with torch_profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda, schedule=plan) as prof:
        hook = register_optimizer_step_post_hook(lambda *_: prof.step())  # a profiler step per training step
        try:
            result = pretrain.main([str(a) for a in command(run_cfg, 'mae', batch)[1]])
        finally:
            hook.remove()
    events = prof.events() if prof.profiler is not None else []  # none if stopped before the profiled steps
    steps = [e for e in events if e.name.startswith('ProfilerStep')]  # '#N' or '*', by torch version
    n = max(1, len(steps))
    device_events = [e for e in events if e.device_type == DeviceType.CUDA]  # kernels, copies and sets
    kernels = [e for e in device_events if not e.name.startswith(('Memcpy', 'Memset'))]
    top = defaultdict(lambda: [0.0, 0])  # name -> [own time in us, calls]: kernels on the GPU, operators on a CPU
    for e in kernels if cuda else [e for e in events if e.device_type == DeviceType.CPU and e not in steps]:
        top[e.name][0] += e.time_range.elapsed_us() if cuda else e.self_cpu_time_total
        top[e.name][1] += 1
    total_us = sum(us for us, _ in top.values()) or 1
    top = sorted(top.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]
    figures = dict(figure='profile', batch=batch, compile_mode='default' if cfg.compile and cuda else 'eager',
                   steps_profiled=len(steps), stopped=not isinstance(result, dict),
                   host_ms_per_step=round(sum(e.time_range.elapsed_us() for e in steps) / n / 1000, 3) if steps else None,
                   device_ms_per_step=round(sum(e.time_range.elapsed_us() for e in device_events) / n / 1000, 3)
                   if cuda and steps else None,
                   kernels_per_step=round(len(kernels) / n, 1) if cuda and steps else None,
                   top=[[name, round(us / n / 1000, 4), round(us / total_us, 3)] for name, (us, _) in top])
    head = (f"stopped by a signal (exit {result}) after {len(steps)} profiled steps: the figures cover those"
            if figures['stopped'] else f"{result['label']} batch {batch}: {result['images_per_s']:,.0f} images/s "
                                       f"under the profiler")
    lines = [f"pretrain.py's MAE step, batch {batch}, compile mode {figures['compile_mode']} (no CUDA graphs: the "
             f"profiler does not attribute kernels inside them), {len(steps)} steps profiled after {cfg.warmup} warm-up "
             f"steps and {PROFILER_WARMUP} profiler warm-up steps", head,
             f"per step: host (CPU) {fmt(figures['host_ms_per_step'], '.2f', ' ms')} (profiler overhead included) | "
             f"device {fmt(figures['device_ms_per_step'], '.2f', ' ms')} | kernel launches "
             f"{fmt(figures['kernels_per_step'], '.0f')}",
             f"top {'kernels by device' if cuda else 'operators by own CPU'} time, per step:",
             "       ms  share   calls  name"]
    lines += [f"  {us / n / 1000:7.3f}  {us / total_us:5.1%}  {calls / n:6.1f}  {name[:100]}"
              for name, (us, calls) in top]
    text = (prof.key_averages().table(sort_by='self_device_time_total' if cuda else 'self_cpu_time_total', row_limit=40)
            if events else "(no profiled step: nothing to tabulate)")
    common.save_atomic("\n".join(lines) + f"\n\n{text}\n", os.path.join(cfg.out_dir, 'profile.txt'))
    append_line(os.path.join(cfg.out_dir, 'bench.jsonl'),
                dict(figures, device=torch.cuda.get_device_name() if cuda else 'cpu', torch=torch.__version__))
    print("\n".join(lines) + f"\n{text}")
    return result if figures['stopped'] else 0


def read_jsonl(path):
    """The JSON lines of `path` ([] if it is missing); a line cut off by a kill is skipped."""
    records = []
    if os.path.exists(path):
        for line in open(path).read().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def outcome(stage):
    """A stage's line of stages.jsonl in words."""
    if stage.get('stopped_at_limit'):
        return f"stopped at its {stage['limit_s']:g} s limit" + (", then killed" if stage.get('killed') else "")
    return f"exit {stage['exit']}"


def summary(cfg):
    """<out_dir>/summary.md from the files gpu_check.sh writes there: the stages' outcome, the tests, the figures as
    a table, what they bound for two GPUs, the ratios and the profile's summary: the text a note quotes."""
    at = lambda name: os.path.join(cfg.out_dir, name)  # noqa: E731
    env = json.load(open(at('env.json'))) if os.path.exists(at('env.json')) else {}
    stages, tests, records = read_jsonl(at('stages.jsonl')), read_jsonl(at('tests.jsonl')), read_jsonl(at('bench.jsonl'))
    figures = [r for r in records if r.get('figure') != 'profile']
    lines = [f"# GPU check: {env.get('gpu') or 'no GPU (a dry run)'}, torch {env.get('torch', '?')}, CUDA "
             f"{env.get('cuda', '?')}, compile cache {'warm' if env.get('cache_warm') else 'cold'} at the start", ""]
    cut = [s for s in stages if s.get('stopped_at_limit') or s.get('exit')]
    lines.append(f"Stages before this summary: {len(stages)} ran, {len(stages) - len(cut)} ended cleanly in their "
                 f"limits" + "".join(f"; {s['stage']} {outcome(s)}" for s in cut) + ".")
    by_outcome = defaultdict(list)
    for t in tests:
        by_outcome[t['outcome']].append(t)
    lines.append("Tests: " + (", ".join(f"{len(v)} {k}" for k, v in by_outcome.items()) or "none reported") + ".")
    lines += [f"- failed: {t['test']}: {t.get('message') or ''}" for t in by_outcome['failed']]
    lines += ["", table(figures), ""]
    # the check's figures: the headline first; one rank of a two-GPU run at half its batch, default mode and graphed
    mae = [r for r in figures if r['figure'] == 'mae' and 'images_per_s' in r]
    head = mae[0] if mae else None
    rank = [r for r in mae if head and r['batch_size'] * 2 == head['batch_size']]
    graphed = next((r['images_per_s'] for r in rank if r['cudagraphs']), None)
    default = next((r['images_per_s'] for r in rank if r['compile_mode'] == 'default'), None)
    if head and rank:
        lines.append(f"Two GPUs at batch {head['batch_size']} ({head['batch_size'] // 2} per rank; the gradient "
                     f"all-reduce not counted): at most {fmt(graphed and 2 * graphed, ',.0f')} images/s with CUDA graphs "
                     f"on both ranks, {fmt(default and 2 * default, ',.0f')} in the default compile mode; one GPU at "
                     f"batch {head['batch_size']}: {head['images_per_s']:,.0f}"
                     + (" with CUDA graphs." if head['cudagraphs'] else " (no CUDA graphs)."))
    first = {}
    for r in figures:
        if 'images_per_s' in r:
            first.setdefault(r['figure'], r['images_per_s'])
    ratios = [f"{label} {first[a] / first[b]:.2f}x" for label, a, b in [
        ('SMAE step / MAE step (time)', 'mae', 'smae'), ('loader / fine-tuning (images/s)', 'loader', 'finetune'),
        ('ours / transformers ViTMAE (images/s)', 'mae', 'peer')] if a in first and b in first]
    if ratios:
        lines.append("Ratios at the first batch size: " + "; ".join(ratios) + ".")
    prof = next((r for r in records if r.get('figure') == 'profile'), None)
    if prof:
        lines += ["", f"Profile (batch {prof['batch']}, {prof['compile_mode']} mode, {prof['steps_profiled']} steps after "
                      f"warm-up): host {fmt(prof['host_ms_per_step'], '.2f', ' ms')} a step, device "
                      f"{fmt(prof['device_ms_per_step'], '.2f', ' ms')}, {fmt(prof['kernels_per_step'], '.0f')} kernel "
                      f"launches; top by own time: "
                      + "; ".join(f"{name[:60]} {100 * share:.0f}%" for name, _, share in prof['top'][:5])]
    lines += ["", "| stage | limit s | seconds | outcome |", "|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['limit_s']:g} | {s['seconds']:.1f} | {outcome(s)} |" for s in stages]
    text = "\n".join(lines) + "\n"
    common.save_atomic(text, at('summary.md'))
    print(text)
    return 0


if __name__ == '__main__':
    common.cli(main)
