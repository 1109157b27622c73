"""
Throughput benchmarks, each configuration timed in a process of its own (so every figure is the static,
freshly compiled graph a real run uses, never a recompiled symbolic-shape one), after warm-up:
- pre-training: pretrain.py's own loop in its benchmark mode (data gathered from the on-device dataset, masks,
  forward, backward, fused AdamW), for each batch size;
- the SMAE step (critic included) against the MAE step, as a ratio;
- fine-tuning: finetune.py's loop with per-sample RandAugment (and mixup/cutmix), beside the loader and its
  augmentation alone;
- transformers' ViTMAEForPreTraining (if installed) with the same configuration, compile mode and feeding as ours.

    python bench.py                                   # the study's model at batch 128 and 1024 on the GPU
    python bench.py --batch_sizes 128 --steps 300 --peer false
    python bench.py --device cpu --steps 3 --warmup 1 --img_size 32 --patch_size 8 --batch_sizes 32   # smoke test

Prints one line per measurement and a Markdown table; <out_dir>/bench.json is rewritten after every measurement.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile as torch_profile

import common
import data
import model as M
import pretrain

# -----------------------------------------------------------------------------
batch_sizes = '128,1024'    # comma-separated global batch sizes to time
steps = 100                 # timed steps per measurement
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
smae = True                 # also time the SMAE step (alpha 0.5, a SqueezeNet critic) at the first batch size, and the ratio
finetune = True             # also time finetune.py's step (RandAugment + mixup/cutmix) and the loader alone, at the first batch size
peer = True                 # also time transformers' ViTMAEForPreTraining (if installed)
process_timeout = 600       # seconds one configuration may take (compilation included) before it is given up
only = ''                   # 'profile': torch.profiler's table of the MAE step at the first batch size into out_dir/profile.txt;
                            # 'peer', 'loader': time that one thing in this process (how bench.py runs itself)
out_dir = 'out/bench'       # bench.json goes here
# -----------------------------------------------------------------------------


def measure(script, args, timeout):
    """Run `python script args` in a fresh process and return the figures of its BENCH_JSON line (None on failure,
    with the reason printed: one configuration failing does not lose the others)."""
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), script)] + [str(a) for a in args]
    try:  # the child dies with this process, whatever ends it (a timeout, a signal)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=common.die_with_parent)
    except subprocess.TimeoutExpired:
        print(f"  {script} {' '.join(cmd[2:])}: timed out after {timeout}s")
        return None
    for line in done.stdout.splitlines():
        if line.startswith('BENCH_JSON '):
            return json.loads(line[len('BENCH_JSON '):])
    print(f"  {script} {args[-1] if script == 'bench.py' else ''} failed (exit {done.returncode}): "
          f"{(done.stderr or done.stdout).strip()[-400:]}")
    return None


def command(cfg, key, batch, tmp=None):
    """(script, arguments) of the process that times `key` at this batch size: pretrain.py's or finetune.py's
    benchmark mode (which writes no files), or this script; for 'smae', writes a critic into the folder `tmp`."""
    args = ['--dataset', cfg.dataset, '--data_dir', cfg.data_dir, '--model', cfg.model, '--device', cfg.device,
            '--dtype', cfg.dtype, '--compile', cfg.compile, '--compile_mode', cfg.compile_mode,
            '--img_size', cfg.img_size, '--patch_size', cfg.patch_size]
    if key in ('peer', 'loader'):  # this script, timing one thing
        return 'bench.py', args + ['--batch_sizes', batch, '--steps', cfg.steps, '--warmup', cfg.warmup,
                                   '--mask', cfg.mask, '--only', key]
    args += ['--batch_size', batch, '--bench_steps', cfg.steps, '--bench_warmup', cfg.warmup]
    if key == 'finetune':
        return 'finetune.py', args + ['--mixup', 0.8, '--cutmix', 1.0]
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
        raise common.UserError("transformers is not installed: the peer is not timed (pip install transformers)") from None
    mcfg = M.make_config(cfg.model, img_size=cfg.img_size or None, patch_size=cfg.patch_size or None)
    hf_cfg = ViTMAEConfig(hidden_size=mcfg.embed_dim, num_hidden_layers=mcfg.depth, num_attention_heads=mcfg.num_heads,
                          intermediate_size=int(mcfg.embed_dim * mcfg.mlp_ratio), decoder_hidden_size=mcfg.decoder_embed_dim,
                          decoder_num_hidden_layers=mcfg.decoder_depth, decoder_num_attention_heads=mcfg.decoder_num_heads,
                          decoder_intermediate_size=int(mcfg.decoder_embed_dim * mcfg.decoder_mlp_ratio),
                          image_size=mcfg.img_size, patch_size=mcfg.patch_size, mask_ratio=cfg.mask, norm_pix_loss=False,
                          layer_norm_eps=1e-6, attn_implementation='sdpa')
    net = ViTMAEForPreTraining(hf_cfg).to(run.device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=5e-4, betas=(0.9, 0.95), weight_decay=0.15, **(dict(fused=True) if run.cuda else {}))
    mode = common.compile_mode(SimpleNamespace(compile=cfg.compile, compile_mode=cfg.compile_mode, accum_steps=1), run)
    step_net = torch.compile(net, mode=mode) if mode else net
    images = data.load_split(cfg.dataset, 'train', cfg.data_dir).images.to(run.device)
    gen = torch.Generator(device=run.device).manual_seed(0)
    for step in range(cfg.warmup + cfg.steps):
        if step == cfg.warmup:  # the steps before are warm-up (compilation, CUDA graph capture)
            t0 = common.bench_start(run)
        x = data.normalize(images[torch.randint(0, images.shape[0], (batch,), device=run.device, generator=gen)])
        if x.shape[-1] != mcfg.img_size:
            x = torch.nn.functional.interpolate(x, size=mcfg.img_size, mode='bilinear', antialias=True)
        if mode in ('reduce-overhead', 'max-autotune'):
            torch.compiler.cudagraph_mark_step_begin()
        with run.autocast:
            loss = step_net(pixel_values=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return f"transformers ViTMAEForPreTraining ({mode or 'eager'})", cfg.steps * batch, t0


def loader_rate(cfg, batch, run):
    """images/s of the DeviceLoader with the fine-tuning augmentation and mixup/cutmix alone (no model)."""
    split = data.load_split(cfg.dataset, 'train', cfg.data_dir)
    size = cfg.img_size or M.make_config(cfg.model).img_size
    loader = data.DeviceLoader(split, batch_size=batch, device=run.device, img_size=size, augment=data.finetune_augment)
    for step, micro in loader.epoch(0):
        x, y = micro[0]
        data.mixup_cutmix(x, y, split.num_classes, 0.8, 1.0, 0.5, 0.0, seed=step)
        if step == cfg.warmup:  # the clock starts after this batch: the ones so far are warm-up
            t0 = common.bench_start(run)
        if step == cfg.warmup + cfg.steps:
            break
    return 'loader + RandAugment + mixup/cutmix', (step - cfg.warmup) * batch, t0  # fewer if the epoch ends first


def main(argv=None):
    cfg, _ = common.configure(globals(), argv)
    if cfg.only == 'profile':
        return profile(cfg)
    if cfg.only:  # one measurement, in this fresh process: its loop returns (label, images timed, start of the clock)
        batch = int(cfg.batch_sizes)
        with common.Run(cfg, 'bench', lock=False, training=False) as run:
            label, images, t0 = {'peer': time_transformers_peer, 'loader': loader_rate}[cfg.only](cfg, batch, run)
            if run.cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        print("BENCH_JSON " + json.dumps(dict(label=label, images_per_s=images / dt, batch_size=batch)))
        return 0
    dev = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if cfg.device == 'auto' else cfg.device)
    name = torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'
    shown = {k: common.shown_value(*v) for k, v in common.in_effect(cfg, dev.type == 'cuda').items()}  # (CPU: float32)
    print(f"bench: {cfg.model} mask {cfg.mask} on {name}, torch {torch.__version__}, "
          + ", ".join(f"{k} {shown.get(k, getattr(cfg, k))}" for k in ('dtype', 'compile', 'compile_mode'))
          + f", {cfg.steps} steps after {cfg.warmup} warm-up, one process per figure", flush=True)
    os.makedirs(cfg.out_dir, exist_ok=True)
    rows = [dict(batch=int(b)) for b in cfg.batch_sizes.split(',')]
    report = dict(device=name, torch=torch.__version__, config=vars(cfg), results=rows)  # the rows fill in as figures come
    # the most wanted figures first, so a run cut short still has them; the extras at the first batch size
    jobs = [(row, key) for row in rows for key in ['mae'] + ['peer'] * cfg.peer]
    jobs += [(rows[0], key) for key in ['smae'] * cfg.smae + ['finetune', 'loader'] * cfg.finetune]
    with tempfile.TemporaryDirectory() as tmp:
        for row, key in jobs:
            got = row[key] = measure(*command(cfg, key, row['batch'], tmp), cfg.process_timeout)
            if got:
                print(f"  batch {row['batch']} {key}: {got['images_per_s']:,.0f} images/s ({got.get('label', '')})", flush=True)
            ips = {k: (row.get(k) or {}).get('images_per_s') for k in ('mae', 'smae', 'finetune', 'loader', 'peer')}
            for ratio, a, b in [('smae_step_ratio', 'mae', 'smae'), ('loader_over_finetune', 'loader', 'finetune'),
                                ('ratio_vs_peer', 'mae', 'peer')]:  # the figures that compare, where both exist
                if ips[a] and ips[b]:
                    row[ratio] = ips[a] / ips[b]
            common.save_atomic(json.dumps(report, indent=1, default=str), os.path.join(cfg.out_dir, 'bench.json'))
    print(table(rows))
    return 0


def table(rows):
    f = lambda v, spec, unit='': format(v, spec) + unit if v is not None else 'n/a'  # noqa: E731
    lines = ["| batch | MAE images/s | step ms | MFU | peak mem | SMAE/MAE step | fine-tune images/s | loader/fine-tune | "
             "ViTMAE (transformers) | ours / ViTMAE |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mae = r.get('mae') or {}
        lines.append(f"| {r['batch']} | {f(mae.get('images_per_s'), ',.0f')} | {f(mae.get('step_ms'), '.2f')} | "
                     f"{f(mae.get('mfu') and 100 * mae['mfu'], '.1f', '%')} | {f(mae.get('peak_mem_gb'), '.2f', ' GB')} | "
                     f"{f(r.get('smae_step_ratio'), '.2f', 'x')} | {f((r.get('finetune') or {}).get('images_per_s'), ',.0f')} | "
                     f"{f(r.get('loader_over_finetune'), '.1f', 'x')} | {f((r.get('peer') or {}).get('images_per_s'), ',.0f')} | "
                     f"{f(r.get('ratio_vs_peer'), '.2f', 'x')} |")
    return "\n".join(lines)


def profile(cfg):
    """Where the time of pretrain.py's real step goes: its benchmark mode under torch.profiler, the operators and
    kernels ranked by their own device time (CPU time without a GPU), written to <out_dir>/profile.txt."""
    args = [str(a) for a in command(cfg, 'mae', cfg.batch_sizes.split(',')[0])[1]]
    cuda = torch.cuda.is_available() and cfg.device != 'cpu'
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        result = pretrain.main(args)  # (the warm-up steps, compilation included, are in it too)
    # the figures, or the exit code of a run that a signal (a timeout's SIGTERM, Ctrl-C) stopped: then the table
    # still covers every step that ran, which is what a time-boxed GPU session needs to keep
    stopped = not isinstance(result, dict)
    head = (f"stopped by a signal before the timed steps ended (exit {result}): the table covers the steps that ran"
            if stopped else f"{result['label']} batch {result['batch_size']}: {result['images_per_s']:,.0f} images/s")
    text = prof.key_averages().table(sort_by='self_cuda_time_total' if cuda else 'self_cpu_time_total', row_limit=40)
    os.makedirs(cfg.out_dir, exist_ok=True)
    common.save_atomic(f"{head}\n\n{text}\n", os.path.join(cfg.out_dir, 'profile.txt'))
    print(f"{head}\n{text}")
    return result if stopped else 0


if __name__ == '__main__':
    common.cli(main)
