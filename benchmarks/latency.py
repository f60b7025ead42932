"""Measured speed-up of exported models: ResNet-20, ResNet-50, LeNet-300-100; eager, prepared eager, compiled, ONNX Runtime.

    python benchmarks/latency.py [--models resnet20,resnet50,lenet300] [--levels 0.6,0.45,0.35] [--batches 1,32]
                                 [--threads 2] [--quick]

The same as `svdtrain bench latency`. Writes benchmarks/results/latency.json and the
"latency" section of RESULTS.md.
"""

import sys

from svdtrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "latency", *sys.argv[1:]]))
