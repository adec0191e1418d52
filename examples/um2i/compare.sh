#!/usr/bin/env bash
# The paper's comparison (Table I, Fig. 5): M2I vs UM2I vs V2UM2I on one dataset, one command each,
# then one report over the three synthetic sets.
#
#   examples/um2i/compare.sh                     # the embedded demo set, CPU scale
#   DATA=data/covid-montages N=1000 TRAIN="--size 1024 --ngf 64 --down 4 --residual 9 --ndf 64 \
#     --d-layers 3 --supervised-steps 20000 --semi-steps 20000 --vum-steps 100000 --vum-channels 32 \
#     --vum-max-channels 512 --vum-latent 512 --vum-mapping-layers 8 --vgg-weights vgg19.pth" \
#     examples/um2i/compare.sh                   # paper scale, on a GPU
set -euo pipefail
DATA=${DATA:-data/demo}
RUNS=${RUNS:-runs}
N=${N:-64}
FRACTION=${FRACTION:-0.75}
TRAIN=${TRAIN:-}
EVALUATORS=${EVALUATORS:-mm-fid mm-std avg-image-jpeg intensity-kl utility mask-stats}
HERE=$(dirname "$0")

if [ "$DATA" = data/demo ] && [ ! -d data/demo ]; then medsynth demo-data data/demo --size 64 -n 16; fi
# --resume finishes an interrupted training and returns at once after a finished one
medsynth train um2i --resume --data "$DATA" --out "$RUNS/um2i-train" --labelled-fraction "$FRACTION" $TRAIN
medsynth train um2i --resume --condition mask --vum-steps 0 --data "$DATA" --out "$RUNS/m2i-train" \
    --labelled-fraction "$FRACTION" $TRAIN

for method in m2i um2i v2um2i; do
  medsynth run "$HERE/$method.toml" --resume --data "$DATA" --out "$RUNS/$method" -n "$N" \
    --checkpoint "$RUNS/$([ $method = m2i ] && echo m2i || echo um2i)-train" \
    $([ $method = v2um2i ] && echo --set mask_source.checkpoint="$RUNS/um2i-train")
done

medsynth evaluate --real "$DATA" --synthetic "$RUNS/m2i" --synthetic "$RUNS/um2i" --synthetic "$RUNS/v2um2i" \
  $(for e in $EVALUATORS; do echo --evaluator "$e"; done) --out "$RUNS/um2i-compare"
echo "report: $RUNS/um2i-compare/report.md"
