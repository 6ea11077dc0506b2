"""Cost per crop of the re-identification embedders: FLOPs (torch.utils.flop_counter, one crop at
the model's input size, on the meta device: no weights needed) and CPU crops/s (random weights of
the real architecture: speed does not depend on the weight values).

    PYTHONPATH=. python bench/reid_backbones.py [NAME ...] [--crops N] [--threads N]

NAME: trained, miewid, megadescriptor, dinov2 (default: all). Prints one JSON object per model.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from deer_pipeline.embedding import backbones, trained_model

    p = argparse.ArgumentParser()
    p.add_argument("names", nargs="*", default=["trained", *backbones.NAMES])
    p.add_argument("--crops", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.names:
        if name == "trained":
            net = trained_model.build_embedder(512, 11, body=trained_model.lite0_module()).eval()
            size = trained_model.INPUT_SIZE
            x1 = torch.zeros((1, 3, size, size), dtype=torch.uint8)
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                net(x1)
            gflops, params = fc.get_total_flops() / 1e9, sum(q.numel() for q in net.parameters())
        else:
            b = backbones.BACKBONES[name]
            with torch.device("meta"):
                meta = backbones.build_architecture(name, tiny=False).eval()
                xm = torch.zeros(1, 3, b.input_size, b.input_size)
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                meta(xm)
            gflops, params = fc.get_total_flops() / 1e9, sum(q.numel() for q in meta.parameters())
            body = backbones.build_architecture(name, tiny=False).eval()
            net = backbones.make_net(name, body, b.input_size, b.mean, b.std).eval()
            size = b.input_size
        x = torch.randint(0, 256, (args.crops, 3, 224, 224), dtype=torch.uint8)
        with torch.inference_mode():
            net(x[:1])                                        # warm-up
            t, c = time.perf_counter(), time.process_time()
            net(x)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
        print(json.dumps({"model": name, "input_px": size, "gflops_per_crop": round(gflops, 2),
                          "params_millions": round(params / 1e6, 1),
                          "cpu_crops_per_s": round(args.crops / wall, 3),
                          "cpu_seconds_per_crop": round(cpu / args.crops, 2),
                          "threads": args.threads, "load_average_1min": round(os.getloadavg()[0], 1)}), flush=True)


if __name__ == "__main__":
    main()
