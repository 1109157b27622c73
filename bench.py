"""
Throughput benchmarks, each timing the real thing after warm-up:
- pre-training: pretrain.py's own loop in its benchmark mode (data gathered from the on-device dataset,
  masks, forward, backward, fused AdamW), for each batch size;
- the SMAE step (critic included) against the MAE step, as a ratio;
- fine-tuning: finetune.py's loop with per-sample RandAugment on the GPU, beside the loader+augmentation alone;
- the transformers ViTMAEForPreTraining peer with the same configuration, in the same run, when installed.

    python bench.py                                   # the paper's model at batch 128 and 1024 on the GPU
    python bench.py --batch_sizes 128 --steps 300 --peer false
    python bench.py --device cpu --steps 3 --warmup 1 --img_size 32 --patch_size 8 --batch_sizes 32   # smoke test

Prints one line per measurement and a Markdown table; writes <out_dir>/bench.json.
"""
import contextlib
import json
import os
import tempfile
import time

import torch

import common
import data
import model as M

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
device = 'auto'             # auto | cuda | cpu
dtype = 'bfloat16'          # autocast dtype on CUDA
compile = True              # torch.compile (CUDA only)
compile_mode = 'reduce-overhead'  # pretrain.py's default: CUDA graphs
smae = True                 # also time the SMAE step (alpha 0.5, a SqueezeNet critic) and report the ratio
finetune = True             # also time finetune.py's step and the loader with RandAugment
peer = True                 # also time transformers' ViTMAEForPreTraining (if installed)
out_dir = 'out/bench'       # bench.json goes here
# -----------------------------------------------------------------------------


def common_args(cfg, tmp, batch):
    args = ['--dataset', cfg.dataset, '--data_dir', cfg.data_dir, '--model', cfg.model, '--device', cfg.device,
            '--dtype', cfg.dtype, '--compile', str(cfg.compile), '--batch_size', str(batch),
            '--bench_steps', str(cfg.steps), '--bench_warmup', str(cfg.warmup), '--out_dir', tmp]
    if cfg.img_size:
        args += ['--img_size', str(cfg.img_size)]
    if cfg.patch_size:
        args += ['--patch_size', str(cfg.patch_size)]
    return args


def critic_checkpoint(path):
    """A randomly initialised SqueezeNet critic in finetune.py's checkpoint format: speed does not depend on its weights."""
    net = M.build_squeezenet(200)
    common.save_atomic({'kind': 'finetune', 'model': net.state_dict(), 'model_config': {'num_classes': 200},
                        'config': {'arch': 'squeezenet'}, 'step': 0}, path)
    return path


def time_transformers_peer(cfg, batch, dev):
    """transformers' ViTMAEForPreTraining with the same configuration, fed the same way (uint8 dataset on the device,
    gathered and normalised per step), bf16 autocast, fused AdamW, torch.compile (default mode)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining
    mcfg = M.make_config(cfg.model, img_size=cfg.img_size or None, patch_size=cfg.patch_size or None)
    hf_cfg = ViTMAEConfig(hidden_size=mcfg.embed_dim, num_hidden_layers=mcfg.depth, num_attention_heads=mcfg.num_heads,
                          intermediate_size=int(mcfg.embed_dim * mcfg.mlp_ratio), decoder_hidden_size=mcfg.decoder_embed_dim,
                          decoder_num_hidden_layers=mcfg.decoder_depth, decoder_num_attention_heads=mcfg.decoder_num_heads,
                          decoder_intermediate_size=int(mcfg.decoder_embed_dim * mcfg.decoder_mlp_ratio),
                          image_size=mcfg.img_size, patch_size=mcfg.patch_size, mask_ratio=cfg.mask, norm_pix_loss=False,
                          layer_norm_eps=1e-6, attn_implementation='sdpa')
    net = ViTMAEForPreTraining(hf_cfg).to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=5e-4, betas=(0.9, 0.95), weight_decay=0.15,
                            **(dict(fused=True) if dev.type == 'cuda' else {}))
    step_net = torch.compile(net) if (cfg.compile and dev.type == 'cuda') else net
    images = data.load_split(cfg.dataset, 'train', cfg.data_dir).images.to(dev)
    ctx = torch.autocast('cuda', dtype=getattr(torch, cfg.dtype)) if dev.type == 'cuda' else contextlib.nullcontext()
    gen = torch.Generator(device=dev).manual_seed(0)

    def one_step():
        idx = torch.randint(0, images.shape[0], (batch,), device=dev, generator=gen)
        x = data.normalize(images[idx])
        if x.shape[-1] != mcfg.img_size:
            x = torch.nn.functional.interpolate(x, size=mcfg.img_size, mode='bilinear', antialias=True)
        with ctx:
            loss = step_net(pixel_values=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(cfg.warmup):
        one_step()
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        one_step()
    sync()
    return cfg.steps * batch / (time.perf_counter() - t0)


def main(argv=None):
    import finetune
    import pretrain
    cfg, _ = common.parse_config(common.script_defaults(globals()), argv)
    dev = torch.device('cuda' if (cfg.device == 'auto' and torch.cuda.is_available()) else
                       ('cpu' if cfg.device == 'auto' else cfg.device))
    name = torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'
    print(f"bench: {cfg.model} mask {cfg.mask} on {name}, torch {torch.__version__}, {cfg.dtype}, "
          f"compile {cfg.compile} ({cfg.compile_mode}), {cfg.steps} steps after {cfg.warmup} warm-up")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        critic = critic_checkpoint(os.path.join(tmp, 'critic.pt')) if cfg.smae else None
        for batch in [int(b) for b in cfg.batch_sizes.split(',') if b.strip()]:
            row = dict(batch=batch)
            args = common_args(cfg, os.path.join(tmp, 'run'), batch)
            row['mae'] = pretrain.main(args + ['--mask', str(cfg.mask), '--compile_mode', cfg.compile_mode])
            if cfg.smae:
                row['smae'] = pretrain.main(args + ['--mask', str(cfg.mask), '--compile_mode', cfg.compile_mode,
                                                    '--alpha', '0.5', '--critic', critic])
                row['smae_step_ratio'] = row['smae']['step_ms'] / row['mae']['step_ms']
                print(f"  SMAE step / MAE step: {row['smae_step_ratio']:.2f}x")
            if cfg.finetune:
                row['finetune'] = finetune.main(args + ['--compile_mode', cfg.compile_mode])
                row['loader_finetune_augment'] = loader_rate(cfg, batch, dev)
                print(f"  loader + RandAugment alone: {row['loader_finetune_augment']:,.0f} images/s "
                      f"({row['loader_finetune_augment'] / row['finetune']['images_per_s']:.1f}x what fine-tuning consumes)")
            if cfg.peer:
                try:
                    row['peer_images_per_s'] = time_transformers_peer(cfg, batch, dev)
                    row['ratio_vs_peer'] = row['mae']['images_per_s'] / row['peer_images_per_s']
                    print(f"  transformers ViTMAEForPreTraining: {row['peer_images_per_s']:,.0f} images/s -> ours is "
                          f"{row['ratio_vs_peer']:.2f}x")
                except ImportError:
                    print("  transformers is not installed: peer not timed")
            results.append(row)
    print("\n| batch | MAE images/s | step ms | MFU | peak mem | SMAE/MAE step | fine-tune images/s | ViTMAE (transformers) | ours / ViTMAE |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mae = r['mae']
        f = lambda v, fmt: (fmt.format(v) if v is not None else 'n/a')  # noqa: E731
        print(f"| {r['batch']} | {mae['images_per_s']:,.0f} | {mae['step_ms']:.2f} | {f(mae['mfu'] and 100 * mae['mfu'], '{:.1f}%')} | "
              f"{f(mae['peak_mem_gb'], '{:.2f} GB')} | {f(r.get('smae_step_ratio'), '{:.2f}x')} | "
              f"{f(r.get('finetune', {}).get('images_per_s'), '{:,.0f}')} | {f(r.get('peer_images_per_s'), '{:,.0f}')} | "
              f"{f(r.get('ratio_vs_peer'), '{:.2f}x')} |")
    os.makedirs(cfg.out_dir, exist_ok=True)
    common.write_text_atomic(json.dumps(dict(device=name, torch=torch.__version__, config=vars(cfg), results=results),
                                        indent=1, default=str), os.path.join(cfg.out_dir, 'bench.json'))
    return 0


def loader_rate(cfg, batch, dev):
    """images/s of the DeviceLoader with the fine-tuning augmentation alone (no model)."""
    split = data.load_split(cfg.dataset, 'train', cfg.data_dir)
    size = cfg.img_size or M.make_config(cfg.model).img_size
    loader = data.DeviceLoader(split, batch_size=batch, device=dev, img_size=size, augment=data.finetune_augment)
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    start = min(cfg.warmup, 5)
    n, t0 = 0, None
    for step, micro in loader.epoch(0):
        if step == start:        # batches before this one are warm-up
            sync()
            t0 = time.perf_counter()
        elif t0 is not None:
            n += micro[0][0].shape[0]
            if step == start + cfg.steps:
                break
    sync()
    return n / (time.perf_counter() - t0)


if __name__ == '__main__':
    common.cli(main)
