#!/usr/bin/env bash
# Re-run every command whose output is a CPU table of the current sections of
# bench/RESULTS.md (§8-§14; §1-§7 are the pre-linearisation record at commit f3f7f82 and
# are not regenerated). Each command is the one written beside its table; outputs go to
# OUT (default bench/regenerated/), one file per command. On 2 cores this takes about
# 5 hours (the S = 1000 rows and the calibration dominate); time only on a quiet machine.
#
#   bash bench/regenerate_cpu.sh            # everything
#   bash bench/regenerate_cpu.sh peers,round   # only these steps (names below)
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
out="${OUT:-bench/regenerated}"
mkdir -p "$out" /tmp/cal
only="${1:-}"
failed=0

step() {   # step NAME CMD...: run CMD in bench/ (as RESULTS.md writes it), output to OUT/NAME.md
  local name="$1"; shift
  if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then return 0; fi
  echo "== $name: $*"
  if (cd bench && "$@") > "$out/$name.md" 2> "$out/$name.log"; then
    echo "   ok -> $out/$name.md"
  else
    echo "   FAILED (exit $?), see $out/$name.log"; failed=1
  fi
}

step rounds_20_100     python bundled_rounds.py --steps 20,100 --linearize secant,none       # §8
step rounds_1000       python bundled_rounds.py --steps 1000 --chains DDIM,DDPM,DDRM-inp,DDNM-sr2,DDNM-inp,DDNM+-sr2 --hindsight
step rounds_photo16    python bundled_rounds.py --model photo16 --steps 20,100
step rounds_photo16_1000 python bundled_rounds.py --model photo16 --steps 1000 --chains DDNM-sr2 --hindsight
step rounds_hindsight  python bundled_rounds.py --steps 100 --hindsight                      # §8, session 4
step rounds_window     python bundled_rounds.py --steps 100 --window 20                      # §8, §3c
step rounds_window_copy python bundled_rounds.py --steps 100 --window 20 --enter copy
step calibrate_gmm     python calibrate.py record --models gmm --seeds 100 --out /tmp/cal/gmm.json
step calibrate_unet    python calibrate.py record --models bundled,photo16 --steps 20,100 --images 2 \
                         --max-iter 60 --out /tmp/cal/unet.json
step calibrate_replay  python calibrate.py replay /tmp/cal/unet.json /tmp/cal/gmm.json \
                         --tols 0.003,0.01,0.02,0.03,0.1 --floors 0.1,0.3,1
step probes_init       python probes.py init                                                 # §8, probes
step probes_bands      python probes.py bands
step probes_secant     python probes.py secant
step probes_stop       python probes.py stop
step probes_trace      python probes.py stop --trace DDNM-sr2
step readme_sweep      python readme_sweep.py --seeds 300                                    # §8, the promise
step readme_eta0       python readme_sweep.py --kinds DDNM,DDIM --eta0 --seeds 100            # §8 session 5, the shadow
step readme_eta0_w20   python readme_sweep.py --kinds DDNM,DDIM --eta0 --seeds 50 --window 20
for t in 1e-2 1e-3 1e-4 1e-5 1e-6; do
  step readme_noshadow_$t python readme_sweep.py --kinds DDNM --eta0 --seeds 20 --no-shadow --tol $t
done
for n in 20 50 200; do
  step readme_eta0_s$n python readme_sweep.py --kinds DDNM --eta0 --seeds 10 --steps $n
  step readme_eta0_s${n}_noshadow python readme_sweep.py --kinds DDNM --eta0 --seeds 10 --steps $n --no-shadow
done
step peers             python peers.py                                                       # §9
step gradients_cost    python gradients.py cost --steps 100,1000                             # §10
step sharding          python sharding.py                                                    # §12
step round             python round.py --solver-round                                        # §13
step round_memory      python round.py --memory
step bench_harness     python results.py                                                     # §14
exit "$failed"
