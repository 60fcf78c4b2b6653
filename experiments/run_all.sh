#!/usr/bin/env bash
# The runs behind docs/results.md, one process at a time, from the repository root:
#   bash experiments/run_all.sh [OUT]      (default OUT: outputs/experiments)
# Budgets are optimizer steps: 600 for the translation model, 500 for the LM (each script's --steps).
# Models are cached under OUT/cache, so the three findings share the seed-0 baselines.
# gradient_vs_random.py, where_fragile.py and converged.py write run records under experiments/results/
# (a run whose record exists is skipped); summarize.py --write-docs regenerates docs/results.md's tables from them.
set -euo pipefail
OUT=${OUT:-${1:-outputs/experiments}}
DATA=${DATA:-../shared/data}
export OMP_NUM_THREADS=1
COMMON=(--data "$DATA" --cache "$OUT/cache" --threads 1)
DE_EN=(--tasks de_en --steps 600)
LM=(--tasks lm --steps 500)

python experiments/gradient_vs_random.py "${COMMON[@]}" "${DE_EN[@]}"
python experiments/gradient_vs_random.py "${COMMON[@]}" "${LM[@]}"
python experiments/where_fragile.py "${COMMON[@]}" "${DE_EN[@]}"
python experiments/where_fragile.py "${COMMON[@]}" "${LM[@]}"
# Table 2: 3 seeds of baseline and ACR, plus amortized ACR (interval 2) on the LM; no sweep here.
python experiments/acr_training.py "${COMMON[@]}" "${LM[@]}" --sweep-eps --sweep-alpha --out "$OUT/acr_training/lm"
python experiments/acr_training.py "${COMMON[@]}" "${DE_EN[@]}" --intervals --sweep-eps --sweep-alpha --out "$OUT/acr_training/de_en"
# The eps / alpha sweep on the LM (seed 0; the baseline and ACR eps=0.1 runs come from the cache).
python experiments/acr_training.py "${COMMON[@]}" "${LM[@]}" --num-seeds 1 --intervals --out "$OUT/acr_training/lm_sweep"
# Finding 3 at convergence, three families (hours each; resumable, commits nothing unless given --commit;
# several workers may run the same command at once and split the runs, one per core).
for family in lstm gpt2 marian; do
    python experiments/converged.py "${COMMON[@]}" --family "$family"
done
python experiments/summarize.py --write-docs
