"""The README is part of the contract: its recipe table equals the scripts' defaults, its test command is what CI
runs, its paper numbers are reproduce.sh's, and reproduce.sh runs its whole path (quick mode, on the demo data)."""
import inspect
import json
import os
import re
import subprocess
from types import SimpleNamespace

import pytest

import common
import data
import finetune
import pretrain
import probe
from conftest import ROOT

README = open(os.path.join(ROOT, 'README.md')).read()


def recipe_table():
    """{row name: [pre-train, fine-tune, probe]} from the README's recipe table."""
    section = README.split('## The recipes', 1)[1].split('\n## ', 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if len(cells) == 4 and cells[0] and not cells[0].startswith('-'):
            rows[cells[0]] = cells[1:]
    return rows


def number(text):
    return float(re.match(r'[0-9.e-]+', text).group())


def test_recipe_table_equals_script_defaults():
    rows = recipe_table()
    pt, ft, pr = (common.defaults(vars(m)) for m in (pretrain, finetune, probe))
    assert rows['optimizer'] == ['AdamW', 'AdamW', 'Adam']
    # learning rate at batch 128 (fine-tuning: 0 means the recipe's, 1e-3 or 5e-4 on CUB)
    assert number(rows['lr'][0]) == pt['lr']
    assert ft['lr'] == 0 and number(rows['lr'][1]) == finetune.base_lr(SimpleNamespace(lr=0.0, dataset='tin'))
    assert re.search(r'CUB: ([0-9.e-]+)', rows['lr'][1]).group(1) == '5e-4' == f"{finetune.base_lr(SimpleNamespace(lr=0.0, dataset='cub')):.0e}".replace('e-04', 'e-4')
    assert number(rows['lr'][2]) == pr['lr']
    assert [number(x) for x in rows['weight decay']] == [pt['weight_decay'], ft['weight_decay'], pr.get('weight_decay', 0)]
    betas = [tuple(float(b) for b in x.split(',')) for x in rows['betas']]
    assert betas == [(pt['beta1'], pt['beta2']), (ft['beta1'], ft['beta2']), (pr['beta1'], pr['beta2'])]
    assert [int(x) for x in rows['warmup epochs']] == [pt['warmup_epochs'], ft['warmup_epochs'], pr['warmup_epochs']]
    assert [int(x) for x in rows['epochs']] == [pt['epochs'], ft['epochs'], pr['epochs']]
    assert [int(x) for x in rows['batch']] == [pt['batch_size'], ft['batch_size'], pr['batch_size']]
    assert rows['augmentation'][0] == 'none' and pt['augment'] is False
    assert rows['augmentation'][2] == 'none'
    n, m = map(int, re.match(r'RandAugment\((\d+), (\d+)\)', rows['augmentation'][1]).groups())
    ra = inspect.signature(data.rand_augment).parameters
    assert ft['augment'] is True and (ra['num_ops'].default, ra['magnitude'].default) == (n, m)
    assert 'rand_augment(' in inspect.getsource(data.finetune_augment)


def test_ci_runs_exactly_the_readme_test_command():
    ci = open(os.path.join(ROOT, '.ci', 'run')).read()
    readme_cmd = re.search(r'pip install -r requirements.txt && (python3 -m pytest[^\n]*)', README).group(1).strip()
    ci_cmd = [l.strip() for l in ci.splitlines() if 'pytest' in l and not l.strip().startswith('#')]
    assert ci_cmd == [readme_cmd]


def test_readme_paper_numbers_are_reproduce_sh_numbers():
    script = open(os.path.join(ROOT, 'reproduce.py')).read()  # reproduce.sh runs it: the steps are there
    section = README.split('## Reproducing the paper', 1)[1].split('\n## ', 1)[0]
    in_script = set(re.findall(r'\b\d\d\.\d\d\b', script))
    in_readme = set(re.findall(r'\b\d\d\.\d\d\b', section))
    assert in_script and in_script <= in_readme, f"reproduce.sh numbers missing from the README: {in_script - in_readme}"


def test_reproduce_quick_runs_the_whole_path_side_by_side_with_the_figures_of_one_at_a_time(tmp_path):
    """Two of the study's chains with JOBS=2, through every script the study runs but dino.py (one variant: every
    variant runs the same function): the critic, SMAE pre-training on it, its transfer to CUB; a sweep pre-training,
    its probe. The two chains start side by side, and the sweep's pre-training run again alone with JOBS=1 gives the
    same figures to the last bit: each CPU job has one thread whatever JOBS is (a float reduction's result depends
    on the number of threads). A rerun skips every finished step."""
    def quick(out, jobs, *steps, timeout=600):
        env = dict(os.environ, OUT=str(tmp_path / out), DATA_DIR=str(tmp_path / 'data'), RATIOS='75',
                   VARIANTS='smae_block50', PYTHONPATH=ROOT, JOBS=jobs, CUDA_VISIBLE_DEVICES='')
        env.pop('OMP_NUM_THREADS', None)  # the scheduler's own choice
        proc = subprocess.run(['bash', os.path.join(ROOT, 'reproduce.sh'), 'quick', *steps], env=env,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    wanted = ['smae_block50_ft_cub', 'sweep_mask75_probe']  # and the steps they need
    lines = quick('study', '2', *wanted).splitlines()
    first_done = next(i for i, line in enumerate(lines) if ': done in ' in line)
    assert all(any(f'== {s}: running' in line for line in lines[:first_done]) for s in ('critic', 'sweep_mask75'))
    table = open(tmp_path / 'study' / 'RESULTS.md').read()
    steps = ['critic', 'smae_block50', 'smae_block50_ft_cub', 'sweep_mask75', 'sweep_mask75_probe']
    for s in steps:
        assert re.search(rf'^\| {s} \|', table, re.M), f"{s} missing from RESULTS.md"
        assert os.path.exists(tmp_path / 'study' / s / 'results.json')
        start = next(r for r in map(json.loads, open(tmp_path / 'study' / s / 'log.jsonl')) if r['event'] == 'start')
        assert start['device'] == 'cpu (1 threads)', s
    assert '| 47.50 |' in table and '| 32.04 |' in table  # the study's numbers beside ours
    assert table.startswith('Quick mode: the embedded demo photographs (8 classes, 32 px)')  # not TIN's figures
    probe_row = re.search(r'^\| sweep_mask75_probe \|.*\| 32\.04 \| ([\d.]+) \| ([\d.]+) \| [\d.]+ min \|$', table, re.M)
    floor = json.load(open(tmp_path / 'study' / 'sweep_mask75_probe' / 'results.json'))['floor']['top1']
    assert probe_row and float(probe_row.group(1)) == pytest.approx(floor, abs=0.005), table  # beside its floor
    # the SMAE run used the critic trained before it
    smae = json.load(open(tmp_path / 'study' / 'smae_block50' / 'results.json'))
    assert smae['config']['critic'].endswith('critic/ckpt.pt') and smae['alpha'] == 0.5

    quick('alone', '1', 'sweep_mask75')

    def figures(out):  # the RESULTS.md figure, and the val loss to the last bit
        table = open(tmp_path / out / 'RESULTS.md').read()
        row = re.search(r'^\| sweep_mask75 \|.*\| ([\d.]+) \| [\d.]+ min \|$', table, re.M)
        return row.group(1), json.load(open(tmp_path / out / 'sweep_mask75' / 'results.json'))['val_loss']
    assert figures('alone') == figures('study')

    again = quick('study', '2', *wanted, timeout=120)
    assert again.count('done, skipped') == len(steps)


def test_shared_names_table_says_which_script_has_which():
    """The README's table of shared config names: a ✓ means the script has every name of the row, named names (or
    'betas') mean just those, an empty cell means none of them."""
    import bench
    import dino
    import evaluate
    section = README.split('Names that several scripts share mean the same in each:', 1)[1].split('\n## ', 1)[0]
    header = [c.strip() for c in section.strip().splitlines()[0].strip('|').split('|')]
    scripts = {'pretrain': pretrain, 'finetune': finetune, 'probe': probe, 'dino': dino, 'evaluate': evaluate,
               'bench': bench}
    rows = [line for line in section.strip().splitlines()[2:] if line.startswith('|')]
    assert len(rows) >= 15
    for line in rows:
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        names = re.findall(r'`([a-z_0-9]+)`', cells[0])
        for column, cell in zip(header[2:], cells[2:]):
            has = set(common.defaults(vars(scripts[column])))
            if cell.startswith('✓'):
                expected = set(names)
            elif cell == 'betas':
                expected = {'beta1', 'beta2'}
            else:
                expected = set(re.findall(r'`([a-z_0-9]+)`', cell.split('(')[0])) & set(names)
            assert set(names) & has == expected, f"{column}: row {names}, README says {expected}, script has {set(names) & has}"
