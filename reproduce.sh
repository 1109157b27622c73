#!/usr/bin/env bash
# The whole study, every run of the paper as a step, up to JOBS steps at once (one per GPU, round-robin), with a
# live table of the steps, a log per step, resume after any stop, and <OUT>/RESULTS.md beside the study's numbers.
#
#   ./reproduce.sh [full|quick] [STEP ...]    the full study (default), or quick: the same path on the demo data
#   ./reproduce.sh [full|quick] --list        every step: what it needs and its command
#   ./reproduce.sh --help                     the usage and the settings: OUT, LAUNCH, JOBS, RATIOS, VARIANTS, DATA_DIR
#
# The steps, their commands and the scheduler are in reproduce.py, which this runs.
cd "$(dirname "$0")" && exec python3 reproduce.py "$@"
