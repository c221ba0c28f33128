set -x
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
t0=$(date +%s)
timeout 200 python3 -m pip install --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3
echo "pip build: $(( $(date +%s) - t0 ))s"; cat deqir_fast/_native_build.json
export PYTHONPATH=$(pwd):/tmp/site
for tf in 1 0; do
timeout 100 python3 -c "
import torch, runpy, sys
tf = bool($tf)
torch.backends.cudnn.allow_tf32 = tf; torch.backends.cuda.matmul.allow_tf32 = tf
print('TF32', tf)
sys.argv = ['deqir-fast', 'bench', '--device', 'cuda', '--model', 'bundled', '--chains', 'DDIM,DDPM', '--steps', '100', '--batch', '1,8', '--peers', 'deqir_fast,ParaTAA', '--repeats', '1', '--no-loops', '--quiet', '--no-plots', '--out', '/tmp/tf$tf']
try:
    runpy.run_module('deqir_fast', run_name='__main__')
except SystemExit as e:
    print('exit', e.code)
" 2>&1 | grep -E "^\| DDI|^\| DDP|TF32|exit"
cp /tmp/tf$tf/bench.md $OUT/tf$tf.md
done
