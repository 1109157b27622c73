#!/usr/bin/env bash
# The prepared GPU check: one command that yields every key figure in one short lease of a borrowed GPU.
#
#   ./gpu_check.sh OUT_DIR        # OUT_DIR: a new or empty folder
#
# The stages (at the bottom) run in order of value, each under its own time limit, and every result is written the
# moment it exists, so a check cut short keeps what it measured. OUT_DIR receives 7 files:
#   summary.md    what a note quotes: the figures as a table, what they bound for two GPUs, the ratios, the profile's
#                 summary, the tests' outcome, each stage's seconds and outcome (written last, from the files below)
#   bench.jsonl   a line per figure the moment it exists (bench.py): images/s and step time after warm-up, the
#                 compile/warm-up seconds apart, MFU, peak memory, compile mode, CUDA graphs proven in use or not;
#                 an error or a skip with its reason where there is one
#   tests.jsonl   a line per CUDA test (tests/test_gpu_ddp.py, then tests/test_gpu.py) as it ends
#   profile.txt   the MAE step at batch 128 in the default compile mode, after warm-up: host and device time and
#                 kernel launches per step, the top kernels, then torch.profiler's table (bench.jsonl: the summary)
#   env.json      GPU, driver, torch, CUDA, Python; the compile cache and whether it was warm at the start
#   stages.jsonl  a line per stage as it ends: limit, seconds, exit code, stopped at its limit or not
#   check.log     everything the stages printed
#
# Budget: 540 s, the ten stage limits plus a 5 s grace each (and the few seconds of the CUDA probe below). A
# 15-minute lease then keeps about 6 minutes for the machine's start (a minute or two) and a rerun of the headline:
#   python3 bench.py --batch_sizes 128 --figures mae --steps 200 --warmup 20 --out_dir OUT_DIR
# A stage's limit ends it whatever it does: SIGTERM to every process it started (children, their children, and those
# that left its process group or session: they are re-parented to the stage's runner), SIGKILL GRACE seconds later,
# and any process a stage leaves behind is killed when it ends. All stages share torch's compile cache, outside
# OUT_DIR (TORCHINDUCTOR_CACHE_DIR; by default /tmp/torchinductor_<user>): a graph compiled once is warm for the
# rest of the check and for a rerun of the headline.
# Settings (environment): GPU_CHECK_SCALE multiplies every limit (default 1 on a GPU, 3 in the dry run: e.g. 2 on a
# slower GPU); GPU_CHECK_GRACE is the grace in seconds (default 5).
#
# Without a CUDA device it is a dry run at small sizes (32 px demo images, 2 timed steps, limits x3): every stage
# starts, takes its success path and writes its files (minutes on a CPU), so a GPU session never meets a check that
# does not start.
set -u
case "${1:-}" in
  -h|--help) sed -n '2,/^set -u$/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
  -*) echo "gpu_check.sh: error: unknown option $1: the one argument is OUT_DIR (--help says more)" >&2; exit 2 ;;
esac
OUT=${1:?usage: ./gpu_check.sh OUT_DIR}
if [ -e "$OUT" ] && { [ ! -d "$OUT" ] || [ -n "$(ls -A "$OUT")" ]; }; then
  echo "gpu_check.sh: error: OUT_DIR $OUT is not a new or empty folder: choose another (the check appends)" >&2
  exit 2
fi
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$(dirname "$0")" || exit 2
BUDGET=540                # seconds: the stage limits below plus GRACE each, at GPU_CHECK_SCALE 1
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CUDAGRAPH_OR_ERROR=1   # a CUDA-graph skip is an error wherever a compile mode asks for graphs
trap 'echo "gpu_check.sh: stopped"; exit 143' TERM
trap 'echo "gpu_check.sh: interrupted"; exit 130' INT

# The stage runner: `stage NAME LIMIT COMMAND...` runs COMMAND (output to the terminal and check.log) and appends
# its line to stages.jsonl. It is a child subreaper, so every process the stage starts stays below it, whatever
# process group or session it moves to (torchrun's workers start sessions of their own, inductor's compile workers
# watch their parent only once a minute): at the limit all of them get SIGTERM, then SIGKILL after the grace.
read -r -d '' RUNNER <<'PY'
import ctypes, json, os, signal, subprocess, sys, threading, time
out, name, limit, command = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]
limit *= float(os.environ.get('GPU_CHECK_SCALE', 1))
grace = float(os.environ.get('GPU_CHECK_GRACE', 5))
libc = ctypes.CDLL(None)
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: what the stage orphans is re-parented here, not to init


def tree():
    """The live processes below this runner, however deep."""
    children = {}
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            state, ppid = open(f'/proc/{entry}/stat').read().rsplit(')', 1)[1].split()[:2]
        except (OSError, ValueError):
            continue  # ended meanwhile
        if state != 'Z':
            children.setdefault(int(ppid), []).append(int(entry))
    found, todo = [], [os.getpid()]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def signal_all(sig):
    pids = tree()
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids


def stop(signum, frame):
    raise KeyboardInterrupt


signal.signal(signal.SIGTERM, stop)
log = open(os.path.join(out, 'check.log'), 'ab')


def say(data):
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    log.write(data)
    log.flush()


say(f"== {name}: limit {limit:g} s: {' '.join(command)}\n".encode())
t0 = time.monotonic()
stopped = killed = interrupted = False
try:
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             preexec_fn=lambda: libc.prctl(1, signal.SIGKILL, 0, 0, 0))  # it dies with this runner
except OSError as e:
    child = None
    say(f"cannot start: {e}\n".encode())


def copy_output():
    for chunk in iter(lambda: os.read(child.stdout.fileno(), 65536), b''):
        say(chunk)


reader = threading.Thread(target=copy_output, daemon=True)
if child:
    reader.start()
ended = set()
try:
    try:
        if child:
            child.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        stopped = True
        signal_all(signal.SIGTERM)
        try:
            child.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            killed = True
except KeyboardInterrupt:
    interrupted = True
finally:
    deadline = time.monotonic() + 5  # (a process stuck in the kernel cannot be killed: it is reported, not waited for)
    while time.monotonic() < deadline:  # SIGKILL to all that is left below, until nothing is
        pids = signal_all(signal.SIGKILL)
        if not pids:
            break
        ended.update(pids)
        time.sleep(0.05)
code = 127
if child:
    try:
        code = child.wait(timeout=1)
    except subprocess.TimeoutExpired:
        code = None
    reader.join(timeout=1)
seconds = time.monotonic() - t0
record = dict(stage=name, limit_s=limit, seconds=round(seconds, 1), exit=code, stopped_at_limit=stopped,
              killed=killed, processes_killed=len(ended), interrupted=interrupted)
with open(os.path.join(out, 'stages.jsonl'), 'a') as f:
    f.write(json.dumps(record) + '\n')
say((f"== {name}: " + (f"stopped at its {limit:g} s limit" + (f", killed {grace:g} s later" if killed else "")
     if stopped else f"exit {code}") + f" after {seconds:.1f} s"
     + (f"; {len(ended)} process(es) ended" if ended else "") + "\n").encode())
sys.exit(130 if interrupted else 124 if stopped else 0 if code == 0 else 1)
PY
stage() {
  python3 -c "$RUNNER" "$OUT" "$@"
  [ $? -eq 130 ] && { echo "gpu_check.sh: interrupted"; exit 130; }
  return 0
}

if timeout -k 5 60 python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  export GPU_CHECK_SCALE=${GPU_CHECK_SCALE:-1}
  SIZE=(--steps 100 --warmup 20)
  HEAD=128 RANK=64 BIG=1024 HEAD_STEPS=200 PROFILE_STEPS=10
else
  export GPU_CHECK_SCALE=${GPU_CHECK_SCALE:-3}
  echo "no CUDA device: a dry run at small sizes, to check that every stage starts and writes its files"
  SIZE=(--device cpu --dataset demo --img_size 32 --patch_size 8 --steps 2 --warmup 1)
  HEAD=32 RANK=16 BIG=64 HEAD_STEPS=2 PROFILE_STEPS=3
fi
SCALE=$GPU_CHECK_SCALE
echo "gpu check into $OUT: budget $BUDGET s x GPU_CHECK_SCALE $SCALE"
BENCH=(python3 bench.py --out_dir "$OUT" "${SIZE[@]}")
EACH=$(awk -v s="$SCALE" 'BEGIN { t = int(40 * s); print (t < 1 ? 1 : t) }')  # seconds for each figure of `others`

# stage NAME            LIMIT COMMAND
stage env                  10 python3 - "$OUT" <<'PY'
import json, os, shutil, subprocess, sys, torch
try:  # the compile cache every stage shares
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    cache = cache_dir()
except ImportError:  # (where this torch keeps it elsewhere)
    cache = os.environ.get('TORCHINDUCTOR_CACHE_DIR')
query = '--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu'
smi = subprocess.run(['nvidia-smi', query, '--format=csv,noheader'], capture_output=True, text=True).stdout.strip() \
    if shutil.which('nvidia-smi') else None
env = dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None, torch=torch.__version__,
           cuda=torch.version.cuda, python=sys.version.split()[0], nvidia_smi=smi,
           compile_cache=cache, cache_warm=bool(cache and os.path.isdir(cache) and os.listdir(cache)))
json.dump(env, open(os.path.join(sys.argv[1], 'env.json'), 'w'), indent=1)
print(env)
PY
stage headline             85 "${BENCH[@]}" --figures mae --batch_sizes $HEAD --steps $HEAD_STEPS
stage rank64_default       55 "${BENCH[@]}" --figures mae --batch_sizes $RANK --compile_mode default
stage rank64_graphs        40 "${BENCH[@]}" --figures mae --batch_sizes $RANK
stage eager                25 "${BENCH[@]}" --figures mae --batch_sizes $HEAD --compile false
stage tests               110 env GPU_CHECK_OUT="$OUT" GPU_DRY_RUN=1 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_ddp.py tests/test_gpu.py
stage batch1024            40 "${BENCH[@]}" --figures mae --batch_sizes $BIG
stage others               80 "${BENCH[@]}" --figures smae,finetune,dino,loader,peer --batch_sizes $HEAD \
                                --process_timeout $EACH
stage profile              35 "${BENCH[@]}" --only profile --batch_sizes $HEAD --steps $PROFILE_STEPS
stage summary              10 python3 bench.py --only summary --out_dir "$OUT"
echo "gpu check done: $OUT/summary.md"
