"""``deer-pipeline embed IMAGE... --model NAME [--weights PATH] --out FILE.npy``.

Writes one L2-normalised 512-d float32 row per image, in the order given, and prints the
embedding version and the weights used. An image that cannot be read fails the command (its
row could not be left out without shifting the others).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from deer_pipeline import settings
from deer_pipeline.embedding import models as embedders
from deer_pipeline.embedding.inference import InferenceEngine
from deer_pipeline.ops.progress import set_quiet


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deer-pipeline embed", description=__doc__.split("\n\n")[1])
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--model", required=True, choices=embedders.ALL_MODELS)
    parser.add_argument("--weights", default="auto",
                        help="auto (default: ImageNet if cached, else the offline EfficientNet-Lite0 "
                             "substitutes), imagenet, or a state-dict file in the model's backbone format")
    parser.add_argument("--out", required=True, help="output .npy file")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pooling", default=settings.POOLING, choices=embedders.POOLINGS,
                        help=f"feature-map pooling (default {settings.POOLING}; centre: a Gaussian weight "
                             f"centred on the crop, sigma {embedders.CENTRE_SIGMA:g})")
    parser.add_argument("--zooms", type=float, nargs="+", default=list(settings.CROP_ZOOMS),
                        help="the crop (1) and centred zooms into it, embedded and averaged (default "
                             f"{' '.join(f'{z:g}' for z in settings.CROP_ZOOMS)}; 1 alone: the whole crop only)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    set_quiet(args.quiet)

    try:
        engine = InferenceEngine([args.model], weights=args.weights, device=args.device,
                                 batch_size=args.batch_size, pooling=args.pooling, num_workers=0,
                                 zooms=args.zooms)
        result = engine.embed_images(args.images)
    except (embedders.EmbedderError, embedders.WeightsUnavailable, settings.SettingsError) as exc:
        print(f"deer-pipeline embed: {exc}", file=sys.stderr)
        return 2
    if result.failures:
        for path, reason in result.failures:
            print(f"deer-pipeline embed: cannot read {path}: {reason}", file=sys.stderr)
        return 1
    vectors = result.vectors[args.model].astype(np.float32)
    out = Path(args.out)
    if out.suffix != ".npy":
        out = out.with_name(out.name + ".npy")   # what np.save would do anyway
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, vectors)
    spec = result.specs[args.model]
    print(f"embedding version: {spec.version}")
    print(f"weights used: {spec.weights.description}")
    print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} vectors to {out} "
          f"({result.crops_per_s:.1f} images/s on {engine.device})")
    return 0
