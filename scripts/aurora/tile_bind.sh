#!/bin/bash
# One Intel Max 1550 tile per MPI rank (Aurora: 6 GPUs x 2 tiles = 12 ranks per node).
# ZE_FLAT_DEVICE_HIERARCHY=FLAT exposes the 12 tiles as Level Zero devices 0..11; PALS numbers the
# ranks of a node 0..11, so rank i sees only tile i (as its device 0).
# NOT RUN by this project (no Aurora access here); see scripts/aurora/launch.py.
export ZE_FLAT_DEVICE_HIERARCHY=FLAT
export ZE_AFFINITY_MASK="${PALS_LOCAL_RANKID:?tile_bind.sh runs under mpiexec (PALS sets PALS_LOCAL_RANKID)}"
exec "$@"
