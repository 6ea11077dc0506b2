"""GPU embedding benchmark: the whole `embeddings` step on real-size JPEG crops, end to end.

One prepared script for a machine with an H100/H200 (it also runs on the CPU in a tiny mode,
to check it works): JPEG decode on the GPU (``torchvision.io.decode_jpeg(..., device="cuda")``),
resize to the models' 224x224 input on the GPU, bfloat16 autocast, channels-last, batch >= 256,
optionally ``torch.compile``; the configured ensemble (``multiscale`` + ``efficientnet_b0``,
through the pipeline's own networks and projections, so the vectors are the pipeline's). It
prints crops/s end to end (decode included) and the model-only rate, and the agreement of the
GPU vectors with the pipeline's CPU engine on a few crops.

    python bench/gpu.py                       # 50k crops, batch 256, cuda, bf16
    python bench/gpu.py --compile             # + torch.compile of each backbone
    python bench/gpu.py --device cpu --n 256 --batch 32 --distinct 32    # a check that it runs

Crops are cut from the synthetic sample's frames at their detection boxes (real trail-camera
sizes, 60-400 px), encoded as JPEG once, and cycled to reach ``--n``; each crop is decoded anew.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deer_pipeline.embedding import config as embedding_config  # noqa: E402
from deer_pipeline.embedding import models as embedders  # noqa: E402
from deer_pipeline.embedding import networks  # noqa: E402
from deer_pipeline.embedding.inference import CropItem  # noqa: E402
from deer_pipeline.settings import EmbeddingSettings  # noqa: E402


def sample_crops(distinct: int, quality: int = 90) -> list[bytes]:
    """JPEG bytes of up to ``distinct`` crops cut from the synthetic sample at its boxes."""
    from PIL import Image

    from deer_pipeline import sample

    out: list[bytes] = []
    with tempfile.TemporaryDirectory(prefix="deer-gpu-bench-") as tmp:
        info = sample.write_sample(tmp)
        doc = json.loads(Path(info.detections_json).read_text())
        for entry in doc["images"]:
            with Image.open(Path(tmp) / entry["file"]) as im:
                im = im.convert("RGB")
                W, H = im.size
                for det in entry["detections"]:
                    x, y, w, h = det["bbox"]
                    box = (int(x * W), int(y * H), int((x + w) * W), int((y + h) * H))
                    if box[2] - box[0] < 50 or box[3] - box[1] < 50:
                        continue
                    buf = io.BytesIO()
                    im.crop(box).save(buf, format="JPEG", quality=quality)
                    out.append(buf.getvalue())
                    if len(out) >= distinct:
                        return out
    return out


class GpuEnsemble:
    """The configured models on ``device``: one pass per backbone, projections as the pipeline's."""

    def __init__(self, config: EmbeddingSettings, device: str, compile_: bool):
        import torch

        self.torch = torch
        self.device = device
        self.specs = embedding_config.specs(config)
        self.groups: dict[tuple, list[str]] = {}
        for m, s in self.specs.items():
            self.groups.setdefault((s.backbone, s.weights.sha256, s.weights.source, s.pooling), []).append(m)
        self.nets = {}
        for key, models in self.groups.items():
            spec = self.specs[models[0]]
            net = networks.load_backbone(spec.weights, spec.pooling, device, channels_last=True)
            self.nets[key] = torch.compile(net) if compile_ else net
        self.autocast = torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu",
                                       dtype=torch.bfloat16)

    def __call__(self, x, zooms: int = 1):
        """uint8 (n * zooms, 3, 224, 224) on the device, each crop's zooms in a row ->
        {model: (n, 512) float32 on the device}: the zooms' unit vectors averaged and normalised
        again, as the pipeline's engine does (``settings.CROP_ZOOMS``)."""
        out = {}
        with self.torch.inference_mode(), self.autocast:
            for key, models in self.groups.items():
                pooled = self.nets[key](x.contiguous(memory_format=self.torch.channels_last))
                for m in models:
                    v = networks.project(self.specs[m], pooled).float()
                    if zooms > 1:
                        v = self.torch.nn.functional.normalize(v.reshape(-1, zooms, v.shape[1]).mean(1), dim=1)
                    out[m] = v
        return out


def decode_resize(jpegs: list, device: str, size: int, zooms=(1.0,)):
    """JPEG byte tensors -> uint8 (n * len(zooms), 3, size, size) on ``device``: decoded there,
    each crop's centred zooms (as ``inference.zoom`` cuts them) in a row, bilinear resize (aspect
    not kept, as the pipeline's preprocessing)."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    imgs = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    batch = torch.empty((len(imgs) * len(zooms), 3, size, size), dtype=torch.uint8, device=device)
    for i, img in enumerate(imgs):
        h, w = int(img.shape[1]), int(img.shape[2])
        for j, z in enumerate(zooms):
            part = img
            if z < 1.0:
                cw, ch = max(1, round(w * z)), max(1, round(h * z))
                x0, y0 = (w - cw) // 2, (h - ch) // 2
                part = img[:, y0:y0 + ch, x0:x0 + cw]
            r = F.interpolate(part[None].float(), size=(size, size), mode="bilinear", align_corners=False)
            batch[i * len(zooms) + j] = r[0].round_().clamp_(0, 255).to(torch.uint8)
    return batch


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50_000, help="crops to embed end to end")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--distinct", type=int, default=512, help="distinct crops cut from the sample")
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile each backbone")
    p.add_argument("--weights", default="auto")
    p.add_argument("--zooms", type=float, nargs="+", default=None,
                   help="the crop and centred zooms into it, averaged (default: the pipeline's settings.CROP_ZOOMS; "
                        "1 alone: the whole crop)")
    args = p.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; run it on a GPU machine, or with --device cpu "
              "and a small --n to check that it works", file=sys.stderr)
        return 2
    t = time.perf_counter()
    crops = sample_crops(args.distinct)
    print(f"{len(crops)} distinct JPEG crops from the sample ({np.mean([len(c) for c in crops]) / 1024:.1f} KiB "
          f"mean) in {time.perf_counter() - t:.1f}s")
    data = [torch.frombuffer(bytearray(c), dtype=torch.uint8) for c in crops]
    config = EmbeddingSettings(weights=args.weights, device=args.device, batch_size=args.batch,
                               **({"zooms": tuple(args.zooms)} if args.zooms else {}))
    zooms = config.zooms
    nz = len(zooms)
    model = GpuEnsemble(config, args.device, args.compile)
    size = embedders.INPUT_SIZE
    print("models:", {m: s.version for m, s in model.specs.items()})
    print(f"backbone passes per crop: {len(model.groups)}; crop zooms {list(zooms)} ({nz} images per crop); "
          f"device {args.device}; batch {args.batch} crops; bf16 autocast; channels-last; compile {args.compile}")

    # warm-up (and compile): two batches
    warm = decode_resize(data[: args.batch], args.device, size, zooms)
    for _ in range(2):
        model(warm, nz)
    sync(args.device)

    # end to end: decode on the device + resize + forward + projections (vectors stay on device)
    n_batches = (args.n + args.batch - 1) // args.batch
    t0 = time.perf_counter()
    done = 0
    for b in range(n_batches):
        k = min(args.batch, args.n - done)
        batch = [data[(done + i) % len(data)] for i in range(k)]
        x = decode_resize(batch, args.device, size, zooms)
        vecs = model(x, nz)
        done += k
    sync(args.device)
    e2e = done / (time.perf_counter() - t0)

    # model only: the same number of crops through the networks on one preprocessed batch
    t0 = time.perf_counter()
    for _ in range(n_batches):
        vecs = model(warm, nz)
    sync(args.device)
    model_only = n_batches * (warm.shape[0] // nz) / (time.perf_counter() - t0)

    # agreement with the pipeline's CPU engine (fp32, PIL decode) on a few crops
    k = min(16, len(crops))
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(k):
            path = Path(tmp) / f"c{i}.jpg"
            path.write_bytes(crops[i])
            paths.append(CropItem(f"c{i}", str(path)))
        cpu = embedding_config.engine(EmbeddingSettings(weights=args.weights, device="cpu", batch_size=k * nz,
                                                        zooms=zooms)).embed(paths)
    gpu = model(decode_resize(data[:k], args.device, size, zooms), nz)
    cos = {m: float(np.min(np.sum(cpu.vectors[m] * gpu[m].cpu().numpy(), axis=1))) for m in gpu}
    print(f"min cosine of the bf16 {args.device} vectors to the CPU engine's, {k} crops: {cos}")
    print(f"machine: {platform.node()} {torch.cuda.get_device_name() if args.device.startswith('cuda') else platform.processor()}; "
          f"torch {torch.__version__}")
    print(f"crops/s end to end (decode included): {e2e:.0f}; model only: {model_only:.0f}; "
          f"crops {done} ({nz} zooms each: {nz * e2e:.0f} images/s); models {sorted(vecs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
