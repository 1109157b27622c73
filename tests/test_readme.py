"""The README is part of the contract: its recipe table equals the scripts' defaults, its test command is what CI
runs, its paper numbers are reproduce.sh's, and reproduce.sh runs its whole path (quick mode, on the demo data)."""
import inspect
import json
import os
import re
import subprocess
from types import SimpleNamespace

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


def test_reproduce_quick_runs_the_whole_path_and_skips_finished_steps(tmp_path):
    # two of the study's chains, through every script the study runs but dino.py (one variant: every variant runs
    # the same function): the critic, SMAE pre-training on it, its transfer to CUB; a sweep pre-training, its probe
    env = dict(os.environ, OUT=str(tmp_path / 'study'), DATA_DIR=str(tmp_path / 'data'), RATIOS='75',
               VARIANTS='smae_block50', PYTHONPATH=ROOT)
    wanted = ['smae_block50_ft_cub', 'sweep_mask75_probe']  # and the steps they need
    proc = subprocess.run(['bash', os.path.join(ROOT, 'reproduce.sh'), 'quick', *wanted], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = open(tmp_path / 'study' / 'RESULTS.md').read()
    steps = ['critic', 'smae_block50', 'smae_block50_ft_cub', 'sweep_mask75', 'sweep_mask75_probe']
    for s in steps:
        assert re.search(rf'^\| {s} \|', table, re.M), f"{s} missing from RESULTS.md"
        assert os.path.exists(tmp_path / 'study' / s / 'results.json')
    assert '| 47.50 |' in table and '| 32.04 |' in table  # the study's numbers beside ours
    # the SMAE run used the critic trained before it
    smae = json.load(open(tmp_path / 'study' / 'smae_block50' / 'results.json'))
    assert smae['config']['critic'].endswith('critic/ckpt.pt') and smae['alpha'] == 0.5
    again = subprocess.run(['bash', os.path.join(ROOT, 'reproduce.sh'), 'quick', *wanted], env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count('done, skipped') == len(steps)


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
