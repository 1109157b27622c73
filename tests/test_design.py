"""The shape of the code as a contract: every script documents itself with --help, the modules import each other
without cycles (data.py at the bottom), and the rule that picks torch.compile's mode keeps CUDA graphs wherever
the loops run (tests/test_ddp.py checks what makes that safe: the gradients live in one buffer of ours)."""
import ast
import importlib
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

import bench
import common
import dino
import evaluate
import finetune
import pretrain
import probe
from conftest import ROOT

SCRIPTS = [pretrain, finetune, probe, evaluate, bench, dino]
OURS = {'data', 'model', 'common', 'probe', 'evaluate', 'pretrain', 'finetune', 'bench', 'dino'}


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda m: m.__name__)
def test_help_lists_every_constant_with_its_default_and_comment(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(['--help'])
    assert exit_info.value.code == 0
    page = capsys.readouterr().out
    source = open(script.__file__).read().splitlines()
    for name, default in common.defaults(vars(script)).items():
        line = next(s for s in source if s.startswith(name + ' ') and '#' in s)
        comment = line.split('#', 1)[1].strip()
        assert f"--{name} {default!s}" in page and comment in page, name


def test_dash_h_on_the_command_line_exits_0():
    done = subprocess.run([sys.executable, os.path.join(ROOT, 'probe.py'), '-h'], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0 and '--ckpt' in done.stdout and not done.stderr.strip()


def project_imports(path):
    """(imports of our modules at the top level, imports of our modules inside functions or classes)."""
    tree = ast.parse(open(path).read())
    top = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names} | \
          {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    every = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names} | \
            {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    return top & OURS, (every - top) & OURS


def test_imports_form_a_graph_without_cycles_with_data_at_the_bottom():
    graph = {}
    for name in sorted(OURS):
        path = os.path.join(ROOT, name + '.py')
        if os.path.exists(path):
            graph[name], hidden = project_imports(path)
            assert not hidden, f"{name}.py imports {hidden} inside a function"
    assert graph['data'] == set(), "data.py must import nothing of ours"
    assert graph['model'] == set()
    order, seen = [], set()

    def visit(node, stack):
        assert node not in stack, f"import cycle: {' -> '.join(stack + [node])}"
        if node not in seen:
            for dep in sorted(graph[node]):
                visit(dep, stack + [node])
            seen.add(node)
            order.append(node)
    for node in graph:
        visit(node, [])


def fake_run(cuda=True, ddp=False):
    return SimpleNamespace(cuda=cuda, ddp=ddp)


def test_cuda_graphs_are_kept_under_torchrun_and_with_accumulation():
    """CUDA graphs used to be dropped under torchrun (DDP's hooks ran outside the graph) and with accumulation (a
    second backward added into gradient memory the graph pool hands back at the next replay). With no DDP wrapper
    and every .grad in a buffer of ours (common.FlatGrads) neither hazard remains: the mode is the one asked for."""
    cfg = lambda accum, mode='reduce-overhead': SimpleNamespace(compile=True, compile_mode=mode, accum_steps=accum)  # noqa: E731
    for ddp in (False, True):
        for accum in (1, 2):
            for mode in ('reduce-overhead', 'max-autotune', 'default'):
                assert common.compile_mode(cfg(accum, mode), fake_run(ddp=ddp)) == mode, (ddp, accum, mode)
    assert common.compile_mode(cfg(1), fake_run(cuda=False)) is None      # the CPU runs eager
    assert common.compile_mode(SimpleNamespace(compile=False, compile_mode='default', accum_steps=1), fake_run()) is None


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda m: m.__name__)
def test_every_config_value_has_a_rule(script):
    """Every constant of every script is a boolean, a path checked when it is opened, or held to a rule in
    common.RULES, so that a zero, a negative, a NaN or an empty string is one line before anything runs."""
    for name, default in common.defaults(vars(script)).items():
        assert type(default) is bool or name in common.RULES or name in common.FREE_TEXT, f"--{name} has no rule"


def test_every_name_used_from_our_modules_exists():
    """Every `module.name` that a script or a test reads from one of our modules exists there. The CUDA tests skip
    on a CPU, so without this a renamed function would first fail on a GPU, in the few minutes a session has one."""
    files = [os.path.join(ROOT, m + '.py') for m in sorted(OURS)]
    files += [os.path.join(ROOT, 'tests', f) for f in sorted(os.listdir(os.path.join(ROOT, 'tests'))) if f.endswith('.py')]
    missing = []
    for path in files:
        tree = ast.parse(open(path).read())
        aliases = {a.asname or a.name: a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for a in node.names if a.name in OURS}  # `import model as M` -> {'M': 'model'}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and isinstance(node.ctx, ast.Load):
                module = importlib.import_module(aliases[node.value.id])
                if not hasattr(module, node.attr):
                    missing.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {aliases[node.value.id]}.{node.attr}")
    assert not missing, missing
