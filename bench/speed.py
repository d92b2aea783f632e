#!/usr/bin/env python3
"""Generation-speed benchmark (hybrid vs same-shape attention model vs transformers' static-cache generate).
A thin entry point over components/evaluate/speed.py, runnable without installing the project (torch,
transformers, safetensors, tqdm, numpy and matplotlib suffice), e.g. on a GPU machine:

    python3 bench/speed.py --device cuda --shape llama-3.2-3b --batch 1,16,64,128,256 \
        --prompt-len 256 --decode-len 512,4096 --out docs/results/speed/llama-3.2-3b-h100
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from components.evaluate.speed_cli import main

if __name__ == "__main__":
    sys.exit(main())
