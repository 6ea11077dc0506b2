"""Embedding throughput: crops/s per model and for the ensemble at several batch sizes, next to
the per-crop loop of the system we start from (three networks per crop, batch 1), in one run.

    .venv/bin/python bench/embeddings.py                      # CPU, a few crops (~3-5 min on 2 cores)
    .venv/bin/python bench/embeddings.py --device cuda --crops 512

Throughput does not depend on the weights' values, so the ResNet50 / EfficientNet-B0 rows run the
real architectures with seeded random weights (``random-test-only``, enabled here for timing
only); the ``auto`` rows run what the pipeline runs on a machine without ImageNet ResNet50/B0
weights (EfficientNet-Lite0 substitutes, one shared backbone pass for both ensemble members).
Times include JPEG decode + resize (DataLoader workers) and the host<->device copies, not model
loading (each configuration is warmed up first).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DEER_ALLOW_RANDOM_WEIGHTS", "1")   # timing only: see the docstring

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deer_pipeline.embedding.inference import CropItem, InferenceEngine  # noqa: E402

NYALA = REPO.parent / "shared" / "data" / "nyala-dev" / "images"

CONFIGS = [
    # label, models, weights
    ("resnet50", ["resnet50"], "random-test-only"),
    ("multiscale", ["multiscale"], "random-test-only"),
    ("efficientnet_b0", ["efficientnet_b0"], "random-test-only"),
    ("efficientnet_lite0", ["efficientnet_lite0"], "auto"),
    ("ensemble (multiscale+b0)", ["multiscale", "efficientnet_b0"], "random-test-only"),
    ("ensemble auto (Lite0 shared)", ["multiscale", "efficientnet_b0"], "auto"),
    # what the pipeline runs by default: each crop and two centred zooms (settings.CROP_ZOOMS)
    ("ensemble auto, zooms 1/0.9/0.8", ["multiscale", "efficientnet_b0"], "auto", (1.0, 0.9, 0.8)),
]


def crop_files(n: int) -> list[Path]:
    files = sorted(NYALA.glob("*/*.jpg"))[:n] if NYALA.exists() else []
    if len(files) < n:   # synthetic crops when the nyala photos are not there
        from PIL import Image

        d = Path(tempfile.mkdtemp(prefix="bench-crops-"))
        rng = np.random.default_rng(0)
        for i in range(n - len(files)):
            p = d / f"c{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (300, 380, 3), dtype=np.uint8)).save(p, quality=90)
            files.append(p)
    return files


def old_system_loop(files: list[Path], device: str) -> float:
    """The system we start from: per crop, three separately held networks at batch 1, each with
    an untrained Linear projection made at start-up (multiscale concatenates avgpool on top of
    layer4, counting it twice). Returns crops/s."""
    import torchvision.models as tvm
    import torchvision.transforms as T
    from PIL import Image

    torch.manual_seed(0)
    r50 = tvm.resnet50(weights=None).eval().to(device)
    ms = tvm.resnet50(weights=None).eval().to(device)
    b0 = tvm.efficientnet_b0(weights=None).eval().to(device)
    proj_r50 = torch.nn.Linear(2048, 512).to(device)
    proj_ms = torch.nn.Linear(512 + 1024 + 2048 + 2048, 512).to(device)
    proj_b0 = torch.nn.Linear(1280, 512).to(device)
    feats = {}
    for name in ("layer2", "layer3", "layer4", "avgpool"):
        getattr(ms, name).register_forward_hook(lambda m, i, o, name=name: feats.__setitem__(name, o))
    tf = T.Compose([T.Resize((224, 224)), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def one(path):
        x = tf(Image.open(path).convert("RGB")).unsqueeze(0).to(device)
        with torch.no_grad():
            r50.fc = torch.nn.Identity()
            a = proj_r50(r50(x))   # pooled 2048
            ms(x)
            pooled = [torch.flatten(torch.nn.functional.adaptive_avg_pool2d(feats[k], 1), 1)
                      for k in ("layer2", "layer3", "layer4")] + [torch.flatten(feats["avgpool"], 1)]
            b = proj_ms(torch.cat(pooled, 1))
            c = proj_b0(torch.flatten(b0.avgpool(b0.features(x)), 1))   # pooled 1280
        return [torch.nn.functional.normalize(v, dim=1).cpu() for v in (a, b, c)]

    one(files[0])   # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for f in files:
        one(f)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(files) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--crops", type=int, default=None,
                    help="crops per measurement (at least the batch size); default 16 on CPU, 512 on CUDA")
    ap.add_argument("--old-crops", type=int, default=None, help="crops for the old loop (default = --crops)")
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--configs", default=None, help="semicolon list of config labels to run (default all)")
    ap.add_argument("--num-workers", type=int, default=None)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    n_crops = args.crops or (512 if cuda else 16)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    files = crop_files(max([n_crops, *batch_sizes]))
    configs = [c for c in CONFIGS if not args.configs or c[0] in args.configs.split(";")]

    print(f"# embeddings benchmark  {dt.datetime.now().isoformat(timespec='seconds')}")
    gpu = torch.cuda.get_device_name(0) if cuda else "-"
    print(f"# machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {args.device} ({gpu}), load avg {os.getloadavg()[0]:.1f}")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"# crops: {'nyala photos' if NYALA.exists() else 'synthetic'}, "
          f"{n_crops} per measurement (or the batch size if larger)")
    rows = []
    for label, models, weights, *zooms in configs:
        cells = []
        passes = None
        for bs in batch_sizes:
            engine = InferenceEngine(models, weights=weights, device=args.device, batch_size=bs,
                                     num_workers=args.num_workers, zooms=zooms[0] if zooms else (1.0,))
            passes = engine.n_backbone_passes
            n = max(n_crops, bs)
            items = [CropItem(str(f), str(f)) for f in files[:n]]
            engine.embed(items[:min(bs, 4)])   # load + warm-up
            if cuda:
                torch.cuda.synchronize()
            res = engine.embed(items)
            if cuda:
                torch.cuda.synchronize()
            cells.append(res.crops_per_s)
            print(f"  {label:<30} bs={bs:<3} {res.crops_per_s:8.1f} crops/s  ({n} crops, {res.seconds:.1f} s)",
                  flush=True)
        rows.append((label, weights, passes, cells))
    old_n = args.old_crops or n_crops
    old = old_system_loop(files[:old_n], args.device)
    print(f"  {'old system loop':<30} bs=1   {old:8.1f} crops/s  ({old_n} crops)", flush=True)

    head = "| configuration | weights | backbone passes/crop | " + " | ".join(f"bs={b}" for b in batch_sizes) + \
        " | best vs old loop |"
    print()
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for label, weights, passes, cells in rows:
        best = max(cells)
        print(f"| {label} | {weights} | {passes} | " + " | ".join(f"{c:.1f}" for c in cells)
              + f" | x{best / old:.1f} |")
    print("| old system loop (3 networks/crop, batch 1) | random | 3 | "
          + " | ".join([f"{old:.1f}"] + ["-"] * (len(batch_sizes) - 1)) + " | x1.0 |")
    print("\ncrops/s; 'ensemble' rows compute both members' vectors (one crop = 2 vectors).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
