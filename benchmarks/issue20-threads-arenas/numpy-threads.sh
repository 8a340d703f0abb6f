#!/bin/sh
# Threads of a fresh interpreter after `import numpy` (OpenBLAS starts its pool at load),
# by CPUs allowed (taskset) and the variables job_threads sets.
PY=${PY:-.venv/bin/python}
probe='import os, numpy; print(len(os.listdir("/proc/self/task")))'
for cpus in 0 0-1; do
  for var in "" OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=2 OPENBLAS_NUM_THREADS=16; do
    n=$(env $var taskset -c $cpus $PY -c "$probe")
    echo "cpus=$cpus ${var:-no-variable} threads=$n"
  done
done
