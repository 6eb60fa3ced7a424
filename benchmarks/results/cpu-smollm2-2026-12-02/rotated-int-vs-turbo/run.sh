#!/bin/bash
. /work/main/.venv/bin/activate; export PYTHONPATH=/work/wt-quality OMP_NUM_THREADS=1; cd /work/wt-quality
C="--residual 16 --sinks 1 --block 16 --windows 2 --no-progress"
run() { name=$1; shift; s=$(date +%s.%N); kvpack eval "$@" $C --json q/$name.json > q/$name.log 2>&1; rc=$?; e=$(date +%s.%N); echo "$name rc=$rc wall=$(echo "$e - $s" | bc)" >> q/times.txt; }
run ki4ref --key int:4 --value none
for B in 4 3 2; do
  run kt$B --key turbo_mse:$B --value none
  run ki$B --key int:$B:rotation=hadamard --value none
  run vt$B --key none --value turbo_mse:$B
  run vi$B --key none --value int:$B:rotation=hadamard
done
echo DONE >> q/times.txt
