#!/usr/bin/env bash
# The exact recipe that produced the committed predictor bundles of the reference models.
# Trajectories go to runs/ (never committed); bundles to lesa_models/weights/<model>/predictors/.
# Usage: scripts/train_reference_bundles.sh digits-image|digits-video [levels...]
set -euo pipefail
model=${1:?usage: $0 digits-image|digits-video [levels...]}
shift
levels=${*:-"5x 6.25x 3.3x 2x"}
lesa=${LESA:-.venv/bin/lesa}
data=runs/trajectories-$model
seeds=$([ "$model" = digits-video ] && echo 0-47 || echo 0-63)
out=lesa_models/weights/$model/predictors

# KAN widths 64,64 instead of the paper's 256,256: the KAN maps the schedule to one gain per step, and
# 64 keeps a shared-expert bundle under 1 MB, a per-branch one under 2 MB (256 would be ~9.5 MB per expert set).
# Training seeds 0-63 (0-255 for digits-image 6.25x); the benchmark's held-out seeds start at 1000.
$lesa record --model "$model" --prompts "prompts/$model-train.txt" --seeds "$seeds" --steps 50 --out "$data"

for level in $levels; do
  # Teacher-forced + closed-loop epochs. digits-image 2x-5x: 300 + 6 (the stage experts' weights are still moving
  # after 40: 5x held-out MSE 1.33e-3 -> 6.4e-4, see benchmarks/results/digits-image/variants-5x); digits-video
  # 6.25x: 20 + 12 (on the first video model the 40 + 6 run never beat its untrained start on held-out samples);
  # digits-image 6.25x: 40 + 1 (on the 256 trajectories every member's best two-phase epoch was the first closed-
  # loop one; phase 3 starts from that best, so the 5 later epochs cost 2 min a member and changed nothing);
  # every other bundle: 40 + 6.
  case "$model:$level" in
    digits-image:2x | digits-image:3.3x | digits-image:5x) p1=300 p2=6 ;;
    digits-video:6.25x) p1=20 p2=12 ;;
    digits-image:6.25x) p1=40 p2=1 ;;
    *) p1=40 p2=6 ;;
  esac
  # digits-image 6.25x: 256 trajectories (cond / uncond experts on them: +1 dB over shared experts on 64, and
  # the only variant that beat reuse there; at 2x-3.3x it was within 0.2 dB either way: see
  # benchmarks/results/digits-image/variants-per-branch).
  level_data=$data
  if [ "$model:$level" = "digits-image:6.25x" ]; then
    level_data=$data-256
    $lesa record --model "$model" --prompts "prompts/$model-train.txt" --seeds 0-255 --steps 50 --out "$level_data"
  fi
  # digits-image 5x / 6.25x: then phase 3 (ours): the final sample's MSE backpropagated through the whole
  # sampler, as a fine-tune of the two-phase bundle (--init; each run keeps its best epoch on held-out
  # trajectories). 5x: 12 epochs in batches of 4 at 3e-4 (as good on validation seeds as the earlier
  # 30 + 60 epochs in batches of 16 at 2e-4, in a third of the time); 6.25x: 3 such epochs on the 256
  # trajectories (the earlier 15 in batches of 16 were 0.26 dB better on validation seeds, in 3x the time).
  tune_flags=()
  case "$model:$level" in
    digits-image:5x) p3=0 tune=12 tune_flags=(--phase3-batch-size 4 --phase3-lr 3e-4) ;;
    digits-image:6.25x) p3=0 tune=3 tune_flags=(--phase3-batch-size 4 --phase3-lr 3e-4) ;;
    *) p3=0 tune=0 ;;
  esac
  # digits-image 5x / 6.25x: an ensemble (ours) of three members trained the same way but for shared
  # experts, cond / uncond experts, and cond / uncond experts with per-channel history weights; the
  # forecast is their mean, at the cost of one predictor (lesa_core/ensemble.py). On 128 / 512 validation
  # seeds, TaylorSeer's MSE x 0.41 / 0.44 at 5x (per-branch alone 0.46 / 0.50), x 0.19 / 0.21 at 6.25x
  # (0.24 / 0.26): benchmarks/results/digits-image/validation. Phase 3 on the 256 trajectories takes
  # ~14 GB of memory: train the 6.25x members one at a time on a 24 GB machine.
  members=("")
  case "$model:$level" in
    digits-image:5x | digits-image:6.25x)
      members=("shared" "per-branch:--per-branch" "channel:--per-branch --history-weights channel") ;;
  esac
  extra=()
  assembled=()
  for member in "${members[@]}"; do
    name=${member%%:*} member_extra=()
    if [ -n "$member" ]; then
      [ "$name" = "$member" ] || read -r -a member_extra <<< "${member#*:}"
      final=runs/work/$model/$level-members/$name
      assembled+=("$name=$final")
    else
      final=$out/$level
    fi
    first=$final
    if [ "$tune" -gt 0 ]; then first=runs/work/$model/$level-two-phase${name:+-$name}; fi
    # The paper's predictor (base = h_-1); phase 2 (closed loop) is where it learns the most.
    $lesa train-predictor --model "$model" --data "$level_data" --level "$level" --steps 50 \
      --phase1-epochs $p1 --phase2-epochs $p2 --phase3-epochs $p3 --phase2-updates 8 --train-tokens 16 \
      --kan-hidden 64,64 --base last "${extra[@]}" "${member_extra[@]}" --out "$first" --work-dir "runs/work/$model/$level${name:+-$name}"
    if [ "$tune" -gt 0 ]; then
      $lesa train-predictor --model "$model" --data "$level_data" --level "$level" --steps 50 --init "$first" \
        --phase1-epochs 0 --phase2-epochs 0 --phase3-epochs $tune --kan-hidden 64,64 --base last "${extra[@]}" \
        "${member_extra[@]}" "${tune_flags[@]}" --out "$final" --work-dir "runs/work/$model/$level${name:+-$name}-tune"
    fi
  done
  if [ ${#assembled[@]} -gt 0 ]; then
    rm -rf "${out:?}/$level"
    $lesa ensemble-predictors --out "$out/$level" "${assembled[@]}"
  fi
done
