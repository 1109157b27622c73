"""gpu_check.sh's time limits: the stage limits add up to its stated budget, and a stage that hangs with SIGTERM
ignored (its worker in a session of its own ignoring it too) still ends at its limit plus the grace, with every
process it started; the later stages still run and write their files, and the whole check stays within its budget.
The stages' commands are stand-ins here (a `python3` earlier on PATH), the stage runner and the script are the real
ones, and the limits are scaled down through GPU_CHECK_SCALE, as the script documents."""
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

from conftest import ROOT

SCRIPT = open(os.path.join(ROOT, 'gpu_check.sh')).read()
STAGES = re.findall(r'^stage +(\w+) +(\d+) ', SCRIPT, re.M)  # (name, limit) in the order they run
GRACE = float(re.search(r"GPU_CHECK_GRACE', (\d+)\)", SCRIPT).group(1))
BUDGET = int(re.search(r'^BUDGET=(\d+)', SCRIPT, re.M).group(1))
SCALE, TEST_GRACE = 0.05, 1.0

# python3 as the stages meet it: the stage runner is the real python; the CUDA probe finds no CUDA (a dry run);
# every stage's command is logged and returns at once, except the headline's, which ignores SIGTERM and leaves a
# worker in a session of its own that ignores it too; the eager stage ends at once but leaves a process behind
STAND_IN = f"""#!/bin/bash
case "$2" in *PR_SET_CHILD_SUBREAPER*) exec {sys.executable} "$@" ;; esac
[ "$1" = -c ] && exit 1
echo "$*" >> "$WORK/calls"
case "$*" in
  *"--figures mae --batch_sizes 32 --steps 2")
    trap '' TERM
    setsid bash -c 'trap "" TERM; echo $$ > "$WORK/worker"; while :; do sleep 0.1; done' &
    while :; do sleep 0.1; done ;;
  *"--compile false"*)
    setsid bash -c 'echo $$ > "$WORK/orphan"; exec sleep 600' &
    until [ -s "$WORK/orphan" ]; do sleep 0.05; done ;;
esac
echo "stand-in for: $*"
"""


def alive(pid):
    try:
        return open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


def test_the_stage_limits_add_up_to_the_stated_budget():
    names = [name for name, _ in STAGES]
    assert names == ['env', 'headline', 'rank64_default', 'rank64_graphs', 'eager', 'tests', 'batch1024', 'others',
                     'profile', 'summary'], "the stages, in order of value"
    assert sum(int(limit) + GRACE for _, limit in STAGES) == BUDGET
    assert f"Budget: {BUDGET} s" in SCRIPT  # the header states the same budget
    assert BUDGET <= 540  # a 15-minute lease keeps 6 minutes for the machine's start and a rerun of the headline


def test_the_readme_states_the_same_stages_limits_and_budget():
    speed = open(os.path.join(ROOT, 'README.md')).read().split('## Speed', 1)[1].split('\n## ', 1)[0]
    assert re.findall(r'^\| `(\w+)` \| (\d+) \|', speed, re.M) == STAGES
    assert f"The budget is {BUDGET} s: the limits plus a {GRACE:g} s grace each" in speed


def test_a_stage_that_ignores_sigterm_ends_at_its_limit_and_the_check_goes_on(tmp_path):
    work, out, fake = tmp_path / 'work', tmp_path / 'out', tmp_path / 'bin'
    work.mkdir()
    fake.mkdir()
    (fake / 'python3').write_text(STAND_IN)
    (fake / 'python3').chmod(stat.S_IRWXU)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", WORK=str(work), GPU_CHECK_SCALE=str(SCALE),
               GPU_CHECK_GRACE=str(TEST_GRACE))
    budget = sum(int(limit) * SCALE + TEST_GRACE for _, limit in STAGES)
    leftover = []  # stand-in processes found alive after the check
    t0 = time.monotonic()
    try:
        proc = subprocess.run(['bash', os.path.join(ROOT, 'gpu_check.sh'), str(out)], env=env, capture_output=True,
                              text=True, timeout=120)
    finally:  # should the runner fail, the test leaves no process behind
        for name in ('worker', 'orphan'):
            if (work / name).exists() and (work / name).read_text().strip() and alive(int((work / name).read_text())):
                os.kill(int((work / name).read_text()), signal.SIGKILL)
                leftover.append(name)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert wall < budget, f"the check took {wall:.1f} s, over its scaled budget of {budget:.1f} s"

    stages = [json.loads(line) for line in open(out / 'stages.jsonl')]
    assert [s['stage'] for s in stages] == [name for name, _ in STAGES], "every stage ran, in order"
    hung = stages[1]
    limit = 85 * SCALE
    assert hung['stage'] == 'headline' and hung['stopped_at_limit'] and hung['killed']
    assert limit <= hung['seconds'] <= limit + TEST_GRACE + 1.5, hung
    assert hung['processes_killed'] >= 2  # the stage's process and its worker in another session
    assert 'worker' not in leftover, "the stage's worker (a session of its own, SIGTERM ignored) outlived its stage"
    later = stages[2:]
    assert all(s['exit'] == 0 and not s['stopped_at_limit'] for s in later), later
    eager = next(s for s in stages if s['stage'] == 'eager')
    assert eager['processes_killed'] == 1 and 'orphan' not in leftover, "a process a stage leaves behind is ended with it"
    calls = open(work / 'calls').read()
    for later_command in ['--compile_mode default', '--compile false', '-m pytest -q -p no:cacheprovider tests/test_gpu',
                          '--figures mae --batch_sizes 64', '--figures smae,finetune,dino,loader,peer',
                          '--only profile', '--only summary']:
        assert later_command in calls, f"{later_command!r} never ran after the hung stage"
    log = open(out / 'check.log').read()
    assert log.count('stand-in for:') == len(STAGES) - 1 and '== headline: stopped at its 4.25 s limit' in log
