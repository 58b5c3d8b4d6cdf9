#!/usr/bin/env bash
# Submit the sharded tokenization (array job) and the merge that waits for it, in one command.
#
#   slurm/submit_preprocess.sh --shards 32 --output-prefix /data/corpus [--log-dir logs] \
#       [--sbatch "--partition=cpu --time=4:00:00"] -- \
#       --input /raw/*.jsonl --tokenizer-model tok.model --append-eod --workers 8
#
# Everything after -- goes to tools/preprocess_data.py. Job logs go to --log-dir (default: the
# current directory) as megatrain-preprocess-ARRAY_TASK.out and megatrain-merge-ID.out. Prints the two job ids
# ("ARRAY_ID MERGE_ID") on the last line; watch them with `squeue -j ARRAY_ID,MERGE_ID`.
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

SHARDS="" PREFIX="" LOG_DIR=. EXTRA=()
while (($#)); do
  case $1 in
    --shards) SHARDS=${2:-}; shift 2 ;;
    --output-prefix) PREFIX=${2:-}; shift 2 ;;
    --log-dir) LOG_DIR=${2:-}; shift 2 ;;
    --sbatch) read -r -a EXTRA <<<"${2:-}"; shift 2 ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
[[ $SHARDS =~ ^[0-9]+$ ]] && ((SHARDS > 0)) || { echo "submit_preprocess: --shards N (N >= 1) is required" >&2; exit 2; }
[[ -n $PREFIX ]] || { echo "submit_preprocess: --output-prefix PREFIX is required" >&2; exit 2; }
(($#)) || { echo "submit_preprocess: give tools/preprocess_data.py's arguments after --" >&2; exit 2; }
PREFIX=$(realpath -m "$PREFIX")  # the jobs may start in another directory
SCRIPT=$(dirname "$(realpath "$0")")/preprocess.sbatch
export MEGATRAIN_HOME=${MEGATRAIN_HOME:-$(dirname "$(dirname "$(realpath "$0")")")}
LOG_DIR=$(realpath -m "$LOG_DIR")
mkdir -p "$(dirname "$PREFIX")" "$LOG_DIR"

ARRAY_ID=$(sbatch --parsable --output="$LOG_DIR/%x-%A_%a.out" "${EXTRA[@]}" --array="0-$((SHARDS - 1))" \
  "$SCRIPT" shard "$PREFIX" "$@")
ARRAY_ID=${ARRAY_ID%%;*}
MERGE_ID=$(sbatch --parsable "${EXTRA[@]}" --dependency="afterok:${ARRAY_ID}" --kill-on-invalid-dep=yes \
  --job-name=megatrain-merge --output="$LOG_DIR/%x-%j.out" "$SCRIPT" merge "$PREFIX" "$SHARDS" "$@")
MERGE_ID=${MERGE_ID%%;*}
echo "submitted: tokenize ${SHARDS} shards as array job ${ARRAY_ID}; merge into ${PREFIX} as job ${MERGE_ID} (after ${ARRAY_ID} succeeds)"
echo "${ARRAY_ID} ${MERGE_ID}"
